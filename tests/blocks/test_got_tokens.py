"""GoT's 66 generation tokens: order, contiguity, idempotence, embedding growth; prompt templates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLProcessor

from zoo.blocks.got_tokens import (
    EDIT_TEMPLATE,
    T2I_TEMPLATE,
    add_got_tokens,
    cover_vocabulary,
    got_prompt,
    got_special_tokens,
    got_token_ids,
)
from zoo.blocks.tiny import QWEN_SPECIAL_TOKENS, tiny_qwen2_5_vl, tiny_qwen2_5_vl_processor, tiny_qwen_tokenizer


def test_tokens_are_gots_66_in_official_order() -> None:
    tokens = got_special_tokens()
    assert len(tokens) == 66
    assert tokens[:3] == ["<|im_gen_start|>", "<|im_gen_end|>", "<|im_gen_0000|>"]
    assert tokens[-1] == "<|im_gen_0063|>"


def test_added_right_after_the_last_qwen_token_contiguous_and_single() -> None:
    tokenizer = tiny_qwen_tokenizer()
    last_qwen = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS[-1])
    before = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    ids = add_got_tokens(tokenizer)
    # Official: last Qwen added token 151664 -> start 151665, end 151666, 0000 151667 … 0063 151730.
    assert (ids.gen_start - last_qwen, ids.gen_end - last_qwen, ids.image_first - last_qwen) == (1, 2, 3)
    assert ids.image_ids[-1] - last_qwen == 151730 - 151664
    lookup = [tokenizer.convert_tokens_to_ids(t) for t in got_special_tokens()]
    assert lookup == [ids.gen_start, ids.gen_end, *ids.image_ids] == list(range(last_qwen + 1, last_qwen + 67))
    text = "a <|box_start|>(1,2),(3,4)<|box_end|><|im_gen_start|><|im_gen_0007|><|im_gen_0063|>"
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert encoded[-3:] == [ids.gen_start, ids.image_first + 7, ids.image_first + 63]
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS} == before
    mask = ids.is_image(torch.tensor([ids.gen_start, ids.gen_end, ids.image_first, ids.image_first + 63, ids.image_first + 64]))
    assert mask.tolist() == [False, False, True, True, False]


def test_tiny_factory_extra_special_tokens_path_gives_the_same_ids() -> None:
    added = add_got_tokens(tiny_qwen_tokenizer())
    prebuilt = tiny_qwen_tokenizer(extra_special_tokens=got_special_tokens())
    size = len(prebuilt)
    assert add_got_tokens(prebuilt) == added == got_token_ids(prebuilt)
    assert len(prebuilt) == size  # idempotent: nothing added twice


def test_partial_or_reordered_tokens_are_rejected() -> None:
    partial = tiny_qwen_tokenizer(extra_special_tokens=got_special_tokens()[:10])
    with pytest.raises(ValueError, match="only 10 of GoT's 66"):
        add_got_tokens(partial)
    reordered = tiny_qwen_tokenizer(extra_special_tokens=got_special_tokens()[::-1])
    with pytest.raises(ValueError, match="contiguous ids in the order"):
        add_got_tokens(reordered)
    with pytest.raises(ValueError, match="lacks GoT token"):
        got_token_ids(tiny_qwen_tokenizer())


def test_processor_round_trip_keeps_the_ids(tmp_path: Path) -> None:
    processor = tiny_qwen2_5_vl_processor()
    ids = add_got_tokens(processor)
    processor.save_pretrained(tmp_path)
    assert got_token_ids(Qwen2_5_VLProcessor.from_pretrained(tmp_path)) == ids


def test_cover_vocabulary_grows_a_tiny_model_deterministically() -> None:
    grown = []
    for _ in range(2):
        model, processor = tiny_qwen2_5_vl(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
        rows = model.get_input_embeddings().weight.shape[0]
        add_got_tokens(processor)
        state = torch.random.get_rng_state()
        assert cover_vocabulary(model, processor.tokenizer)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) == rows + 66
        assert model.get_output_embeddings().weight.shape[0] == rows + 66
        assert model.config.text_config.vocab_size == rows + 66
        assert not cover_vocabulary(model, processor.tokenizer)
        grown.append(model.get_input_embeddings().weight[rows:].detach())
    assert torch.equal(grown[0], grown[1])


def test_prompt_templates_are_gots_wording() -> None:
    assert got_prompt("a cat", edit=False) == "Follow the caption to generate an image through a chain of thought process: a cat"
    assert got_prompt("remove the hat", edit=True) == (
        "Follow the instruction to edit the given image through a chain of thought process: remove the hat"
    )
    assert T2I_TEMPLATE.count("{text}") == EDIT_TEMPLATE.count("{text}") == 1
