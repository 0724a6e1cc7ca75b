"""GoT's reasoning chain on Qwen2.5-VL.

The official code cited below is ``got/models/got_model.py`` of GoT's vendored copy
``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/``.

:class:`GoTReasoner` is a :class:`~zoo.blocks.mllm.VLMEncoder` with GoT's 66 generation tokens
(:mod:`zoo.blocks.got_tokens`) and, by default, GoT's LoRA (:class:`GoTLoRAConfig`):

- ``generate_chain()`` writes the reasoning chain (text, ``<|box_start|>`` boxes, object refs) of the
  T2I or edit prompt up to ``<|im_gen_start|>`` (``got_model.py`` ``GenCot.generate``);
- ``image_token_states()`` runs GoT's second forward over prompt + chain + ``<|im_gen_start|>`` +
  the 64 ``<|im_gen_XXXX|>`` placeholders and returns their states (the SDXL condition,
  ``got_model.py`` L222-233);
- ``chain_loss_and_states()`` is the training forward: the chain's next-token CE and those states
  from one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor
from transformers import PreTrainedModel, ProcessorMixin

from zoo.blocks.config import ConfigError, check_range
from zoo.blocks.got_tokens import (
    GEN_START,
    NUM_IMAGE_TOKENS,
    add_got_tokens,
    cover_vocabulary,
    got_prompt,
    got_token_ids,
    image_token,
)
from zoo.blocks.mllm import Images, LoRAConfig, VLMConfig, VLMEncoder

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen's image/video placeholder tokens: the processor owns them, a reasoning chain never holds them."""


