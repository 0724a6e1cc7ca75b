"""Image codecs: pixels in [-1, 1] <-> the latent space a denoiser works in.

A :class:`Codec` has ``latent_channels``, ``downsample_factor``, ``encode`` and ``decode``; it is
frozen (no gradients, always in eval mode) because every paper in the zoo keeps its VAE frozen,
and frozen parts are reloaded from their source rather than checkpointed.

- :class:`DCAutoencoder`: diffusers ``AutoencoderDC`` (DIM / SANA: ``dc-ae-f32c32-sana-1.1``,
  ``z = ae.encode(x) * 0.41407``, ``x = ae.decode(z / 0.41407)``;
  ``showlab/DIM@28e644f:models/modeling_dim.py:357-411``).
- :class:`KLAutoencoder`: diffusers ``AutoencoderKL`` (SDXL / SD1.5 / FLUX VAEs),
  ``z = (posterior - shift_factor) * scaling_factor``; :meth:`KLAutoencoder.encode_unscaled` is the
  raw posterior mode GoT conditions its UNet on
  (``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:259-260``).
- :class:`IdentityCodec`: latent = pixels, for toy runs in pixel space (also GoT's unscaled conditions).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from diffusers import AutoencoderDC, AutoencoderKL
from torch import Tensor

from zoo.blocks.config import ConfigError, check_positive
from zoo.blocks.frozen import FrozenModule
from zoo.blocks.pretrained import load_diffusers_model

DC_AE_SCALING_FACTOR = 0.41407
"""DC-AE-f32c32's latent scale, hard-coded by DIM (tiny DC-AE configs leave theirs at 1.0)."""


@dataclass
class CodecConfig:
    """Which image codec a module works in, and where its weights come from."""

    kind: Literal["dc", "kl", "identity"]
    """``dc``: DC-AE (DIM / SANA); ``kl``: AutoencoderKL (SDXL, SD1.5, FLUX); ``identity``: pixels (toy runs)."""
    pretrained: str | None = None
    """Hub id or local folder of a diffusers pipeline or autoencoder (``subfolder`` inside it)."""
    config: dict[str, Any] | None = None
    """Constructor kwargs of the diffusers autoencoder instead of ``pretrained`` (tiny models)."""
    subfolder: str | None = "vae"
    """Folder of the autoencoder inside ``pretrained`` (null for a bare autoencoder folder)."""
    scaling_factor: float | None = None
    """Multiplies latents; null: DC-AE's 0.41407 (DIM), or the KL model config's (SDXL 0.13025, SD1.5 0.18215, FLUX 0.3611)."""
    shift_factor: float | None = None
    """KL only: subtracted before scaling; null takes the model config's (FLUX 0.1159; SD/SDXL 0)."""
    sample: bool = False
    """KL only: draw ``z`` from the posterior in ``encode`` (diffusers' SD training scripts) instead of its mode (GoT)."""
    channels: int = 3
    """Identity only: image channels."""

    def __post_init__(self) -> None:
        if self.scaling_factor is not None:
            check_positive("autoencoder.scaling_factor", self.scaling_factor)
        if self.kind == "identity" and (self.pretrained is not None or self.config is not None):
            raise ConfigError("autoencoder kind 'identity' takes no pretrained or config (it has no weights)")
        if self.kind != "kl" and (self.shift_factor is not None or self.sample):
            raise ConfigError(f"autoencoder shift_factor and sample are KL options; kind is '{self.kind}'")


class Codec(FrozenModule, ABC):
    """Frozen image codec: ``encode(x in [-1,1]) -> z``, ``decode(z) -> x in [-1,1]``."""

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of ``z``."""

    @property
    @abstractmethod
    def downsample_factor(self) -> int:
        """Spatial side of an image divided by that of its latent."""

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, latent_channels, H/f, W/f]`` as the denoiser sees them."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`encode`: latents -> images ``[B, 3, H, W]`` in [-1, 1]."""

    def _check_images(self, images: Tensor) -> None:
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images must be [B, 3, H, W] with H and W multiples of {f}, got {tuple(images.shape)}")

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}")


