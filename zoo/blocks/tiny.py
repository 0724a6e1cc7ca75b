"""The one factory of tiny, randomly initialised real components, built without a model hub.

No machine here reaches a model hub, so tests, tiny recipes and the demo build the real
transformers classes at toy size from this file, deterministically: the tokenizer is trained on a
fixed built-in corpus (no randomness involved) and weights are drawn from a private generator
seeded by ``seed``. Same arguments → identical tokenizer and identical ``state_dict``.

Qwen2.5-VL pieces mirror the published layout: byte-level BPE with Qwen's special-token strings
appended after the learned vocabulary (so later additions, such as GoT's 66 generation tokens,
never shift an existing id), a ``Qwen2VLImageProcessor``/``Qwen2VLVideoProcessor`` pair with a
small patch, and a chat template that renders Qwen's format, default system prompt included.
Token ids are always looked up by string, never hard-coded.

The image encoders of :mod:`zoo.blocks.vision` come from here too: CLIP with a character-level
``CLIPTokenizer`` (no merges to learn), a DINO-shaped ViT and a SigLIP vision tower.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import TypeVar

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

ModelT = TypeVar("ModelT", bound=PreTrainedModel)

# Qwen2.5's special-token strings, in Qwen's own id order (each becomes a single token).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# LLaVA-OneVision's (llava-hf) tokenizer: Qwen2's three special tokens, then its image/video placeholders.
LLAVA_ONEVISION_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# Qwen2's pre-tokenizer split: digits one by one (box coordinates stay digit-wise), letters with
# one leading non-letter, punctuation runs, newlines apart from words.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen's default system prompt, injected by its chat template when a conversation has none.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Renders Qwen2.5-VL's chat format: "<|im_start|>{role}\n{content}<|im_end|>\n" per turn, an image
# as "<|vision_start|><|image_pad|><|vision_end|>" (the processor expands the pad to the image's
# token count), the default system turn when the first message is not a system message.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Toy-edit vocabulary the BPE learns merges from (datamodules/toy.py speaks this language).
_SHAPES = "circle square triangle rectangle star heart ring cross diamond ellipse object shape"
_COLOURS = "red green blue yellow orange purple pink black white gray grey brown cyan magenta"
_POSITIONS = (
    "left right top bottom center middle corner above below behind front next to near inside "
    "outside upper lower background foreground image picture canvas area region"
)
_VERBS = (
    "add remove delete replace change turn make move put place shift resize enlarge shrink "
    "recolor recolour paint fill swap erase insert keep rotate flip extract draw edit"
)
_GLUE = (
    "the a an of with and or to in on at by from into is are it its this that new same small "
    "large big tiny size color colour style please should be no not only all one two three "
    "system user assistant you helpful describe what where how many there yes"
)
_DIM_SECTIONS = (
    "1. Edit Instruction: ",
    "2. Global Layout Perception: ",
    "3. Local Object Perception: ",
    "4. Edit Area Localization: ",
    "5. Edited Image Imagination: ",
)
_SENTENCES = (
    "Remove the red circle in the top left corner.",
    "Change the color of the blue square to green.",
    "Add a yellow star to the right of the triangle.",
    "Replace the purple heart with an orange ring.",
    "Move the black cross to the center of the image.",
    "Make the white diamond larger and put it at the bottom.",
    "Turn the background gray, keep all objects the same.",
    "The image shows two shapes: a red circle (left) and a blue square (right).",
    "Edited image: the triangle is now pink; nothing else changes!",
    "You are a helpful assistant.",
    "Box (120,340),(560,780) [red] {x: 0.25, y: 0.75} 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "Score: 4\nBrief reasoning: the edit follows the instruction? yes - mostly; 3/5 #1 @2 \"ok\" 'fine'",
)


def _corpus() -> list[str]:
    words = " ".join((_SHAPES, _COLOURS, _POSITIONS, _VERBS, _GLUE)).split()
    lines = list(_SENTENCES) + [" ".join(_DIM_SECTIONS)]
    # Every word with and without a leading space, so both byte-level forms get merged.
    lines += [" ".join(words), "\n".join(words), " ".join(w.capitalize() for w in words)]
    return lines


@lru_cache(maxsize=8)
def _bpe_json(vocab_size: int) -> str:
    # Cached as JSON so every call returns a fresh, independent tokenizer object.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer.to_str()


def tiny_qwen_tokenizer(
    vocab_size: int = 768,
    extra_special_tokens: list[str] | None = None,
    special_tokens: tuple[str, ...] = QWEN_SPECIAL_TOKENS,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the toy-edit corpus, with Qwen's special tokens appended.

    Args:
        vocab_size: target size of the learned BPE vocabulary (256 byte symbols + merges); the
            corpus supports up to about 1000.
        extra_special_tokens: further special strings appended after the family's (e.g. GoT's
            ``<|im_gen_start|>``…), each a single token; existing ids do not move.
        special_tokens: the model family's own special strings in its id order: Qwen2.5's
            (:data:`QWEN_SPECIAL_TOKENS`) or LLaVA-OneVision's Qwen2 set
            (:data:`LLAVA_ONEVISION_SPECIAL_TOKENS`); both end turns with ``<|im_end|>`` and pad
            with ``<|endoftext|>``.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    extra = list(extra_special_tokens or [])
    clash = sorted(set(extra) & set(special_tokens))
    if clash or len(set(extra)) != len(extra):
        raise ValueError(f"extra_special_tokens must be new and unique, got duplicates/the family's own: {clash or extra}")
    backend = Tokenizer.from_str(_bpe_json(vocab_size))
    # Added on the backend first so ids follow the family's order, not the wrapper's eos/pad-first order.
    specials = [*special_tokens, *extra]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def tiny_qwen2_5_vl_processor(
    vocab_size: int = 768,
    extra_special_tokens: list[str] | None = None,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 64 * 64,
) -> Qwen2_5_VLProcessor:
    """A ``Qwen2_5_VLProcessor`` for 16–64 px images: tiny tokenizer, small patches, Qwen's template.

    An image of side ``s`` (a multiple of ``patch_size * merge_size``) gives
    ``(s / patch_size / merge_size)²`` ``<|image_pad|>`` tokens, as Qwen2.5-VL's 14 px patches and
    2×2 merge do at full size.
    """
    tokenizer = tiny_qwen_tokenizer(vocab_size, extra_special_tokens)
    sizes = {"patch_size": patch_size, "merge_size": merge_size, "temporal_patch_size": temporal_patch_size}
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes, **pixels),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )


def tiny_qwen2_5_vl_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    **overrides: object,
) -> Qwen2_5_VLConfig:
    """``Qwen2_5_VLConfig`` at toy size whose token ids come from ``tokenizer``.

    The vision tower's patch/merge sizes must equal the processor's; its output width equals the
    text hidden size (the merger projects into the LLM). ``overrides`` go to the text config
    (e.g. ``rms_norm_eps``, ``max_position_embeddings``).
    """
    _check_overrides("Qwen2.5-VL", Qwen2_5_VLTextConfig, overrides)
    head_dim = _head_dim(hidden_size, num_heads)
    ids = _special_ids(tokenizer, QWEN_SPECIAL_TOKENS)
    # M-RoPE splits each head's rotary half into (temporal, height, width) sections, like
    # Qwen's [16, 24, 24] for head_dim 128.
    half = head_dim // 2
    mrope_section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    llm = (hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    text_config = _llm_options(len(tokenizer), ids, *llm, {"mrope_section": mrope_section}, overrides)
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 2 * vision_hidden_size,
        "num_heads": vision_heads,
        "patch_size": patch_size,
        "spatial_merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
        "out_hidden_size": hidden_size,
        # Windows of 2×2 merged patches, as Qwen's 112 px windows are for its 14 px patches.
        "window_size": 2 * patch_size * merge_size,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_qwen2_5_vl(
    seed: int = 0,
    vocab_size: int = 768,
    extra_special_tokens: list[str] | None = None,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 64 * 64,
    attn_implementation: str = "sdpa",
    **config: object,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` and its matching processor.

    Weights are drawn under ``torch.manual_seed(seed)`` inside a forked RNG, so the caller's
    global random state is untouched and the same seed gives the same ``state_dict``.
    ``config`` keys go to :func:`tiny_qwen2_5_vl_config` (``hidden_size``, ``num_layers``, ...).
    """
    sizes = {"patch_size": patch_size, "merge_size": merge_size, "temporal_patch_size": temporal_patch_size}
    processor = tiny_qwen2_5_vl_processor(
        vocab_size, extra_special_tokens, min_pixels=min_pixels, max_pixels=max_pixels, **sizes
    )
    model = _seeded(Qwen2_5_VLForConditionalGeneration, tiny_qwen2_5_vl_config(processor.tokenizer, **sizes, **config), seed)
    model.set_attn_implementation(attn_implementation)
    return model, processor


