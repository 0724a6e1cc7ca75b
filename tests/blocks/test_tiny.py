"""The tiny-asset factory: deterministic, real classes, the families' token layouts looked up by string."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from zoo.blocks.tiny import (
    DEFAULT_SYSTEM_PROMPT,
    LLAVA_ONEVISION_SPECIAL_TOKENS,
    QWEN_SPECIAL_TOKENS,
    _bpe_json,
    tiny_llava_onevision,
    tiny_llava_onevision_config,
    tiny_llava_onevision_processor,
    tiny_qwen2_5_vl,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
    tiny_qwen_tokenizer,
)

SENTENCE = "Remove the red circle in the top left corner, then add 2 blue squares."
GOT_TOKENS = ["<|im_gen_start|>", "<|im_gen_end|>"] + [f"<|im_gen_{i:04d}|>" for i in range(64)]


def test_tokenizer_is_deterministic_and_toy_sized() -> None:
    a, b = tiny_qwen_tokenizer(), tiny_qwen_tokenizer()
    assert a(SENTENCE).input_ids == b(SENTENCE).input_ids
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert 500 <= len(a) <= 1000
    # The corpus was learned: common toy words are whole tokens, not bytes.
    assert a.tokenize(" circle") == ["Ġcircle"]
    assert a.decode(a("Größe (120,345) ✓\n\n").input_ids) == "Größe (120,345) ✓\n\n"


def test_digits_are_split_like_qwen() -> None:
    # Qwen2's pre-tokenizer keeps every digit apart; GoT box coordinates rely on it.
    assert tiny_qwen_tokenizer().tokenize("(120,345)") == ["(", "1", "2", "0", ",", "3", "4", "5", ")"]


def test_special_tokens_are_single_and_match_config_ids() -> None:
    tokenizer = tiny_qwen_tokenizer()
    for token in QWEN_SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False).input_ids
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    config = tiny_qwen2_5_vl_config(tokenizer)
    lookup = tokenizer.convert_tokens_to_ids
    assert config.image_token_id == lookup("<|image_pad|>")
    assert config.video_token_id == lookup("<|video_pad|>")
    assert config.vision_start_token_id == lookup("<|vision_start|>")
    assert config.vision_end_token_id == lookup("<|vision_end|>")
    assert config.text_config.eos_token_id == lookup("<|im_end|>") == tokenizer.eos_token_id
    assert config.text_config.pad_token_id == lookup("<|endoftext|>") == tokenizer.pad_token_id
    assert config.text_config.vocab_size == len(tokenizer)
    # Qwen's order, after the learned vocabulary.
    assert [lookup(t) for t in QWEN_SPECIAL_TOKENS] == list(range(len(tokenizer) - 11, len(tokenizer)))


def test_extra_special_tokens_append_without_moving_ids() -> None:
    plain, got = tiny_qwen_tokenizer(), tiny_qwen_tokenizer(extra_special_tokens=GOT_TOKENS)
    assert len(got) == len(plain) + 66
    assert got(SENTENCE).input_ids == plain(SENTENCE).input_ids
    for token in QWEN_SPECIAL_TOKENS:
        assert got.convert_tokens_to_ids(token) == plain.convert_tokens_to_ids(token)
    ids = got("<|im_gen_start|><|im_gen_0000|><|im_gen_0063|>", add_special_tokens=False).input_ids
    assert ids == [len(plain), len(plain) + 2, len(plain) + 65]
    with pytest.raises(ValueError, match="extra_special_tokens"):
        tiny_qwen_tokenizer(extra_special_tokens=["<|im_end|>"])


def test_chat_template_renders_qwen_format_with_default_system_prompt() -> None:
    processor = tiny_qwen2_5_vl_processor()
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Remove it."}]}
    text = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Remove it.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    system = {"role": "system", "content": "Be brief."}
    text = processor.apply_chat_template([system, user], tokenize=False, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert DEFAULT_SYSTEM_PROMPT not in text and not text.endswith("assistant\n")


@pytest.mark.parametrize("side", [16, 32, 64])
def test_image_processor_token_count(side: int) -> None:
    processor = tiny_qwen2_5_vl_processor()
    out = processor.image_processor(torch.rand(3, side, side), do_rescale=False, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, side // 4, side // 4]]
    assert processor._get_num_multimodal_tokens(image_sizes=[(side, side)])["num_image_tokens"] == [(side // 8) ** 2]


def test_config_matches_processor_and_validates() -> None:
    processor = tiny_qwen2_5_vl_processor()
    config = tiny_qwen2_5_vl_config(processor.tokenizer, hidden_size=48, num_heads=4, num_kv_heads=2)
    vision = config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (4, 2, 2)
    assert vision.out_hidden_size == config.text_config.hidden_size == 48
    assert sum(config.text_config.rope_parameters["mrope_section"]) == 48 // 4 // 2
    assert tiny_qwen2_5_vl_config(processor.tokenizer, rms_norm_eps=1e-3).text_config.rms_norm_eps == 1e-3
    with pytest.raises(ValueError, match="unknown tiny Qwen2.5-VL option"):
        tiny_qwen2_5_vl_config(processor.tokenizer, hiden_size=64)
    with pytest.raises(ValueError, match="heads"):
        tiny_qwen2_5_vl_config(processor.tokenizer, hidden_size=60, num_heads=8)


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, _ = tiny_qwen2_5_vl(seed=0)
    after = torch.rand(3)
    assert torch.equal(before, after)
    b, _ = tiny_qwen2_5_vl(seed=0)
    c, _ = tiny_qwen2_5_vl(seed=1)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["lm_head.weight"], state_c["lm_head.weight"])


def test_bpe_training_is_reproducible_not_just_cached() -> None:
    # Retrain (bypassing the cache): the Rust trainer's hash maps get fresh random keys each time,
    # so equal JSON means the merges do not depend on iteration order.
    assert len({_bpe_json.__wrapped__(768) for _ in range(3)}) == 1


# --- LLaVA-OneVision ----------------------------------------------------------------------------


def test_llava_tokenizer_has_its_special_tokens_and_config_ids_by_string() -> None:
    processor = tiny_llava_onevision_processor()
    tokenizer = processor.tokenizer
    lookup = tokenizer.convert_tokens_to_ids
    for token in LLAVA_ONEVISION_SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False).input_ids == [lookup(token)], token
    # Qwen2's order, then <image>, <video>, after the learned vocabulary (llava-hf: 151643…151647).
    assert [lookup(t) for t in LLAVA_ONEVISION_SPECIAL_TOKENS] == list(range(len(tokenizer) - 5, len(tokenizer)))
    assert tokenizer("Remove the red circle.").input_ids == tiny_qwen_tokenizer()("Remove the red circle.").input_ids
    config = tiny_llava_onevision_config(tokenizer)
    assert config.image_token_id == lookup("<image>") == processor.image_token_id
    assert config.video_token_id == lookup("<video>") == processor.video_token_id
    assert config.text_config.eos_token_id == lookup("<|im_end|>") == tokenizer.eos_token_id
    assert config.text_config.pad_token_id == lookup("<|endoftext|>") == tokenizer.pad_token_id
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.vision_config.model_type == "siglip_vision_model" and config.text_config.model_type == "qwen2"
    assert config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints == [[16, 16], [16, 32], [32, 16], [32, 32]]


def test_llava_chat_template_renders_llava_hf_format() -> None:
    processor = tiny_llava_onevision_processor()
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
    text = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user <image>\nWhat is shown?<|im_end|><|im_start|>assistant\n"
    system = {"role": "system", "content": "Be brief."}
    text = processor.apply_chat_template([system, {"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>system \nBe brief.<|im_end|><|im_start|>user \nHi<|im_end|>"


# Whole-image tile 4×4 = 16, plus the best grid's features with the aspect padding removed, plus a
# newline per feature row: 16 px → 1×1 tiles, 16 + 16 + 4; 32 px → 2×2 tiles, 16 + 64 + 8; 20×50 →
# 1×2 tiles (4×8 features; the 3.2 rows of image keep all 4), 16 + 32 + 4.
@pytest.mark.parametrize(("height", "width", "tokens"), [(16, 16, 36), (32, 32, 88), (20, 50, 52)])
def test_llava_anyres_token_count_matches_the_vision_features(height: int, width: int, tokens: int) -> None:
    model, processor = tiny_llava_onevision()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}], tokenize=False
    )
    inputs = processor(text=[prompt], images=[torch.rand(3, height, width)], do_rescale=False, return_tensors="pt")
    count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert count == tokens == processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
    with torch.no_grad():  # the model checks that the placeholders match its image features
        assert model(**inputs).logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))


def test_llava_generates_on_cpu_deterministically_and_leaves_the_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, processor = tiny_llava_onevision(seed=0)
    assert torch.equal(torch.rand(3), before)
    b, _ = tiny_llava_onevision(seed=0)
    c, _ = tiny_llava_onevision(seed=1)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["lm_head.weight"], state_c["lm_head.weight"])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = processor(text=[prompt], images=[torch.rand(3, 32, 32)], do_rescale=False, return_tensors="pt")
    output = a.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] - inputs["input_ids"].shape[1] in range(1, 5)
    assert torch.equal(b.generate(**inputs, max_new_tokens=4, do_sample=False), output)


def test_llava_config_validates() -> None:
    tokenizer = tiny_llava_onevision_processor().tokenizer
    assert tiny_llava_onevision_config(tokenizer, rms_norm_eps=1e-3).text_config.rms_norm_eps == 1e-3
    with pytest.raises(ValueError, match="unknown tiny LLaVA-OneVision option"):
        tiny_llava_onevision_config(tokenizer, hiden_size=64)
    with pytest.raises(ValueError, match="heads"):
        tiny_llava_onevision_config(tokenizer, hidden_size=60, num_heads=8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_llava_onevision_config(tokenizer, tile_size=18)
    with pytest.raises(ValueError, match="lacks the special tokens"):
        tiny_llava_onevision_config(tiny_qwen_tokenizer())


def test_whole_word_clip_tokenizer_keeps_every_toy_word_whole_and_is_deterministic() -> None:
    from datamodules.toy_scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, POSITIONS, SHAPES
    from zoo.blocks.tiny import tiny_clip_tokenizer

    words = tiny_clip_tokenizer(77, whole_words=True)
    caption = f"{' '.join(OBJECT_COLOURS)} {' '.join(BACKGROUND_COLOURS)} {' '.join(SHAPES)} {' '.join(POSITIONS)} background keep empty cell"
    tokens = words.convert_ids_to_tokens(words(caption).input_ids)[1:-1]
    assert tokens == [word + "</w>" for word in caption.split()]
    assert tiny_clip_tokenizer(77, whole_words=True).get_vocab() == words.get_vocab()
    # The default stays character-level; an unknown word still tokenizes (by pieces), nothing is lost.
    assert len(tiny_clip_tokenizer(77)("red").input_ids) == 2 + 3
    assert words.decode(words("optimized red").input_ids, skip_special_tokens=True) == "optimized red"


def test_whole_word_clip_tokenizer_gives_every_process_the_same_ids() -> None:
    # The BPE trainer orders tied merges per process; the vocabulary must not follow that order.
    script = "from zoo.blocks.tiny import tiny_clip_tokenizer; print(sorted(tiny_clip_tokenizer(77, whole_words=True).get_vocab().items()))"
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout for _ in range(3)]
    assert runs[0] and runs[0] == runs[1] == runs[2]
