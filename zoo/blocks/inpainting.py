"""SD-inpainting's UNet input: the noisy latent, the mask and the latent of the masked source, concatenated.

An inpainting UNet (``stable-diffusion-v1-5/stable-diffusion-inpainting``: 9 input channels = 4
latent + 1 mask + 4 masked-image latent) is told where to draw by its input, not by blending.
diffusers' ``StableDiffusionInpaintPipeline`` (0.42, ``__call__`` and ``prepare_mask_latents``)
builds that input as:

- the mask is binarized (``>= 0.5`` -> 1; 1 = repaint, the white of the mask image);
- the masked image is the source in [-1, 1] times ``mask < 0.5`` (the region to repaint is 0),
  then VAE-encoded and scaled like any latent;
- the mask is resized to the latent size by ``F.interpolate`` (nearest);
- the UNet gets ``cat([scale_model_input(x_t), mask, masked_image_latents], dim=1)`` in every
  branch of classifier-free guidance, and nothing is blended back after a step.

:class:`~zoo.blocks.denoisers.UNetDenoiser` appends a condition after the noisy latent, so the
condition is ``cat([mask, masked_image_latents])`` (:func:`inpainting_channels`).

A plain UNet is confined to the mask by blending instead: the source is put back outside the mask
after every step (:func:`zoo.blocks.sampling.sample`'s ``keep``). :func:`source_inputs` makes that
choice for both kinds, so the module and the tiny side's sampler share it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.blocks.condition import Condition


def inpainting_condition_channels(latent_channels: int) -> int:
    """Channels an inpainting UNet takes after the noisy latent: 1 mask + the masked source's latent."""
    return latent_channels + 1


def binarize(mask: Tensor) -> Tensor:
    """diffusers' mask binarization: 1 where ``mask >= 0.5`` (repaint), else 0."""
    return (mask >= 0.5).to(mask.dtype)


def masked_source(source: Tensor, mask: Tensor) -> Tensor:
    """The source in [-1, 1] with the region to repaint set to 0: ``source * (mask < 0.5)``."""
    return source * (mask < 0.5).to(source.dtype)


def inpainting_channels(mask: Tensor, masked_latents: Tensor) -> Tensor:
    """``[B, 1 + C, h, w]``: the binarized image-size ``mask [B, 1, H, W]`` resized (nearest) to the
    latent size of ``masked_latents [B, C, h, w]`` (the codec's encoding of :func:`masked_source`), then
    the masked latents."""
    small = F.interpolate(binarize(mask.float()), size=tuple(masked_latents.shape[-2:]))
    return torch.cat([small.to(masked_latents.dtype), masked_latents], dim=1)


def source_inputs(
    condition: Condition,
    pixels: Tensor,
    mask: Tensor | None,
    encode: Callable[[Tensor], Tensor],
    latent_size: tuple[int, int],
    inpainting: bool,
) -> tuple[Condition, Tensor | None]:
    """How the source ``pixels [B, 3, H, W]`` in [-1, 1] and the edit ``mask [B, 1, H, W]`` (1 = edit,
    None = mask-free) enter sampling: the condition and the latent-size ``keep`` mask to blend with.

    - an inpainting UNet: the condition gets :func:`inpainting_channels` of the mask and the
      ``encode``-d masked source (everything masked when ``mask`` is None); nothing is blended;
    - a plain UNet: the condition is unchanged and ``keep = 1 - mask`` at ``latent_size`` (a latent
      cell touching the mask is generated), or None when mask-free.
    """
    if inpainting:
        repaint = torch.ones_like(pixels[:, :1]) if mask is None else mask
        return condition.replace(channels=inpainting_channels(repaint, encode(masked_source(pixels, repaint)))), None
    if mask is None:
        return condition, None
    return condition, (1 - F.adaptive_max_pool2d(mask.float(), tuple(latent_size))).to(pixels.dtype)
