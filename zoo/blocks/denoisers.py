"""Denoisers behind one call signature, and widening of their input layer for channel-concat conditions.

Every denoiser is a diffusers model wrapped by a :class:`Denoiser`:
``forward(latents, timestep, context, context_mask, condition=None, added_conditions=None)``
returns the prediction with the latent's channel count, in the objective's convention (flow
velocity for SANA, noise for SDXL/SD1.5 UNets). ``timestep`` is what the model's time embedding
eats: ``sigma * 1000`` for flow matching (see :mod:`zoo.blocks.objectives`), the integer DDPM step
for UNets. ``added_conditions`` carries model-specific extra inputs: SDXL's micro-conditioning
``{"text_embeds": pooled [B, P], "time_ids": [B, 6]}`` (see :func:`sdxl_time_ids`). The FLUX
transformer (ImgEdit-E1) is :class:`zoo.blocks.flux.FluxDenoiser`, on this same signature.

Edit conditioning by channel concatenation (DIM's ``expand_channels``, GoT's 12-channel ``conv_in``)
is :func:`widen_input_conv` plus :func:`widen_model_input`, which also records the new
``in_channels`` in the diffusers config so ``save_pretrained``/``from_pretrained`` round-trips the
widened model without widening it again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ModelMixin, SanaTransformer2DModel, UNet2DConditionModel
from torch import Tensor, nn

from zoo.blocks.condition import Condition
from zoo.blocks.pretrained import load_diffusers_model


@dataclass
class DenoiserConfig:
    """Where a denoiser's weights come from and how its input layer is widened."""

    pretrained: str | None = None
    """Hub id or local folder of a diffusers pipeline or model (``subfolder`` inside it)."""
    config: dict[str, Any] | None = None
    """Constructor kwargs of the diffusers model instead of ``pretrained`` (tiny models)."""
    subfolder: str | None = None
    """Folder of the model inside ``pretrained`` (null for a bare model folder)."""
    zero_init_condition: bool = False
    """Start the input channels added for a channel-concat condition at zero (the widened model
    then starts as the original) instead of PyTorch's random init (DIM's official default)."""
    copy_bias: bool = True
    """Copy the original input conv's bias into the widened conv (GoT's official widening: no)."""
    gradient_checkpointing: bool = False
    """Recompute blocks in backward to save memory."""
    seed: int | None = None
    """Seed of the initial weights of a model built from ``config``: the same weights in every
    process. Needed when part of it stays frozen (ImgEdit-E1's FLUX): frozen weights are not in
    checkpoints and are rebuilt from the config when one is loaded. Null: the global RNG."""


@dataclass
class SanaConfig(DenoiserConfig):
    """A SANA DiT inside a diffusers pipeline folder (``transformer/``)."""

    subfolder: str | None = "transformer"
    """Folder of the transformer inside ``pretrained`` (null for a bare model folder)."""


@dataclass
class UNetConfig(DenoiserConfig):
    """An SDXL / SD1.5 UNet inside a diffusers pipeline folder (``unet/``), widened as GoT widens it."""

    subfolder: str | None = "unet"
    """Folder of the UNet inside ``pretrained`` (null for a bare model folder)."""
    zero_init_condition: bool = True
    """Start the added input channels at zero (GoT, InstructPix2Pix) instead of random."""
    copy_bias: bool = False
    """Copy the pretrained ``conv_in`` bias into the widened conv (GoT official: no; InstructPix2Pix: yes)."""


