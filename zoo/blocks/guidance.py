"""Classifier-free guidance: learned null conditions, training-time dropout and the guided combinations.

- :class:`NullCondition`: DIM's learned null caption table (SANA ``CaptionEmbedder.y_embedding``,
  re-initialised by DIM's ``expand_context`` as ``randn(L, D) / sqrt(D)``); training-time dropout
  to it is :meth:`zoo.blocks.condition.Condition.drop_to` (``CaptionEmbedder.token_drop``).
- :func:`text_cfg`: single text CFG ``u + s (c - u)`` (DIM ``DIMDecoder.denoise``).
- :func:`got_cfg`: GoT's four-branch multi-guidance (paper §5.3;
  ``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:338-346``), and
  :func:`got_cfg_batch`, which stacks the four branches' inputs into one denoiser batch.

The guided combinations are plain functions of the branch predictions, so a sampler's ``predict``
closure batches the branches however the model needs and combines them with one of these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class GoTBranchBatch:
    """Inputs of one denoiser call for GoT's four CFG branches, stacked ``[cond, text, image, uncond]``.

    Each field has batch ``4B``; ``prediction.chunk(4)`` gives the branches in :func:`got_cfg`'s
    argument order. ``condition`` is ``[reference | mask]`` along channels, the order GoT's
    ``conv_in`` reads them after the noisy latent. ``latents`` is None when built without them.
    """

    latents: Tensor | None
    context: Tensor
    condition: Tensor
    pooled: Tensor


def _to_batch(x: Tensor, batch: int, name: str, ndim: int) -> Tensor:
    if x.ndim != ndim or x.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have {ndim} dims and batch {batch} or 1, got {tuple(x.shape)}")
    return x.expand(batch, *x.shape[1:])


def got_cfg_batch(
    latents: Tensor | None,
    context_gen: Tensor,
    context_null: Tensor,
    reference: Tensor,
    mask: Tensor,
    pooled_gen: Tensor,
    pooled_null: Tensor | None = None,
) -> GoTBranchBatch:
    """GoT's 4-way CFG batch (paper §5.3), built as ``GenCot.generate`` builds it.

    Official code: ``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:295-320``.

    ===========  =======  =======  =======  =======
    branch       cond     text     image    uncond
    ===========  =======  =======  =======  =======
    context      gen      gen      null     null
    reference    img      img      img      0
    mask         mask     0        0        0
    pooled       gen      gen      gen*     gen*
    ===========  =======  =======  =======  =======

    Dropped latents are zeros (not the encoded black canvas). The official code feeds the
    generated pooled embedding to every branch (*); ``pooled_null`` (e.g. the projector of a zero
    hidden state, like ``context_null``) replaces it in the null-context branches instead.

    Args:
        latents: noisy latents ``[B, C, h, w]`` (already ``scale_model_input``-ed); ``None`` builds
            only the conditions, once, for a sampler that stacks its latents 4 times at every step.
        context_gen: projected MLLM context ``[B, L, D]``; ``context_null``: the null one (batch B or 1).
        reference: unscaled reference latent ``[B, Cr, h, w]`` (source image, or a black image for T2I).
        mask: averaged unscaled box-mask latent ``[B, Cm, h, w]``.
        pooled_gen: SDXL ``text_embeds`` ``[B, P]``; ``pooled_null``: optional null-branch one.
        Every condition may have batch 1 to share it over the batch.
    """
    if latents is None:
        batch, spatial = max(x.shape[0] for x in (context_gen, reference, mask, pooled_gen)), reference.shape[2:]
    elif latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got {tuple(latents.shape)}")
    else:
        batch, spatial = latents.shape[0], latents.shape[2:]
    context_gen = _to_batch(context_gen, batch, "context_gen", 3)
    context_null = _to_batch(context_null, batch, "context_null", 3)
    if context_gen.shape != context_null.shape:
        raise ValueError(f"context_gen {tuple(context_gen.shape)} and context_null {tuple(context_null.shape)} differ")
    reference = _to_batch(reference, batch, "reference", 4)
    mask = _to_batch(mask, batch, "mask", 4)
    if reference.shape[2:] != spatial or mask.shape[2:] != spatial:
        shapes = f"reference {tuple(reference.shape)} and mask {tuple(mask.shape)}"
        raise ValueError(f"{shapes} must have the latents' spatial size {tuple(spatial)}")
    pooled_gen = _to_batch(pooled_gen, batch, "pooled_gen", 2)
    pooled_null = pooled_gen if pooled_null is None else _to_batch(pooled_null, batch, "pooled_null", 2)
    no_reference, no_mask = torch.zeros_like(reference), torch.zeros_like(mask)
    return GoTBranchBatch(
        latents=None if latents is None else torch.cat([latents] * 4),
        context=torch.cat([context_gen, context_gen, context_null, context_null]),
        condition=torch.cat(
            [
                torch.cat([reference, mask], dim=1),
                torch.cat([reference, no_mask], dim=1),
                torch.cat([reference, no_mask], dim=1),
                torch.cat([no_reference, no_mask], dim=1),
            ]
        ),
        pooled=torch.cat([pooled_gen, pooled_gen, pooled_null, pooled_null]),
    )