def _seeded(model_cls: type[ModelT], config: object, seed: int) -> ModelT:
    """``model_cls(config)`` in eval mode, weights drawn under ``seed`` in a forked RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def _check_overrides(family: str, text_config_cls: type, overrides: dict[str, object]) -> None:
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(text_config_cls)})
    if unknown:
        raise ValueError(
            f"unknown tiny {family} option(s) {unknown}: use the named arguments or {text_config_cls.__name__} fields"
        )


def _head_dim(hidden_size: int, num_heads: int) -> int:
    """Per-head width; rotary embeddings rotate pairs of channels, so it must be even."""
    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim % 2:
        raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
    return head_dim


def _llm_options(
    vocab_size: int,
    ids: dict[str, int],
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    rope: dict[str, object],
    overrides: dict[str, object],
) -> dict[str, object]:
    """Text-config options of the Qwen2-style LLM both families use, at toy size: ``<|im_end|>``
    ends a turn (eos), ``<|endoftext|>`` begins and pads; ``rope`` adds to the rotary parameters."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **rope},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        **overrides,
    }


def _special_ids(tokenizer: PreTrainedTokenizerFast, tokens: tuple[str, ...]) -> dict[str, int]:
    """Ids of ``tokens`` looked up by string; raise naming the ones the tokenizer lacks."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}
    missing = [token for token, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; build it with tiny_qwen_tokenizer")
    return ids


# --- LLaVA-OneVision (MIND-Edit): SigLIP tower, anyres tiles, Qwen2 LLM --------------------------

# Renders llava-hf's LLaVA-OneVision chat format: "<|im_start|>{role} " then the turn's images as
# "<image>" (the processor expands each to its anyres token count), videos as "<video>", each text
# as "\n{text}", then "<|im_end|>"; no default system turn, no newline between turns.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}"
    "{{ '\\n' + message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}<video>{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ '\\n' + part['text'] }}{% endfor %}"
    "{% endif %}"
    "<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _anyres_grid(tile_size: int, max_tiles: int) -> list[list[int]]:
    """``image_grid_pinpoints``: every ``(h, w)`` grid of up to ``max_tiles`` tiles a side, as the
    published 384…2304 px grid is for 384 px tiles and 6 tiles."""
    sides = [tile_size * n for n in range(1, max_tiles + 1)]
    return [[height, width] for height in sides for width in sides]


def tiny_llava_onevision_processor(
    vocab_size: int = 768,
    extra_special_tokens: list[str] | None = None,
    tile_size: int = 16,
    patch_size: int = 4,
    max_tiles: int = 2,
) -> LlavaOnevisionProcessor:
    """A ``LlavaOnevisionProcessor`` for toy images: tiny Qwen2 tokenizer, ``tile_size`` px anyres tiles.

    An image is resized to the best grid of up to ``max_tiles``² tiles plus one whole-image tile;
    each tile gives ``(tile_size / patch_size)²`` ``<image>`` tokens (published: 384 / 14 → 27² =
    729), plus one newline token per row of the grid, as LLaVA-OneVision's "anyres_max_9" does.
    """
    tokenizer = tiny_qwen_tokenizer(vocab_size, extra_special_tokens, special_tokens=LLAVA_ONEVISION_SPECIAL_TOKENS)
    # SigLIP's normalisation (mean = std = 0.5), as the published preprocessor config.
    pixels = {"size": {"height": tile_size, "width": tile_size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_grid_pinpoints=_anyres_grid(tile_size, max_tiles), **pixels),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(**pixels),
        num_image_tokens=(tile_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )


def tiny_llava_onevision_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    tile_size: int = 16,
    patch_size: int = 4,
    max_tiles: int = 2,
    **overrides: object,
) -> LlavaOnevisionConfig:
    """``LlavaOnevisionConfig`` at toy size (SigLIP vision tower, Qwen2 text model) with token ids from ``tokenizer``.

    As the published llava-onevision-qwen2 checkpoints: SigLIP without its pooling head, features
    of its last layer, all patches kept (``full``), "anyres_max_9". ``tile_size``, ``patch_size`` and
    ``max_tiles`` must equal the processor's. ``overrides`` go to the ``Qwen2Config`` text config.
    """
    _check_overrides("LLaVA-OneVision", Qwen2Config, overrides)
    _head_dim(hidden_size, num_heads)
    ids = _special_ids(tokenizer, LLAVA_ONEVISION_SPECIAL_TOKENS)
    if tile_size % patch_size:
        raise ValueError(f"tile_size {tile_size} must be a multiple of patch_size {patch_size}")
    llm = (hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    text_config = Qwen2Config(**_llm_options(len(tokenizer), ids, *llm, {}, overrides))
    vision_config = SiglipVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_depth,
        num_attention_heads=vision_heads,
        image_size=tile_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=_anyres_grid(tile_size, max_tiles),
        vision_aspect_ratio="anyres_max_9",
    )


def tiny_llava_onevision(
    seed: int = 0,
    vocab_size: int = 768,
    extra_special_tokens: list[str] | None = None,
    tile_size: int = 16,
    patch_size: int = 4,
    max_tiles: int = 2,
    attn_implementation: str = "sdpa",
    **config: object,
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A randomly initialised ``LlavaOnevisionForConditionalGeneration`` and its matching processor.

    Seeded like :func:`tiny_qwen2_5_vl`; ``config`` keys go to :func:`tiny_llava_onevision_config`.
    """
    sizes = {"tile_size": tile_size, "patch_size": patch_size, "max_tiles": max_tiles}
    processor = tiny_llava_onevision_processor(vocab_size, extra_special_tokens, **sizes)
    model_config = tiny_llava_onevision_config(processor.tokenizer, **sizes, **config)
    model = _seeded(LlavaOnevisionForConditionalGeneration, model_config, seed)
    model.set_attn_implementation(attn_implementation)
    return model, processor