def widen_input_conv(conv: nn.Conv2d, extra_channels: int, *, zero_init: bool, copy_bias: bool = True) -> nn.Conv2d:
    """Return a copy of ``conv`` taking ``extra_channels`` more input channels, appended after the old ones.

    The old weights go into ``weight[:, :conv.in_channels]``. The new input channels are zero
    (``zero_init=True``: the widened model starts as the old one) or keep the fresh default init
    (DIM ``expand_channels(zero_init=False)``, official default). ``copy_bias=False`` leaves the bias
    at its fresh init, as GoT's ``conv_in`` widening does
    (``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:27-37``).
    """
    if extra_channels <= 0:
        raise ValueError(f"extra_channels must be positive, got {extra_channels}")
    if conv.groups != 1:
        raise ValueError(f"cannot widen a grouped convolution (groups={conv.groups})")
    wide = nn.Conv2d(
        conv.in_channels + extra_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        if zero_init:
            wide.weight.zero_()
        wide.weight[:, : conv.in_channels].copy_(conv.weight)
        if copy_bias and conv.bias is not None:
            wide.bias.copy_(conv.bias)
    return wide


def widen_model_input(
    model: ModelMixin, conv_name: str, condition_channels: int, *, zero_init: bool, copy_bias: bool = True
) -> None:
    """Widen ``model``'s input conv (dotted name, e.g. ``"patch_embed.proj"``, ``"conv_in"``) in place.

    The latent channel count is ``config.out_channels``; the widened ``in_channels`` is written to
    the config, so a saved widened model loads with the right shape. A model that is already wide
    (loaded from such a folder) is left alone; any other channel count is an error.
    """
    in_channels, latent_channels = model.config.in_channels, model.config.out_channels or model.config.in_channels
    if in_channels == latent_channels + condition_channels:
        return
    if in_channels != latent_channels:
        raise ValueError(
            f"{type(model).__name__} takes {in_channels} input channels for {latent_channels} latent channels, "
            f"i.e. it was widened by {in_channels - latent_channels} condition channels; set "
            f"condition_channels={in_channels - latent_channels} (got {condition_channels})"
        )
    parent_name, _, attr = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    conv = getattr(parent, attr)
    setattr(parent, attr, widen_input_conv(conv, condition_channels, zero_init=zero_init, copy_bias=copy_bias))
    model.register_to_config(in_channels=latent_channels + condition_channels, out_channels=latent_channels)


class Denoiser(nn.Module, ABC):
    """The call signature every denoiser in the zoo shares (see the module docstring)."""

    @property
    @abstractmethod
    def in_channels(self) -> int:
        """Channels of the latent being denoised (not counting concatenated condition channels)."""

    @property
    @abstractmethod
    def context_dim(self) -> int:
        """Width of the ``context`` tokens the denoiser cross-attends to."""

    @abstractmethod
    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        context: Tensor,
        context_mask: Tensor,
        condition: Tensor | None = None,
        added_conditions: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Predict from ``latents [B,C,H,W]``, ``timestep [B]`` (or scalar), ``context [B,L,D]``,
        ``context_mask [B,L]`` (1/True = real token), an optional channel-concat ``condition`` and
        the model's optional extra inputs ``added_conditions``."""

    def predict(self, latents: Tensor, timestep: Tensor, condition: Condition) -> Tensor:
        """:meth:`forward` with the parts of a :class:`~zoo.blocks.condition.Condition`."""
        return self(latents, timestep, condition.context, condition.mask, condition.channels, condition.added or None)

    def _load(self, model_cls: type[ModelMixin], cfg: DenoiserConfig, *, input_conv: str, condition_channels: int) -> None:
        """Build ``self.model`` (published weights or a config) with its input conv widened for the condition."""
        if condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0, got {condition_channels}")
        # from_pretrained returns a model in eval mode, a config-built one is in train mode: the same
        # mode either way, which the owner's train()/eval() then sets.
        self.model = load_diffusers_model(model_cls, cfg.pretrained, cfg.config, cfg.subfolder, cfg.seed).train()
        self.condition_channels = condition_channels
        widen_model_input(
            self.model, input_conv, condition_channels, zero_init=cfg.zero_init_condition, copy_bias=cfg.copy_bias
        )
        if cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    def _check_inputs(
        self, latents: Tensor, context: Tensor, context_mask: Tensor, condition: Tensor | None, condition_channels: int
    ) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.in_channels:
            raise ValueError(f"latents must be [B, {self.in_channels}, H, W], got {tuple(latents.shape)}")
        batch = latents.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(f"context must be [{batch}, L, {self.context_dim}], got {tuple(context.shape)}")
        if tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"context_mask must be [B, L] = {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
            )
        if condition_channels == 0:
            if condition is not None:
                raise ValueError("a condition was given but this denoiser has condition_channels=0")
            return
        expected = (batch, condition_channels, *latents.shape[2:])
        if condition is None or tuple(condition.shape) != expected:
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"condition must be {expected} (condition_channels={condition_channels}), got {got}")