@dataclass
class GoTLoRAConfig(LoRAConfig):
    """GoT's LoRA (``llm_qwen25_vl_3b_lora.yaml``); a recipe's ``lora: {r: 8}`` keeps the other values."""

    r: int = 32
    """Rank of each adapter (GoT: 32)."""
    lora_alpha: int = 32
    """Scale numerator (GoT: 32, so the scale is 1)."""
    lora_dropout: float = 0.05
    """Dropout on the adapter input (GoT: 0.05)."""
    target_modules: list[str] | str | None = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Suffix match, as GoT's config: also hits the ViT blocks' gate/up/down_proj MLPs. A regex such
    as ``.*language_model.*\\.(q|k|v|o|gate|up|down)_proj`` restricts it to the LLM."""
    modules_to_save: list[str] | None = field(
        default_factory=lambda: ["embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm"]
    )
    """Trained in full next to the adapters (GoT's config): embeddings (the new GoT token rows), LM
    head, the decoder layers' RMSNorms."""


@dataclass
class GoTVLMConfig(VLMConfig):
    """:class:`~zoo.blocks.mllm.VLMConfig` of GoT's Qwen2.5-VL: GoT's LoRA by default, GoT's tokens."""

    lora: GoTLoRAConfig | None = field(default_factory=GoTLoRAConfig)
    """peft LoRA adapters, GoT's by default (r=32, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down,
    embeddings, LM head and RMSNorms trained in full); ``null`` = no adapters."""
    image_tokens: int = NUM_IMAGE_TOKENS
    """GoT's ``<|im_gen_XXXX|>`` placeholders whose states condition the diffusion model (GoT: 64)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("image_tokens", self.image_tokens, 1)
        if self.tiny is not None and self.tiny.family != "qwen2_5_vl":
            raise ConfigError(f"GoT's reasoner is a Qwen2.5-VL; tiny.family {self.tiny.family!r} is not")


def _add_got_tokens(processor: ProcessorMixin, model: PreTrainedModel, num_image_tokens: int) -> None:
    add_got_tokens(processor, num_image_tokens)
    cover_vocabulary(model, processor.tokenizer)


class GoTReasoner(VLMEncoder):
    """Qwen2.5-VL with GoT's generation tokens: reasoning chains and the states of the image placeholders.

    Args:
        config: :class:`GoTVLMConfig` (GoT's LoRA unless ``lora`` is ``None``).

    Attributes:
        got_ids: ids of GoT's tokens in this tokenizer (:class:`~zoo.blocks.got_tokens.GoTTokenIds`).
    """

    def __init__(self, config: GoTVLMConfig) -> None:
        # The tokens go in before peft: modules_to_save then copies the grown embeddings.
        super().__init__(config, add_tokens=partial(_add_got_tokens, num_image_tokens=config.image_tokens))
        if self.family != "qwen2_5_vl":
            raise ConfigError(f"GoT's reasoner is a Qwen2.5-VL; pretrained '{config.pretrained}' is a {self.family!r} model")
        self.got_ids = got_token_ids(self.processor, config.image_tokens)

    def _got_prompts(self, has_image: list[bool], prompts: list[str]) -> list[str]:
        # Per sample, the editing template exactly when a source image is given (got_model.py L155-162).
        texts = [got_prompt(prompt, image) for image, prompt in zip(has_image, prompts)]
        return self._prompts(has_image, texts, add_generation_prompt=True)

    def generate_chain(self, images: Images, prompts: list[str], max_new_tokens: int = 1024) -> list[str]:
        """GoT reasoning chains: greedy continuation of the T2I (no image) or edit prompt of each sample.

        Decoding stops at ``<|im_gen_start|>`` (the caller then appends the image placeholders),
        ``<|im_end|>`` or ``<|endoftext|>`` and never runs past ``max_new_tokens`` (GoT's loop only
        stops on ``<|endoftext|>`` and spins when the model ends its turn). The chain is decoded
        with special tokens kept (``<|box_start|>`` …) and the stop token removed; tokens a chain
        cannot hold are dropped, as GoT drops ``<|vision_start|>``/``<|vision_end|>``/``<|im_gen_end|>``
        from its text: vision placeholders (the processor would expand or reject them when the
        chain is read back) and GoT's image placeholders (appended by the caller).
        """
        if not prompts:
            raise ValueError("prompts must hold at least one caption or instruction")
        ids = self.got_ids
        has_image, pixels, image_kwargs = self._images(images, len(prompts))
        stops = [ids.gen_start, *self._stop_ids]
        replies = self._generate_ids(self._got_prompts(has_image, prompts), pixels, image_kwargs, max_new_tokens, stops)
        tokenizer = self.processor.tokenizer
        dropped = {ids.gen_end, *ids.image_ids, *tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))}
        chains = []
        for reply in replies:
            end = next((i for i, token in enumerate(reply) if token in stops), len(reply))
            kept = [token for token in reply[:end] if token not in dropped]
            chains.append(tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        return chains

    def _chain_forward(self, images: Images, prompts: list[str], chains: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids [B, T], final states [B, T, D], image-token states [B, 64, D] float32)``.

        The image-token states are read from ``hidden_layer`` (GoT: the last, after the final norm).
        """
        ids = self.got_ids
        if len(chains) != len(prompts):
            raise ValueError(f"got {len(chains)} chains for {len(prompts)} prompts; give one chain per prompt")
        for b, chain in enumerate(chains):
            if any(token in chain for token in VISION_TOKENS):
                raise ValueError(f"chain {b} holds a vision token ({', '.join(VISION_TOKENS)}); a chain is text, boxes and object refs")
        placeholders = GEN_START + "".join(image_token(k) for k in range(ids.num_image_tokens))
        has_image, pixels, image_kwargs = self._images(images, len(prompts))
        texts = [p + c + placeholders for p, c in zip(self._got_prompts(has_image, prompts), chains)]
        inputs = self.processor(
            text=texts, images=pixels, padding=True, padding_side="right", return_tensors="pt", **image_kwargs
        ).to(self.model.device)
        input_ids = inputs["input_ids"]
        is_image = ids.is_image(input_ids)
        expected = torch.tensor(ids.image_ids, device=input_ids.device)
        for b in range(len(texts)):
            starts = (input_ids[b] == ids.gen_start).nonzero()
            if len(starts) != 1 or not torch.equal(input_ids[b][is_image[b]], expected):
                raise ValueError(f"chain {b} contains GoT generation tokens itself; pass the text before <|im_gen_start|>")
        final, hidden = self._forward_states(inputs)
        return input_ids, final, hidden[is_image].view(len(texts), ids.num_image_tokens, -1).float()

    def image_token_states(self, images: Images, prompts: list[str], chains: list[str]) -> Tensor:
        """States at the 64 image placeholders, ``[B, 64, D]`` float32 (GoT: after the final norm).

        The second forward of GoT (``got_model.py`` L222-233): prompt + chain +
        ``<|im_gen_start|>`` + ``<|im_gen_0000|>``…; gradients flow through LoRA when enabled.
        """
        return self._chain_forward(images, prompts, chains)[2]

    def chain_loss_and_states(self, images: Images, prompts: list[str], chains: list[str]) -> tuple[Tensor, Tensor]:
        """Training forward: ``(chain next-token CE, image_token_states)`` from one pass.

        The CE averages over the chain tokens and the closing ``<|im_gen_start|>`` of the batch.
        """
        input_ids, final, states = self._chain_forward(images, prompts, chains)
        return self.reply_cross_entropy(input_ids, final, self.got_ids.gen_start), states
