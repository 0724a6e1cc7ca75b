"""Classifier-free guidance: learned null conditions, training-time dropout and the guided combinations.

- :class:`NullCondition`: DIM's learned null caption table (SANA ``CaptionEmbedder.y_embedding``,
  re-initialised by DIM's ``expand_context`` as ``randn(L, D) / sqrt(D)``); ``drop`` is
  ``CaptionEmbedder.token_drop`` (whole samples replaced, padding mask kept).
- :func:`text_cfg`: single text CFG ``u + s (c - u)`` (DIM ``DIMDecoder.denoise``).
- :func:`got_cfg`: GoT's four-branch multi-guidance (official-code-facts §3A).

The guided combinations are plain functions of the branch predictions, so a sampler's ``predict``
closure batches the branches however the model needs and combines them with one of these.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class NullCondition(nn.Module):
    """A learned ``[length, dim]`` "empty caption" used for unconditional predictions.

    Args:
        length: rows of the table = the padded context length it stands in for (DIM: 8192).
        dim: width of the context (DIM: 2304, the connector output / SANA ``caption_channels``).
    """

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        if length <= 0 or dim <= 0:
            raise ValueError(f"length and dim must be positive, got length={length}, dim={dim}")
        self.table = nn.Parameter(torch.randn(length, dim) / math.sqrt(dim))

    def null(self, batch_size: int, length: int | None = None) -> Tensor:
        """The null context for ``batch_size`` samples, ``[B, length, dim]``.

        ``length`` (default: the whole table) takes the first rows, for contexts padded only to the
        batch's longest sample: under the padding mask this equals DIM's full-length null caption.
        """
        rows = self.table.shape[0] if length is None else length
        if not 0 < rows <= self.table.shape[0]:
            raise ValueError(f"length must be in [1, {self.table.shape[0]}] (the null table's rows), got {rows}")
        return self.table[:rows].unsqueeze(0).expand(batch_size, -1, -1)

    def drop(self, context: Tensor, p: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Replace each sample's whole context by the null table with probability ``p``.

        The context mask is left as it is (DIM behaviour): a dropped sample attends the first
        rows of the null table that its real tokens occupied. Returns ``(context, dropped [B] bool)``.
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p}")
        max_length, dim = self.table.shape
        if context.ndim != 3 or context.shape[2] != dim or context.shape[1] > max_length:
            raise ValueError(f"context must be [B, L <= {max_length}, {dim}], got {tuple(context.shape)}")
        draw_device = generator.device if generator is not None else "cpu"
        dropped = (torch.rand(context.shape[0], generator=generator, device=draw_device) < p).to(context.device)
        null = self.null(context.shape[0], context.shape[1]).to(context.dtype)
        return torch.where(dropped.view(-1, 1, 1), null, context), dropped


def text_cfg(pred_uncond: Tensor, pred_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``u + scale * (c - u)``; scale 1 gives the conditional prediction."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def got_cfg(
    eps_cond: Tensor, eps_text: Tensor, eps_image: Tensor, eps_uncond: Tensor, g: float, c: float, i: float
) -> Tensor:
    """GoT multi-guidance: ``u + g (text - image) + c (cond - text) + i (image - u)``.

    Branches (official order ``[cond, text, image, uncond]``): context ``[gen, gen, null, null]``,
    source latent ``[img, img, img, 0]``, box-mask latent ``[mask, 0, 0, 0]``. Official defaults
    ``g = 7.5`` (guidance_scale), ``c = 4.0`` (cond_image_guidance_scale), ``i = 1.0``
    (image_guidance_scale).
    """
    return eps_uncond + g * (eps_text - eps_image) + c * (eps_cond - eps_text) + i * (eps_image - eps_uncond)