# --- diffusers components (constructor kwargs of the real classes) ----------------------------

# Tiny SDXL UNet: two levels (32, 64), cross-attention on the second, context width 32, SDXL's
# "text_time" micro-conditioning with a 16-d pooled embedding: 6 * 8 + 16 = 64 projection inputs.
TINY_SDXL_UNET: dict[str, object] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 1],
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 64,
}

# Tiny SD1.5-shaped UNet in pixel space (3 channels, 32 px toy images): SD1.5's blocks at three levels
# (16, 32, 64) instead of four, context width 32, no added embedding (IP-Adapter adds its image tokens to
# the context). Cross-attention sits at the 8 px level and the mid block only (SD1.5: the three finer
# levels), because attention over 32/16 px token grids dominates a CPU step.
TINY_SD15_UNET: dict[str, object] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}

# Tiny SDXL-style AutoencoderKL: factor 2 (two blocks), 4 latent channels, SDXL's scaling factor.
TINY_KL: dict[str, object] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.13025,
}


# --- metric encoders: CLIP (CLIP-I / CLIP-T) and DINO ------------------------------------------

CLIP_SPECIAL_TOKENS: tuple[str, str] = ("<|startoftext|>", "<|endoftext|>")
"""CLIP's begin/end-of-text strings (end also pads, as in OpenAI's CLIP)."""