class SanaDenoiser(Denoiser):
    """SANA / SANA-1.5 DiT (diffusers ``SanaTransformer2DModel``), the decoder of DIM.

    Maps to DIM's ``SanaMS[ChannelCond]_1600M_P1_D20`` (``showlab/DIM@28e644f``:
    ``models/diffusion/model/nets/sana_multi_scale.py:559-563, 755-763``): with
    ``condition_channels > 0`` the condition (DIM edit: the source's DC-AE latent) is concatenated
    after the noisy latent before the patch embedding, whose ``proj`` conv is widened with
    ``zero_init`` (official default False: random new channels) and the bias copied
    (``models/modeling_dim.py:335-355``, ``expand_channels``). T2I uses ``condition_channels=0``
    (plain SanaMS).

    Built from a :class:`SanaConfig`; ``condition_channels`` (set by the module: the source
    latent's channels for editing, 0 for T2I) widens the patch embedding.
    """

    def __init__(self, cfg: SanaConfig, *, condition_channels: int = 0) -> None:
        super().__init__()
        self._load(SanaTransformer2DModel, cfg, input_conv="patch_embed.proj", condition_channels=condition_channels)

    @property
    def in_channels(self) -> int:
        return self.model.config.out_channels or self.model.config.in_channels

    @property
    def context_dim(self) -> int:
        return self.model.config.caption_channels

    @property
    def sample_size(self) -> int:
        """Latent side length the model was configured for (default generation size)."""
        return self.model.config.sample_size

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        context: Tensor,
        context_mask: Tensor,
        condition: Tensor | None = None,
        added_conditions: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Flow-velocity prediction ``[B, in_channels, H, W]``; ``timestep`` is ``sigma * 1000``."""
        if added_conditions is not None:
            raise ValueError(f"SanaDenoiser takes no added_conditions, got keys {sorted(added_conditions)}")
        self._check_inputs(latents, context, context_mask, condition, self.condition_channels)
        hidden = latents if condition is None else torch.cat([latents, condition.to(latents.dtype)], dim=1)
        # SanaPipeline scales the timestep by config.timestep_scale before the call (1.0 for SANA/SANA-1.5).
        timestep = torch.as_tensor(timestep, device=latents.device).to(latents.dtype).expand(latents.shape[0])
        return self.model(
            hidden,
            encoder_hidden_states=context.to(latents.dtype),
            timestep=timestep * self.model.config.timestep_scale,
            encoder_attention_mask=context_mask,
            return_dict=False,
        )[0]


def sdxl_time_ids(
    height: int,
    width: int,
    crop: tuple[int, int] = (0, 0),
    target: tuple[int, int] | None = None,
) -> Tensor:
    """SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` as ``[1, 6]``.

    ``target`` defaults to ``(height, width)``; GoT passes ``(H, W, 0, 0, H, W)`` for the generated
    size (``_get_add_time_ids`` and its call,
    ``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:53-69, 310-319``).
    Float32; the denoiser casts and broadcasts it.
    """
    target_h, target_w = (height, width) if target is None else target
    if min(height, width, target_h, target_w) <= 0 or min(crop) < 0:
        raise ValueError(f"need positive sizes and a non-negative crop, got {height}x{width}, {crop=}, {target=}")
    return torch.tensor([[height, width, crop[0], crop[1], target_h, target_w]], dtype=torch.float32)


class UNetDenoiser(Denoiser):
    """SDXL / SD1.5 UNet (diffusers ``UNet2DConditionModel``), GoT's SSGM diffusion module.

    Maps to GoT (paper §5.2;
    ``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:27-37``): SDXL base with
    ``conv_in`` widened from 4 to 12 input channels = [noisy latent 4 | reference latent 4 |
    box-mask latent 4], i.e. ``condition_channels=8``; the new input channels are zero and the
    pretrained weights go to the first 4. The official code does *not* copy the conv bias (the GoT
    checkpoint overwrites it), hence ``copy_bias=False`` by default; ``copy_bias=True`` makes the
    widened UNet start exactly as the pretrained one (InstructPix2Pix's widening). SDXL's
    ``addition_embed_type="text_time"`` needs ``added_conditions={"text_embeds": [B, P],
    "time_ids": [B, 6]}``; GoT's pooled embedding is the mean of its 1280-d projected tokens.
    An SD1.5 UNet carrying an IP-Adapter (MIND-Edit, :mod:`zoo.blocks.ip_adapter`) needs
    ``added_conditions={"image_embeds": [B, D_img]}`` instead: the CLIP image embedding its
    ``ImageProjModel`` turns into 4 image tokens; zeros are the adapter's unconditional input.

    Built from a :class:`UNetConfig`; ``condition_channels`` (GoT: 8) widens ``conv_in``.
    """

    def __init__(self, cfg: UNetConfig, *, condition_channels: int = 0) -> None:
        super().__init__()
        self._load(UNet2DConditionModel, cfg, input_conv="conv_in", condition_channels=condition_channels)
        if not isinstance(self.model.config.cross_attention_dim, int):
            raise ValueError(
                f"per-block cross_attention_dim {self.model.config.cross_attention_dim} is not supported: "
                "the context has one width"
            )

    @property
    def in_channels(self) -> int:
        return self.model.config.out_channels

    @property
    def context_dim(self) -> int:
        return self.model.config.cross_attention_dim

    @property
    def sample_size(self) -> int:
        """Latent side length the model was configured for (SDXL: 128, i.e. 1024 px)."""
        return self.model.config.sample_size

    @property
    def needs_added_conditions(self) -> bool:
        """Whether the UNet takes SDXL's ``text_embeds`` + ``time_ids`` (``addition_embed_type="text_time"``)."""
        return self.model.config.addition_embed_type == "text_time"

    @property
    def has_ip_adapter(self) -> bool:
        """Whether an IP-Adapter is installed (:func:`zoo.blocks.ip_adapter.install_ip_adapter`): the UNet
        then takes ``added_conditions={"image_embeds": [B, D_img]}``."""
        return self.model.config.encoder_hid_dim_type == "ip_image_proj"

    @property
    def image_embed_dim(self) -> int:
        """Width of the IP-Adapter's image embedding (ViT-H/14's 1024 for ip-adapter_sd15)."""
        if not self.has_ip_adapter:
            raise ValueError("this UNet carries no IP-Adapter, so it takes no image embedding")
        return self.model.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features

    def _ip_adapter_kwargs(self, added_conditions: dict[str, Tensor] | None, batch: int, dtype: torch.dtype) -> dict:
        if added_conditions is None or set(added_conditions) != {"image_embeds"}:
            got = None if added_conditions is None else sorted(added_conditions)
            raise ValueError(
                "a UNet with an IP-Adapter needs added_conditions with exactly 'image_embeds' [B, "
                f"{self.image_embed_dim}] (zeros = IP-Adapter's unconditional), got {got}"
            )
        embeds = added_conditions["image_embeds"]
        if embeds.ndim != 2 or embeds.shape[0] not in (1, batch) or embeds.shape[1] != self.image_embed_dim:
            raise ValueError(f"image_embeds must be [{batch} or 1, {self.image_embed_dim}], got {tuple(embeds.shape)}")
        # MultiIPAdapterImageProjection takes one [B, num_images, D] tensor per adapter; one image each.
        return {"added_cond_kwargs": {"image_embeds": [embeds.to(dtype).expand(batch, -1)[:, None]]}}

    def _added_cond_kwargs(self, added_conditions: dict[str, Tensor] | None, batch: int, dtype: torch.dtype) -> dict:
        if self.has_ip_adapter:
            return self._ip_adapter_kwargs(added_conditions, batch, dtype)
        if not self.needs_added_conditions:
            if added_conditions:
                raise ValueError(
                    f"this UNet (addition_embed_type={self.model.config.addition_embed_type!r}) takes no "
                    f"added_conditions, got keys {sorted(added_conditions)}"
                )
            return {}
        if added_conditions is None or set(added_conditions) != {"text_embeds", "time_ids"}:
            got = None if added_conditions is None else sorted(added_conditions)
            raise ValueError(
                "an SDXL-style UNet (addition_embed_type='text_time') needs added_conditions with exactly "
                f"'text_embeds' [B, pooled] and 'time_ids' [B, 6] (see sdxl_time_ids), got {got}"
            )
        pooled_dim = self.model.config.projection_class_embeddings_input_dim - 6 * (
            self.model.config.addition_time_embed_dim
        )
        text_embeds, time_ids = added_conditions["text_embeds"], added_conditions["time_ids"]
        if text_embeds.ndim != 2 or text_embeds.shape[0] not in (1, batch) or text_embeds.shape[1] != pooled_dim:
            raise ValueError(f"text_embeds must be [{batch} or 1, {pooled_dim}], got {tuple(text_embeds.shape)}")
        if time_ids.ndim != 2 or time_ids.shape[0] not in (1, batch) or time_ids.shape[1] != 6:
            raise ValueError(f"time_ids must be [{batch} or 1, 6], got {tuple(time_ids.shape)}")
        # diffusers reshapes the time embedding by text_embeds' batch: both must be [B, ...] together.
        return {
            "added_cond_kwargs": {
                "text_embeds": text_embeds.to(dtype).expand(batch, -1),
                "time_ids": time_ids.to(dtype).expand(batch, -1),
            }
        }

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        context: Tensor,
        context_mask: Tensor,
        condition: Tensor | None = None,
        added_conditions: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Noise (or v) prediction ``[B, in_channels, H, W]``; ``timestep`` is the integer DDPM step.

        ``text_embeds`` / ``time_ids`` (and ``image_embeds``) of batch 1 are shared by the whole batch,
        as in GoT's CFG batch (one pooled embedding and one ``[1, 6]`` time id for all four branches).
        """
        self._check_inputs(latents, context, context_mask, condition, self.condition_channels)
        batch = latents.shape[0]
        extra = self._added_cond_kwargs(added_conditions, batch, latents.dtype)
        hidden = latents if condition is None else torch.cat([latents, condition.to(latents.dtype)], dim=1)
        timestep = torch.as_tensor(timestep, device=latents.device)
        return self.model(
            hidden,
            timestep.expand(batch) if timestep.ndim == 0 else timestep,
            encoder_hidden_states=context.to(latents.dtype),
            encoder_attention_mask=context_mask,
            return_dict=False,
            **extra,
        )[0]