class DCAutoencoder(Codec):
    """Deep-compression autoencoder (diffusers ``AutoencoderDC``), DIM/SANA's VAE.

    Built from a :class:`CodecConfig` of kind ``dc``, e.g. ``pretrained:
    mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers`` with ``subfolder: null``; the latent scale is
    :data:`DC_AE_SCALING_FACTOR` unless the config names one (never the model config's).
    """

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.model = load_diffusers_model(AutoencoderDC, cfg.pretrained, cfg.config, cfg.subfolder)
        self.scaling_factor = DC_AE_SCALING_FACTOR if cfg.scaling_factor is None else cfg.scaling_factor
        self.freeze()

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.model.spatial_compression_ratio

    def encode(self, images: Tensor) -> Tensor:
        self._check_images(images)
        return self.model.encode(images).latent * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        return self.model.decode(latents / self.scaling_factor).sample


class KLAutoencoder(Codec):
    """KL-regularised VAE (diffusers ``AutoencoderKL``): SDXL / SD1.5, and FLUX with its shift.

    GoT (paper §5.2) uses SDXL's VAE three ways (``GenCot.generate``,
    ``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:255-293, 351``): the denoised
    latent lives in the scaled space (``decode`` divides by ``scaling_factor``), while the reference
    image and the box-mask canvases enter the UNet as the *unscaled* posterior mode (InstructPix2Pix
    convention) -- :meth:`encode_unscaled`.

    Args:
        pretrained: hub id or local folder of a diffusers pipeline or VAE (``subfolder`` inside it),
            e.g. ``stabilityai/stable-diffusion-xl-base-1.0``.
        config: ``AutoencoderKL`` kwargs instead of ``pretrained`` (tiny test/demo models).
        subfolder: folder of the VAE inside ``pretrained`` (``None`` for a bare VAE folder).
        scaling_factor: multiplies latents; ``None`` takes the model config's (SDXL 0.13025,
            SD1.5 0.18215, FLUX 0.3611).
        shift_factor: subtracted before scaling; ``None`` takes the model config's (FLUX 0.1159;
            SDXL/SD1.5 have none, i.e. 0).
        sample: draw ``z`` from the posterior instead of taking its mode (mean) in :meth:`encode`.
            diffusers' SD/SDXL training scripts sample; GoT's inference code takes the mode.
    """

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.model = load_diffusers_model(AutoencoderKL, cfg.pretrained, cfg.config, cfg.subfolder)
        config = self.model.config
        self.scaling_factor = float(config.scaling_factor if cfg.scaling_factor is None else cfg.scaling_factor)
        check_positive("autoencoder.scaling_factor", self.scaling_factor)
        self.shift_factor = float((config.shift_factor or 0.0) if cfg.shift_factor is None else cfg.shift_factor)
        self.sample = cfg.sample
        self.freeze()

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        # One 2x downsampling between consecutive encoder blocks (diffusers' pipelines' vae_scale_factor).
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def encode_unscaled(self, images: Tensor) -> Tensor:
        """Posterior mode ``[B, latent_channels, H/f, W/f]`` with no shift or scale (GoT's condition latents)."""
        self._check_images(images)
        return self.model.encode(images).latent_dist.mode()

    def encode(self, images: Tensor) -> Tensor:
        self._check_images(images)
        posterior = self.model.encode(images).latent_dist
        z = posterior.sample() if self.sample else posterior.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        return self.model.decode(latents / self.scaling_factor + self.shift_factor).sample


class IdentityCodec(Codec):
    """Latent = pixels (factor 1): lets toy runs train a denoiser directly in pixel space."""

    def __init__(self, cfg: CodecConfig | None = None) -> None:
        super().__init__()
        self.channels = 3 if cfg is None else cfg.channels

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def downsample_factor(self) -> int:
        return 1

    def encode(self, images: Tensor) -> Tensor:
        self._check_latents(images)
        return images

    def encode_unscaled(self, images: Tensor) -> Tensor:
        """The pixels themselves: with no scale, GoT's condition latents equal :meth:`encode`'s (toy GoT)."""
        return self.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        return latents


def build_codec(cfg: CodecConfig) -> Codec:
    """The codec of ``cfg.kind``."""
    codecs: dict[str, type[Codec]] = {"dc": DCAutoencoder, "kl": KLAutoencoder, "identity": IdentityCodec}
    if cfg.kind not in codecs:
        raise ConfigError(f"autoencoder kind must be one of {sorted(codecs)}, got '{cfg.kind}'")
    return codecs[cfg.kind](cfg)