@lru_cache(maxsize=1)
def _word_merges() -> tuple[tuple[str, str], ...]:
    """CLIP-BPE merges (``</w>`` word ends) that make every word of the toy vocabulary one token.

    Trained by the ``tokenizers`` BPE trainer on the words themselves, with room for all of their
    merges: replaying a trained BPE on its own training words gives back its segmentation, here
    whole words (hand-made prefix merges cut one another: "e n" of "enlarge" inside "centre").
    """
    words = " ".join((_SHAPES, _COLOURS, _POSITIONS, _VERBS, _GLUE, "centre cell empty")).lower().split()
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([" ".join(sorted(set(words)))], trainer=trainer)
    return tuple(tuple(merge) for merge in json.loads(tokenizer.to_str())["model"]["merges"])


def tiny_clip_tokenizer(model_max_length: int = 77, whole_words: bool = False) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over every byte-level symbol, alone and word-final (``</w>``).

    Character-level by default: no merges, so nothing is learned or random. ``whole_words`` adds
    merges that make each word of the toy vocabulary one token, as CLIP's 49k-merge BPE makes
    common words one token (a toy caption then takes about 30 tokens instead of 130). CLIP's
    lower-casing, word split and ``<|startoftext|> … <|endoftext|>`` framing are the real tokenizer's.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = list(_word_merges()) if whole_words else []
    # Sorted: the BPE trainer orders merges of equal count differently in every process (the same set),
    # and numbering symbols in that order gave every process its own token ids for the same words.
    merged = sorted(left + right for left, right in merges)
    symbols = list(dict.fromkeys([*CLIP_SPECIAL_TOKENS, *alphabet, *(symbol + "</w>" for symbol in alphabet), *merged]))
    start, end = CLIP_SPECIAL_TOKENS
    return CLIPTokenizer(
        vocab={symbol: i for i, symbol in enumerate(symbols)},
        merges=merges,
        bos_token=start,
        eos_token=end,
        pad_token=end,
        unk_token=end,
        model_max_length=model_max_length,
    )


