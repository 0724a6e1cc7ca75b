"""Image codecs: pixels in [-1, 1] <-> the latent space a denoiser works in.

A :class:`Codec` has ``latent_channels``, ``downsample_factor``, ``encode`` and ``decode``; it is
frozen (no gradients, always in eval mode) because every paper in the zoo keeps its VAE frozen,
and frozen parts are reloaded from their source rather than checkpointed (DESIGN.md).

- :class:`DCAutoencoder`: diffusers ``AutoencoderDC`` (DIM / SANA: ``dc-ae-f32c32-sana-1.1``,
  ``z = ae.encode(x) * 0.41407``, ``x = ae.decode(z / 0.41407)``; official-code-facts §1A).
- :class:`KLAutoencoder`: diffusers ``AutoencoderKL`` (SDXL / SD1.5 / FLUX VAEs),
  ``z = (posterior - shift_factor) * scaling_factor``; :meth:`KLAutoencoder.encode_unscaled` is the
  raw posterior mode GoT conditions its UNet on (official-code-facts §3A).
- :class:`IdentityCodec`: latent = pixels, for toy runs in pixel space.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from diffusers import AutoencoderDC, AutoencoderKL
from torch import Tensor, nn

from zoo.blocks.pretrained import load_diffusers_model


class Codec(nn.Module, ABC):
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

    def freeze(self) -> None:
        """Stop gradients and switch to eval; :meth:`train` keeps it in eval afterwards."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Codec:
        # Lightning calls model.train() on every fit epoch; a frozen codec must stay in eval
        # (e.g. DC-AE decoder batch norms would otherwise update their running statistics).
        return super().train(False)

    def _check_images(self, images: Tensor) -> None:
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images must be [B, 3, H, W] with H and W multiples of {f}, got {tuple(images.shape)}")

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}")


class DCAutoencoder(Codec):
    """Deep-compression autoencoder (diffusers ``AutoencoderDC``), DIM/SANA's VAE.

    Args:
        pretrained: hub id or local folder of a diffusers DC-AE (``subfolder`` inside it), e.g.
            ``mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers`` with ``subfolder=None``.
        config: ``AutoencoderDC`` kwargs instead of ``pretrained`` (tiny test/demo models).
        subfolder: folder of the autoencoder inside ``pretrained``.
        scaling_factor: multiplies encoded latents (DIM hard-codes 0.41407, the DC-AE-f32c32 value);
            used instead of the value in the model's config, which tiny configs leave at 1.0.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        *,
        subfolder: str | None = "vae",
        scaling_factor: float = 0.41407,
    ) -> None:
        super().__init__()
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {scaling_factor}")
        self.model = load_diffusers_model(AutoencoderDC, pretrained, config, subfolder)
        self.scaling_factor = scaling_factor
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

    GoT (paper §5.2; official-code-facts §3A, ``GenCot.generate`` L255-293) uses SDXL's VAE three
    ways: the denoised latent lives in the scaled space (``decode`` divides by ``scaling_factor``),
    while the reference image and the box-mask canvases enter the UNet as the *unscaled* posterior
    mode (InstructPix2Pix convention) -- :meth:`encode_unscaled`.

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

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        *,
        subfolder: str | None = "vae",
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample: bool = False,
    ) -> None:
        super().__init__()
        self.model = load_diffusers_model(AutoencoderKL, pretrained, config, subfolder)
        self.scaling_factor = float(self.model.config.scaling_factor if scaling_factor is None else scaling_factor)
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")
        self.shift_factor = float((self.model.config.shift_factor or 0.0) if shift_factor is None else shift_factor)
        self.sample = sample
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

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def downsample_factor(self) -> int:
        return 1

    def encode(self, images: Tensor) -> Tensor:
        self._check_latents(images)
        return images

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        return latents


def build_codec(kind: str, **kwargs: object) -> Codec:
    """A codec from a config dict: ``{"kind": "dc" | "kl" | "identity", ...that class's kwargs}``."""
    codecs: dict[str, type[Codec]] = {"dc": DCAutoencoder, "kl": KLAutoencoder, "identity": IdentityCodec}
    if kind not in codecs:
        raise ValueError(f"autoencoder kind must be one of {sorted(codecs)}, got '{kind}'")
    return codecs[kind](**kwargs)
