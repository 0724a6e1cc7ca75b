"""GoT's generation tokens and prompt templates.

The official paths below are relative to GoT's vendored copy
``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/``.

GoT (``got/processer/qwen25_vl_processor.py``, ``add_gen_token_num=64``) appends 66 special tokens
to Qwen2.5-VL's tokenizer: ``<|im_gen_start|>`` (begin of image, "BOI"), ``<|im_gen_end|>`` (end of
image) and ``<|im_gen_0000|>``…``<|im_gen_0063|>``, the 64 placeholders whose last hidden states
condition SDXL. In the published tokenizer they take ids 151665, 151666 and 151667…151730: the ids
right after Qwen2.5's last added token (``<|file_sep|>`` = 151664), in that order.
:func:`add_got_tokens` reproduces that order on any tokenizer and returns the ids looked up by
string, so nothing downstream hard-codes them.

The prompt templates are part of GoT's trained input format (``got_model.py`` L155-162) and are
kept word for word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

GEN_START = "<|im_gen_start|>"
GEN_END = "<|im_gen_end|>"
NUM_IMAGE_TOKENS = 64
"""GoT's ``num_img_out_tokens``: placeholders whose hidden states become the SDXL condition."""

T2I_TEMPLATE = "Follow the caption to generate an image through a chain of thought process: {text}"
EDIT_TEMPLATE = "Follow the instruction to edit the given image through a chain of thought process: {text}"


def image_token(index: int) -> str:
    """The ``index``-th image placeholder, ``<|im_gen_0000|>`` style (four digits, as GoT)."""
    return f"<|im_gen_{index:04d}|>"


def got_special_tokens(num_image_tokens: int = NUM_IMAGE_TOKENS) -> list[str]:
    """GoT's added tokens in id order: start, end, then the image placeholders."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    return [GEN_START, GEN_END, *(image_token(i) for i in range(num_image_tokens))]


def got_prompt(text: str, edit: bool) -> str:
    """GoT's user prompt: the editing template when a source image is given, else the T2I one."""
    return (EDIT_TEMPLATE if edit else T2I_TEMPLATE).format(text=text)


@dataclass(frozen=True)
class GoTTokenIds:
    """Ids of GoT's tokens in one tokenizer; the image placeholders are ``image_first + k``."""

    gen_start: int
    gen_end: int
    image_first: int
    num_image_tokens: int

    @property
    def image_ids(self) -> list[int]:
        return list(range(self.image_first, self.image_first + self.num_image_tokens))

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the image placeholders (GoT: ``img_gen_start_id <= id < +64``)."""
        return (ids >= self.image_first) & (ids < self.image_first + self.num_image_tokens)


def _tokenizer(tokenizer_or_processor: PreTrainedTokenizerBase | ProcessorMixin) -> PreTrainedTokenizerBase:
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"expected a tokenizer or a processor holding one, got {type(tokenizer_or_processor).__name__}")
    return tokenizer


def got_token_ids(
    tokenizer_or_processor: PreTrainedTokenizerBase | ProcessorMixin, num_image_tokens: int = NUM_IMAGE_TOKENS
) -> GoTTokenIds:
    """Look GoT's tokens up by string; raise unless they are present, single and contiguous in order."""
    tokenizer = _tokenizer(tokenizer_or_processor)
    tokens = got_special_tokens(num_image_tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    missing = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks GoT token(s) {missing[:3]}{'…' if len(missing) > 3 else ''}; call add_got_tokens")
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(
            f"GoT tokens must have contiguous ids in the order start, end, 0000…{num_image_tokens - 1:04d} "
            f"(the model selects placeholders by id range); got {ids[:4]}…"
        )
    return GoTTokenIds(ids[0], ids[1], ids[2], num_image_tokens)


def add_got_tokens(
    tokenizer_or_processor: PreTrainedTokenizerBase | ProcessorMixin, num_image_tokens: int = NUM_IMAGE_TOKENS
) -> GoTTokenIds:
    """Add GoT's tokens (if absent) right after the tokenizer's last token and return their ids.

    Idempotent: a tokenizer saved with the tokens (GoT-6B's, or one from a previous call) is only
    checked. Adding a subset would split the id range, so partial presence is an error.
    """
    tokenizer = _tokenizer(tokenizer_or_processor)
    tokens = got_special_tokens(num_image_tokens)
    vocab = tokenizer.get_vocab()
    present = [t for t in tokens if t in vocab]
    if present and len(present) != len(tokens):
        raise ValueError(f"tokenizer has only {len(present)} of GoT's {len(tokens)} tokens; rebuild it from the base tokenizer")
    if not present:
        first = len(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
        ids = got_token_ids(tokenizer, num_image_tokens)
        if ids.gen_start != first:
            raise ValueError(f"GoT tokens landed at id {ids.gen_start}, expected {first} (right after the last token)")
        return ids
    return got_token_ids(tokenizer, num_image_tokens)


def cover_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> bool:
    """Grow the input/output embeddings when the tokenizer has ids beyond them; ``True`` if resized.

    Qwen2.5-VL's published 151936 rows already cover GoT's ids (GoT builds its LoRA model without
    resizing); a tiny model sized to its tokenizer needs the resize. New rows are drawn (mean-resizing)
    under ``seed`` in a forked RNG, so the result is deterministic and the caller's RNG untouched.
    """
    embeddings = model.get_input_embeddings().weight
    if len(tokenizer) <= embeddings.shape[0]:
        return False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # A model built on the meta device (sizing a paper-scale run) has no row statistics to draw from.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not embeddings.is_meta)
    return True