def _clip_tower(hidden_size: int, num_layers: int, num_heads: int) -> dict[str, int]:
    return {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
    }


def tiny_clip(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised ``CLIPModel`` (text + vision towers) and its ``CLIPProcessor``.

    The processor resizes the shorter side to ``image_size`` and centre-crops, as OpenAI's CLIP
    preprocessing does at 224 px. Weights are drawn from ``seed`` in a forked RNG.
    """
    tokenizer = tiny_clip_tokenizer()
    tower = _clip_tower(hidden_size, num_layers, num_heads)
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return _seeded(CLIPModel, config, seed), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_clip_text_encoder(
    seed: int = 0,
    max_length: int = 77,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    whole_words: bool = False,
) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A randomly initialised ``CLIPTextModel`` (SD1.5's text encoder at toy size) and its tokenizer.

    ``max_length`` is the padded context (SD1.5: 77); the character-level tokenizer spends one token
    per character, so toy captions of three objects need about 128; with ``whole_words``
    (:func:`tiny_clip_tokenizer`) about 30.
    """
    tokenizer = tiny_clip_tokenizer(max_length, whole_words)
    config = CLIPTextConfig(
        **_clip_tower(hidden_size, num_layers, num_heads),
        vocab_size=len(tokenizer),
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(CLIPTextModel, config, seed), tokenizer


def tiny_clip_image_encoder(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 32,
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """A randomly initialised ``CLIPVisionModelWithProjection`` (IP-Adapter's image encoder, ViT-H/14 at
    toy size: ``image_embeds`` of width ``projection_dim``) and a ``CLIPImageProcessor`` at ``image_size``."""
    config = CLIPVisionConfig(
        **_clip_tower(hidden_size, num_layers, num_heads),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return _seeded(CLIPVisionModelWithProjection, config, seed), processor


def tiny_dino(
    seed: int = 0, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2
) -> ViTModel:
    """A randomly initialised ``ViTModel`` shaped like DINO ViT-S/16 at toy size.

    It keeps transformers' default pooler, as ``AutoModel`` builds it from a DINO checkpoint; DINO's
    embedding is the normed CLS token, not the pooler's output.
    """
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
    )
    return _seeded(ViTModel, config, seed)


def tiny_siglip(
    seed: int = 0, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2
) -> tuple[SiglipVisionModel, SiglipImageProcessor]:
    """A randomly initialised ``SiglipVisionModel`` (ImgEdit-E1's SigLIP2-so400m-patch16-512 at toy size:
    ``(image_size / patch_size)^2`` patch tokens) and a ``SiglipImageProcessor`` at ``image_size``."""
    config = SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
    )
    processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return _seeded(SiglipVisionModel, config, seed), processor
