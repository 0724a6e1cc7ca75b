"""IP-Adapter's decoupled cross-attention, installed on a diffusers UNet with diffusers' own loader.

The published weight file (``h94/IP-Adapter: models/ip-adapter_sd15.bin``) is IP-Adapter's
``{"image_proj": {proj.weight, proj.bias, norm.weight, norm.bias}, "ip_adapter": {"1.to_k_ip.weight",
"1.to_v_ip.weight", "3.to_k_ip.weight", ...}}``: ``image_proj`` is ``ImageProjModel`` (``Linear(D_img,
4 * cross)`` → ``[B, 4, cross]`` → ``LayerNorm``) and ``ip_adapter`` the ``to_k_ip``/``to_v_ip`` of every
cross-attention, numbered by position in ``unet.attn_processors`` (self-attentions take the even
numbers and hold no weights) (``tencent-ailab/IP-Adapter@62e4af9:ip_adapter/ip_adapter.py:28-46``,
``tutorial_train.py:296-321``). The ``.safetensors`` flavour flattens both with ``image_proj.`` /
``ip_adapter.`` prefixes, as diffusers' ``IPAdapterMixin.load_ip_adapter`` reads it.

:func:`install_ip_adapter` hands that dict to ``UNet2DConditionModel._load_ip_adapter_weights``:
``IPAdapterAttnProcessor2_0`` on every ``attn2`` (``out = text_attn + scale * attn(q, to_k_ip(ip),
to_v_ip(ip))``), ``encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection])`` and
``encoder_hid_dim_type = "ip_image_proj"``; the UNet then takes ``added_cond_kwargs={"image_embeds":
[embeds[:, None]]}`` (see :class:`zoo.blocks.denoisers.UNetDenoiser`). Only reading, checking, writing
and initialising the file is ours: diffusers has no public loader for a bare UNet without a pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from zoo.blocks.pretrained import MissingPretrainedError

IP_ADAPTER_TOKENS = 4
"""Image tokens ``ImageProjModel`` makes from one embedding (``clip_extra_context_tokens``)."""

IPAdapterWeights = dict[str, dict[str, Tensor]]
"""``{"image_proj": {...}, "ip_adapter": {...}}``, the published layout."""

_IMAGE_PROJ_KEYS = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}


class IPAdapterWeightsError(ValueError):
    """An IP-Adapter weight file is not in the published SD1.5 layout or does not fit the UNet."""


def cross_attention_names(unet: UNet2DConditionModel) -> list[str]:
    """Processor names of the UNet's cross-attentions (``...attn2.processor``), in ``attn_processors`` order."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def _ip_key(index: int) -> int:
    # Position of the index-th cross-attention in attn_processors: attn1/attn2 alternate, attn2 is odd.
    return 2 * index + 1


def load_ip_adapter_weights(path: str | Path) -> IPAdapterWeights:
    """Read an IP-Adapter weight file (``.bin`` nested or ``.safetensors`` prefixed) into the published layout.

    Raises:
        MissingPretrainedError: the file is not there.
        IPAdapterWeightsError: it is not IP-Adapter SD1.5's layout.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingPretrainedError(
            f"IP-Adapter weight file '{path}' does not exist: download it once (h94/IP-Adapter "
            f"models/ip-adapter_sd15.bin) and point ip_adapter_weights at it"
        )
    if path.suffix == ".safetensors":
        flat = load_file(str(path))
        weights: IPAdapterWeights = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            part, _, name = key.partition(".")
            if part not in weights:
                raise IPAdapterWeightsError(f"{path}: key '{key}' has neither the 'image_proj.' nor the 'ip_adapter.' prefix")
            weights[part][name] = value
    else:
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise IPAdapterWeightsError(f"{path}: not a readable torch weight file ({type(err).__name__}: {err})") from err
    check_ip_adapter_layout(weights, str(path))
    return weights


def check_ip_adapter_layout(weights: object, what: str) -> None:
    """Raise :class:`IPAdapterWeightsError` unless ``weights`` is IP-Adapter SD1.5's published layout."""
    if not isinstance(weights, dict) or set(weights) != {"image_proj", "ip_adapter"}:
        got = sorted(weights) if isinstance(weights, dict) else type(weights).__name__
        raise IPAdapterWeightsError(f"{what}: expected exactly the parts 'image_proj' and 'ip_adapter', got {got}")
    image_proj, adapter = weights["image_proj"], weights["ip_adapter"]
    if set(image_proj) != _IMAGE_PROJ_KEYS:
        raise IPAdapterWeightsError(
            f"{what}: image_proj must hold {sorted(_IMAGE_PROJ_KEYS)} (IP-Adapter SD1.5's ImageProjModel; "
            f"Plus/FaceID variants are not supported), got {sorted(image_proj)}"
        )
    count = len(adapter) // 2
    expected = {f"{_ip_key(i)}.{kind}.weight" for i in range(count) for kind in ("to_k_ip", "to_v_ip")}
    if not adapter or set(adapter) != expected:
        raise IPAdapterWeightsError(
            f"{what}: ip_adapter must hold '<n>.to_k_ip.weight' / '<n>.to_v_ip.weight' for n = 1, 3, 5, ..., "
            f"got {sorted(adapter)[:6]}{'...' if len(adapter) > 6 else ''}"
        )


