"""FLUX.1 transformer behind the zoo's denoiser signature, and the selector of its trained branch.

ImgEdit-E1 (paper App. A.3-A.4) generates with FLUX.1-dev; its condition (projected Qwen2.5-VL
states + projected SigLIP tokens) enters the *text* branch as ``encoder_hidden_states``. UniWorld-V1,
the closest public code (``PKU-YuanGroup/UniWorld-V1@8403e86:univa/models/modeling_univa_denoise_tower.py``),
does the same.

:class:`FluxDenoiser` wraps diffusers ``FluxTransformer2DModel`` and does what ``FluxPipeline``
does around it (diffusers 0.42 ``pipelines/flux/pipeline_flux.py``):

- latents ``[B, C, H, W]`` are packed into 2x2 patches ``[B, H/2 * W/2, 4C]``
  (``_pack_latents``), with position ids ``(0, row, col)`` per patch (``_prepare_latent_image_ids``)
  and zero text ids ``[L, 3]``; the output is unpacked back (``_unpack_latents``);
- our objective's timestep is ``sigma * 1000``; FLUX takes ``sigma`` (the pipeline passes
  ``t / 1000``; the model multiplies by 1000 again inside);
- FLUX.1-dev is guidance-distilled (``guidance_embeds=True``): ``added_conditions["guidance"]``
  (``[B]`` floats) feeds the guidance embedding, default :attr:`FluxConfig.guidance` (3.5, the
  pipeline's ``guidance_scale`` and UniWorld's eval value). diffusers' FLUX training scripts
  (``examples/dreambooth/train_dreambooth_flux.py``, ``--guidance_scale``, default 3.5) feed every
  training sample one constant guidance value; so does this default;
- ``added_conditions["text_ids"]`` (``[B, L, 3]``, one set for the whole batch) replaces the zero
  text ids, e.g. :func:`grid_text_ids` for image tokens in the text stream;
- ``added_conditions["pooled"]`` (``[B, pooled_projection_dim]``) is CLIP's pooled text embedding
  (UniWorld eval: CLIP-L of the prompt). Without one the denoiser uses zeros: a documented choice
  for a module that loads no CLIP text encoder (ImgEdit-E1 names none); the time embedding then
  carries no text summary, and the condition tokens carry the edit.

Padding of the context: diffusers' FLUX has no text-mask argument (FLUX was trained on T5 tokens
padded to 512 and attends to the padding), but its attention processor (``FluxAttnProcessor``)
takes ``attention_mask`` through ``joint_attention_kwargs`` and hands it to the attention kernel
in every double and single block. Padded context tokens are zeroed, and with
:attr:`FluxConfig.mask_padding` (default) masked out as keys of the joint ``[text | image]``
attention, so a prediction does not depend on how much padding a batch carries (UniWorld left-pads
its condition and keeps an attention mask for it). A boolean mask keeps PyTorch's SDPA off the
flash kernel (the memory-efficient kernel takes masks); ``mask_padding=False`` is FLUX's own
behaviour.

The image branch trained in ImgEdit-E1's stage 2 is :data:`FluxSelector`, applied by
:func:`select_parameters` / :func:`set_trainable`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from zoo.blocks.config import ConfigError, check_range
from zoo.blocks.denoisers import Denoiser, DenoiserConfig
from zoo.blocks.tiny_flux import options_from_dict, tiny_flux

FLUX_GUIDANCE = 3.5
"""FLUX.1-dev's distilled guidance at inference (``FluxPipeline``'s ``guidance_scale``; UniWorld eval)."""


@dataclass
class FluxConfig(DenoiserConfig):
    """A FLUX.1 transformer inside a diffusers pipeline folder (``transformer/``)."""

    subfolder: str | None = "transformer"
    """Folder of the transformer inside ``pretrained`` (null for a bare model folder)."""
    guidance: float = FLUX_GUIDANCE
    """Distilled guidance used when ``added_conditions`` has no ``guidance`` (models with
    ``guidance_embeds``); one constant for training, as diffusers' FLUX training scripts use."""
    mask_padding: bool = True
    """Mask padded context tokens out of the joint attention (they are zeroed either way);
    false attends to them, as FLUX does to its T5 padding."""
    tiny: dict[str, Any] | None = None
    """Options of the tiny *pretrained* FLUX (:class:`zoo.blocks.tiny_flux.TinyFluxOptions`, ``{}``
    for the defaults), built once and cached, instead of ``pretrained`` or ``config`` (toy runs)."""

    def __post_init__(self) -> None:
        check_range("denoiser.guidance", self.guidance, 0.0)
        if self.tiny is not None:
            if self.pretrained is not None or self.config is not None:
                raise ConfigError("denoiser.tiny builds the tiny pretrained FLUX: set pretrained and config to null")
            options_from_dict(self.tiny)

    def resolved(self) -> FluxConfig:
        """This config with ``tiny`` replaced by the cached tiny FLUX's folder (built if absent)."""
        if self.tiny is None:
            return self
        return dataclasses.replace(self, pretrained=str(tiny_flux(options_from_dict(self.tiny))), subfolder="transformer", tiny=None)


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]``: 2x2 patches, row-major, channels then the patch's rows and columns."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height x width``."""
    b, _, c4 = packed.shape
    patches = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c4 // 4, height, width)


