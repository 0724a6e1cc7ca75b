"""Stable Diffusion 1.5's frozen CLIP text encoder as a condition (and FLUX's pooled text projection).

SD pipelines tokenize to the tokenizer's ``model_max_length`` (77) with ``padding="max_length"``,
truncate, and cross-attend to all 77 ``last_hidden_state`` tokens with no attention mask
(``StableDiffusionPipeline.encode_prompt``; IP-Adapter's ``tutorial_train.py`` tokenizes the same
way), so the condition's mask is all True and an empty caption ``""`` is the unconditional text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from zoo.blocks.condition import Condition
from zoo.blocks.frozen import FrozenModule
from zoo.blocks.pretrained import build_tiny, require_one_source, resolve_pretrained
from zoo.blocks.tiny import tiny_clip_text_encoder


class SDTextEncoder(FrozenModule):
    """SD1.5's ``CLIPTextModel`` + ``CLIPTokenizer``, frozen: captions -> ``Condition`` ``[B, 77, 768]``.

    Args:
        pretrained: an SD1.5 pipeline folder or cached hub id holding ``text_encoder/`` and
            ``tokenizer/`` (``stable-diffusion-v1-5/stable-diffusion-v1-5``). Exclusive with ``tiny``.
        tiny: options of :func:`zoo.blocks.tiny.tiny_clip_text_encoder`, e.g. ``{"seed": 0}``.
    """

    def __init__(self, pretrained: str | None = None, tiny: dict | None = None) -> None:
        super().__init__()
        require_one_source(type(self).__name__, pretrained, tiny)
        if pretrained is not None:
            folder = resolve_pretrained(pretrained, "text_encoder")
            resolve_pretrained(pretrained, "tokenizer")
            self.model = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        else:
            self.model, self.tokenizer = build_tiny(tiny_clip_text_encoder, type(self).__name__, tiny)
        self.freeze()

    @property
    def context_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_length(self) -> int:
        """Tokens per caption after padding (SD1.5: 77)."""
        return self.tokenizer.model_max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Condition:
        """``Condition(context=last_hidden_state [B, max_length, D], mask=all True)`` of the captions."""
        tokens = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        context = self.model(tokens.input_ids.to(device)).last_hidden_state
        return Condition(context=context, mask=torch.ones(context.shape[:2], dtype=torch.bool, device=device))

    @torch.no_grad()
    def pooled(self, texts: Sequence[str]) -> Tensor:
        """CLIP's pooled output ``[B, D]`` (the end-of-text token after the final norm) of the
        captions, tokenized as :meth:`encode` does: FLUX's ``pooled_projections``
        (``FluxPipeline._get_clip_prompt_embeds``) when built from a FLUX pipeline folder."""
        tokens = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        return self.model(tokens.input_ids.to(device)).pooler_output

    def save_pretrained(self, path: str) -> None:
        """Write ``text_encoder/`` and ``tokenizer/`` so that ``SDTextEncoder(pretrained=path)`` reloads them."""
        self.model.save_pretrained(f"{path}/text_encoder")
        self.tokenizer.save_pretrained(f"{path}/tokenizer")