def save_ip_adapter_weights(weights: IPAdapterWeights, path: str | Path) -> None:
    """Write ``weights`` as ``.safetensors`` (prefixed keys) or, for any other suffix, a nested torch file."""
    check_ip_adapter_layout(weights, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        flat = {f"{part}.{name}": value.contiguous() for part, values in weights.items() for name, value in values.items()}
        save_file(flat, str(path))
    else:
        torch.save(weights, path)


def _check_fits(unet: UNet2DConditionModel, weights: IPAdapterWeights) -> None:
    names = cross_attention_names(unet)
    cross = unet.config.cross_attention_dim
    proj = weights["image_proj"]["proj.weight"]
    if proj.ndim != 2 or proj.shape[0] != IP_ADAPTER_TOKENS * cross:
        raise IPAdapterWeightsError(
            f"image_proj.proj.weight {tuple(proj.shape)} does not make {IP_ADAPTER_TOKENS} tokens of the UNet's "
            f"cross_attention_dim {cross}"
        )
    if len(weights["ip_adapter"]) != 2 * len(names):
        raise IPAdapterWeightsError(
            f"the weights adapt {len(weights['ip_adapter']) // 2} cross-attentions, the UNet has {len(names)}"
        )


def install_ip_adapter(unet: UNet2DConditionModel, weights: IPAdapterWeights, scale: float = 1.0) -> None:
    """Install IP-Adapter on ``unet`` in place with diffusers' loader, at ``scale`` (official default 1.0)."""
    check_ip_adapter_layout(weights, "IP-Adapter weights")
    _check_fits(unet, weights)
    unet._load_ip_adapter_weights([weights])
    set_ip_adapter_scale(unet, scale)


def ip_adapter_processors(unet: UNet2DConditionModel) -> list[IPAdapterAttnProcessor2_0]:
    """The installed IP-Adapter processors, one per cross-attention, in ``attn_processors`` order."""
    return [proc for proc in unet.attn_processors.values() if isinstance(proc, IPAdapterAttnProcessor2_0)]


def set_ip_adapter_scale(unet: UNet2DConditionModel, scale: float) -> None:
    """The weight of the image branch in every decoupled cross-attention (official ``IPAdapter.set_scale``)."""
    processors = ip_adapter_processors(unet)
    if not processors:
        raise ValueError("the UNet carries no IP-Adapter: install_ip_adapter first")
    for proc in processors:
        proc.scale = [float(scale)]


def ip_adapter_weights(unet: UNet2DConditionModel) -> IPAdapterWeights:
    """The installed adapter of ``unet`` back in the published layout (inverse of :func:`install_ip_adapter`)."""
    processors = ip_adapter_processors(unet)
    if not processors or unet.config.encoder_hid_dim_type != "ip_image_proj":
        raise ValueError("the UNet carries no IP-Adapter: install_ip_adapter first")
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    image_proj = {
        "proj.weight": projection.image_embeds.weight,
        "proj.bias": projection.image_embeds.bias,
        "norm.weight": projection.norm.weight,
        "norm.bias": projection.norm.bias,
    }
    adapter = {}
    for i, proc in enumerate(processors):
        adapter[f"{_ip_key(i)}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        adapter[f"{_ip_key(i)}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return _detached(image_proj, adapter)


def _detached(image_proj: dict[str, Tensor], adapter: dict[str, Tensor]) -> IPAdapterWeights:
    copy = lambda values: {name: value.detach().clone() for name, value in values.items()}  # noqa: E731
    return {"image_proj": copy(image_proj), "ip_adapter": copy(adapter)}


def init_ip_adapter_weights(unet: UNet2DConditionModel, image_embed_dim: int, seed: int = 0) -> IPAdapterWeights:
    """Fresh weights as ``tutorial_train.py`` starts them: ``to_k_ip``/``to_v_ip`` copied from each ``attn2``'s
    ``to_k``/``to_v``, ``ImageProjModel`` at PyTorch's default init drawn from ``seed``
    (``tencent-ailab/IP-Adapter@62e4af9:tutorial_train.py:296-321``)."""
    cross = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj, norm = nn.Linear(image_embed_dim, IP_ADAPTER_TOKENS * cross), nn.LayerNorm(cross)
    image_proj = {"proj.weight": proj.weight, "proj.bias": proj.bias, "norm.weight": norm.weight, "norm.bias": norm.bias}
    adapter = {}
    for i, name in enumerate(cross_attention_names(unet)):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        adapter[f"{_ip_key(i)}.to_k_ip.weight"] = attention.to_k.weight
        adapter[f"{_ip_key(i)}.to_v_ip.weight"] = attention.to_v.weight
    return _detached(image_proj, adapter)