def grid_text_ids(grid: int, height: int, width: int) -> Tensor:
    """Rotary ids ``[grid * grid, 3]`` that place a ``grid x grid`` patch grid covering the same image
    as a ``height x width`` latent onto that latent's packed patch grid: ``(1, row, col)`` at each
    patch's centre in packed-patch units (the first axis 1 marks a second image, as FLUX Kontext
    marks its reference image), so rotary attention relates each patch to the packed patches it covers."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    rows, cols = torch.meshgrid(centres * (height // 2) - 0.5, centres * (width // 2) - 0.5, indexing="ij")
    return torch.stack([torch.ones_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary position ids ``[H/2 * W/2, 3]`` = ``(0, row, col)`` of each packed patch."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxDenoiser(Denoiser):
    """FLUX.1 (diffusers ``FluxTransformer2DModel``), ImgEdit-E1's generator (see the module docstring).

    Built from a :class:`FluxConfig`, e.g. ``pretrained: black-forest-labs/FLUX.1-dev``. The model's
    ``in_channels`` is 4x the latent channels (2x2 packing: 64 for FLUX's 16-channel VAE). No
    channel-concat condition: ImgEdit-E1 conditions through the text branch only.
    """

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        self._load(FluxTransformer2DModel, cfg, input_conv="x_embedder", condition_channels=0)
        if self.model.config.patch_size != 1 or self.model.config.in_channels % 4:
            raise ValueError(
                "FluxDenoiser packs 2x2 patches itself: the model needs patch_size=1 and in_channels "
                f"= 4 x latent channels, got patch_size={self.model.config.patch_size}, "
                f"in_channels={self.model.config.in_channels}"
            )
        self.guidance = cfg.guidance
        self.mask_padding = cfg.mask_padding

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels // 4

    @property
    def context_dim(self) -> int:
        return self.model.config.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        """Width of ``added_conditions["pooled"]`` (CLIP-L's 768 for FLUX.1)."""
        return self.model.config.pooled_projection_dim

    @property
    def has_guidance_embedding(self) -> bool:
        """Whether the model is guidance-distilled (FLUX.1-dev) and takes ``added_conditions["guidance"]``."""
        return bool(self.model.config.guidance_embeds)

    def _added(self, added: dict[str, Tensor] | None, batch: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        added = dict(added or {})
        unknown = set(added) - {"pooled", "guidance", "text_ids"}
        if unknown:
            raise ValueError(f"FluxDenoiser takes added_conditions 'pooled', 'guidance' and 'text_ids' only, got {sorted(unknown)}")
        pooled = added.get("pooled")
        if pooled is None:
            pooled = torch.zeros(batch, self.pooled_dim, device=device)
        elif pooled.ndim != 2 or pooled.shape[0] not in (1, batch) or pooled.shape[1] != self.pooled_dim:
            raise ValueError(f"pooled must be [{batch} or 1, {self.pooled_dim}], got {tuple(pooled.shape)}")
        guidance = added.get("guidance")
        if not self.has_guidance_embedding:
            if guidance is not None:
                raise ValueError("this FLUX model has no guidance embedding (guidance_embeds=False): drop 'guidance'")
            return pooled.expand(batch, -1), None
        if guidance is None:
            guidance = torch.full((batch,), self.guidance, device=device)
        guidance = torch.as_tensor(guidance, device=device, dtype=torch.float32)
        if guidance.ndim > 1 or guidance.numel() not in (1, batch):
            raise ValueError(f"guidance must be [{batch}] or a scalar, got {tuple(guidance.shape)}")
        return pooled.expand(batch, -1), guidance.reshape(-1).expand(batch)

    @staticmethod
    def _text_ids(text_ids: Tensor | None, context: Tensor, dtype: torch.dtype) -> Tensor:
        """FLUX's ``txt_ids [L, 3]``: zeros (the pipeline's), or ``added_conditions["text_ids"]``
        ``[B, L, 3]``, which must be the same for every sample (FLUX takes one set per call)."""
        batch, length = context.shape[:2]
        if text_ids is None:
            return torch.zeros(length, 3, device=context.device, dtype=dtype)
        if tuple(text_ids.shape) != (batch, length, 3) or not bool((text_ids == text_ids[:1]).all()):
            raise ValueError(f"text_ids must be [{batch}, {length}, 3] and the same for every sample, got {tuple(text_ids.shape)}")
        return text_ids[0].to(device=context.device, dtype=dtype)

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        context: Tensor,
        context_mask: Tensor,
        condition: Tensor | None = None,
        added_conditions: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Flow-velocity prediction ``[B, C, H, W]`` (``noise - x0``); ``timestep`` is ``sigma * 1000``.

        ``H`` and ``W`` must be even (2x2 packing).
        """
        self._check_inputs(latents, context, context_mask, condition, 0)
        batch, _, height, width = latents.shape
        if height % 2 or width % 2:
            raise ValueError(f"FLUX packs 2x2 latent patches: H and W must be even, got {height}x{width}")
        dtype, device = latents.dtype, latents.device
        pooled, guidance = self._added(added_conditions, batch, device)
        text_ids = self._text_ids((added_conditions or {}).get("text_ids"), context, dtype)
        keep = context_mask.to(device=device, dtype=torch.bool)
        context = context.to(dtype) * keep[..., None].to(dtype)
        sigma = torch.as_tensor(timestep, device=device).to(dtype).expand(batch) / 1000
        image_ids = latent_image_ids(height, width, device, dtype)
        joint_kwargs = None
        if self.mask_padding:
            # Keys of the joint sequence [text | image]; every image token is a real key.
            keys = torch.cat([keep, keep.new_ones(batch, image_ids.shape[0])], dim=1)
            joint_kwargs = {"attention_mask": keys[:, None, None, :]}
        packed = self.model(
            hidden_states=pack_latents(latents),
            encoder_hidden_states=context,
            pooled_projections=pooled.to(dtype),
            timestep=sigma,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=guidance,
            joint_attention_kwargs=joint_kwargs,
            return_dict=False,
        )[0]
        return unpack_latents(packed, height, width)


# -- the image branch ----------------------------------------------------------------------------

FluxBranch = Literal["double_image", "double", "single", "all"]
"""Named parameter sets of FLUX (see :data:`FLUX_BRANCHES`)."""

FluxSelector = FluxBranch | list[str]
"""A named branch, or regexes searched in parameter names (``re.search``)."""

# ``(^|\.)`` anchors at a block list of the transformer whatever prefix holds it (``model.``,
# ``denoiser.model.``) and keeps ``transformer_blocks`` from matching ``single_transformer_blocks``.
_DOUBLE = r"(^|\.)transformer_blocks\.\d+\."
_SINGLE = r"(^|\.)single_transformer_blocks\.\d+\."
FLUX_BRANCHES: dict[str, tuple[str, ...]] = {
    # The image stream of every double-stream (MMDiT) block: its AdaLN modulation, q/k/v, qk-norms,
    # output projection and MLP. Not the text stream (norm1_context, add_q/k/v_proj, to_add_out,
    # norm_added_q/k, ff_context), the embedders, the single-stream blocks or the output layers.
    "double_image": (_DOUBLE + r"(norm1|attn\.(to_q|to_k|to_v|to_out|norm_q|norm_k)|norm2|ff)\.",),
    "double": (_DOUBLE,),
    "single": (_SINGLE,),
    # UniWorld-V1 stage 2: ``flux_train_layer_idx`` 0-56, i.e. all 19 double + 38 single blocks.
    "all": (_DOUBLE, _SINGLE),
}
"""What each :data:`FluxBranch` trains.

ImgEdit-E1's paper (App. A.4) trains "the image branch of Flux" in stage 2 without saying which
parameters; ``double_image`` (default) reads it as the image stream of the dual-stream blocks
(FLUX's single-stream blocks mix text and image in one stream, so they have no image branch);
``all`` is UniWorld-V1's stage 2 (every block).
"""


def check_selector(selector: FluxSelector) -> tuple[str, ...]:
    """The regexes of ``selector``; :class:`ConfigError` for an unknown name or a bad regex."""
    if isinstance(selector, str):
        if selector not in FLUX_BRANCHES:
            names = ", ".join(get_args(FluxBranch))
            raise ConfigError(f"FLUX branch must be one of {names} or a list of regexes; got {selector!r}")
        return FLUX_BRANCHES[selector]
    if not selector:
        raise ConfigError("an empty list of FLUX parameter regexes selects nothing")
    for pattern in selector:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"bad FLUX parameter regex {pattern!r}: {err}") from err
    return tuple(selector)


def select_parameters(model: nn.Module, selector: FluxSelector) -> list[str]:
    """Names of ``model``'s parameters that ``selector`` picks, in ``named_parameters`` order.

    ``model`` is a ``FluxTransformer2DModel`` or anything holding one (a :class:`FluxDenoiser`, a
    module); a selector that picks nothing is an error (a typo, or a model without such blocks).
    """
    patterns = [re.compile(p) for p in check_selector(selector)]
    names = [name for name, _ in model.named_parameters() if any(p.search(name) for p in patterns)]
    if not names:
        raise ValueError(f"FLUX selector {selector!r} matches no parameter of {type(model).__name__}")
    return names


def set_trainable(model: nn.Module, selector: FluxSelector) -> list[str]:
    """Train exactly the parameters of ``model`` that ``selector`` picks and freeze all its others; their names.

    Call it on the denoiser (or its ``model``), not on a module whose projectors also train.
    """
    names = set(select_parameters(model, selector))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return [name for name, _ in model.named_parameters() if name in names]
