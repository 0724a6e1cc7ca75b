"""The typed condition a module's encoder hands its denoiser.

``encode_condition(batch) -> Condition`` is the pivot of every paper module (the data flow of
:mod:`zoo.modules.base`):
the MLLM/connector output the denoiser cross-attends to, its padding mask, a channel-concatenated
image condition (DIM's source latent, GoT's reference + box-mask latents), added conditions of the
denoiser (SDXL's pooled ``text_embeds`` + ``time_ids``, IP-Adapter image embeddings) and loss terms
computed while encoding (GoT's chain cross-entropy from the same MLLM forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class Condition:
    """Everything the denoiser is conditioned on, batch-first."""

    context: Tensor
    """``[B, L, D]`` tokens the denoiser cross-attends to."""
    mask: Tensor
    """``[B, L]`` bool, True for real tokens."""
    channels: Tensor | None = None
    """``[B, C, h, w]`` concatenated to the noisy latent along channels, or None."""
    added: dict[str, Tensor] = field(default_factory=dict)
    """Extra denoiser inputs by name, each ``[B, ...]`` (SDXL ``text_embeds``, ``time_ids``)."""
    losses: dict[str, Tensor] = field(default_factory=dict)
    """Loss terms computed while encoding (scalars), e.g. GoT's ``chain_ce``."""

    def __len__(self) -> int:
        return self.context.shape[0]

    def replace(self, **changes: object) -> Condition:
        return replace(self, **changes)

    def drop_to(self, null: Condition, p: float, generator: torch.Generator | None = None) -> tuple[Condition, Tensor]:
        """CFG dropout: each sample's whole condition replaced by ``null``'s with probability ``p``.

        SANA's ``CaptionEmbedder.token_drop`` as DIM trains with it: a dropped sample keeps its own
        mask when ``null`` carries it (DIM's null caption under the sample's padding mask). Returns
        ``(condition, dropped [B] bool)``; loss terms stay.
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p}")
        if len(null) != len(self) or null.context.shape != self.context.shape:
            raise ValueError(f"null context {tuple(null.context.shape)} must match the context {tuple(self.context.shape)}")
        draw_device = generator.device if generator is not None else "cpu"
        dropped = (torch.rand(len(self), generator=generator, device=draw_device) < p).to(self.context.device)

        def pick(kept: Tensor, empty: Tensor) -> Tensor:
            return torch.where(dropped.view(-1, *[1] * (kept.ndim - 1)), empty.to(kept.dtype), kept)

        condition = self.replace(
            context=pick(self.context, null.context),
            mask=pick(self.mask, null.mask),
            channels=None if self.channels is None else pick(self.channels, null.channels),
            added={name: pick(value, null.added[name]) for name, value in self.added.items()},
        )
        return condition, dropped

    @staticmethod
    def cat(conditions: Sequence[Condition]) -> Condition:
        """One batch of several conditions (CFG branches), in order; loss terms are dropped."""
        first = conditions[0]
        if any((c.channels is None) != (first.channels is None) or c.added.keys() != first.added.keys() for c in conditions):
            raise ValueError("conditions to batch together must have the same parts")
        return Condition(
            context=torch.cat([c.context for c in conditions]),
            mask=torch.cat([c.mask for c in conditions]),
            channels=None if first.channels is None else torch.cat([c.channels for c in conditions]),
            added={name: torch.cat([c.added[name] for c in conditions]) for name in first.added},
        )
