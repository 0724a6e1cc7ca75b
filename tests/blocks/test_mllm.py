"""VLMEncoder on tiny random Qwen2.5-VL and LLaVA-OneVision: user-span condition of a chosen layer,
generate, freeze, reload through the Auto classes, pickling into a fresh process, typed options."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn
from transformers import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.utils import output_capturing

from zoo.blocks.config import ConfigError
from zoo.blocks.mllm import Images, TinyVLMConfig, VLMConfig, VLMEncoder
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.tiny import tiny_clip, tiny_llava_onevision, tiny_qwen2_5_vl

REPO = Path(__file__).resolve().parents[2]
QWEN = TinyVLMConfig(hidden_size=64, num_layers=2, seed=0)
LLAVA = TinyVLMConfig(family="llava_onevision", hidden_size=64, num_layers=2, seed=0)
FAMILIES = {"qwen2_5_vl": QWEN, "llava_onevision": LLAVA}
LENGTH = 128
TEXTS = ["Remove the red circle.", "Add a small blue square to the left of the green star, keep the rest."]
# Image tokens of a 32 px image: Qwen (32 / patch 4 / merge 2)² = 16; LLaVA-OneVision's anyres on
# 16 px tiles of 4 px patches: whole-image tile 16 + 2×2 grid (8×8 = 64) + 8 row newlines = 88.
IMAGE_BLOCK = {
    "qwen2_5_vl": "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>",
    "llava_onevision": "<image>" * 88 + "\n",
}


def _encoder(tiny: TinyVLMConfig = QWEN, **kwargs: object) -> VLMEncoder:
    return VLMEncoder(VLMConfig(tiny=tiny, **{"max_condition_length": LENGTH, "image_size": 32, **kwargs}))


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def _images(batch: int, height: int = 40, width: int = 48) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(7))


def _pads(n: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


def _span_text(encoder: VLMEncoder, images: Images, texts: list[str]) -> list[str]:
    inputs = encoder.build_inputs(images, texts)
    ids, span = inputs["input_ids"], inputs["user_span"]
    return [encoder.processor.tokenizer.decode(ids[b][span[b]]) for b in range(len(texts))]


def _reference_hidden_states(encoder: VLMEncoder, images: Images, texts: list[str]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """transformers' own ``output_hidden_states=True`` forward (what the encoder did before) and the span."""
    inputs = encoder.build_inputs(images, texts)
    span = inputs.pop("user_span")
    with torch.no_grad():
        out = encoder.model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states, span


def test_user_span_is_image_block_then_instruction(family: str) -> None:
    encoder = _encoder(FAMILIES[family])
    # Nothing of system prompt or role header, never <|im_end|>.
    assert _span_text(encoder, _images(2), TEXTS) == [IMAGE_BLOCK[family] + t for t in TEXTS]
    assert _span_text(encoder, None, TEXTS) == TEXTS


def test_user_span_excludes_role_header_even_when_text_starts_with_whitespace(family: str) -> None:
    encoder = _encoder(FAMILIES[family])
    inputs = encoder.build_inputs(None, ["  move it"])
    tokenizer = encoder.processor.tokenizer
    decoded = tokenizer.decode(inputs["input_ids"][0][inputs["user_span"][0]])
    assert decoded == "  move it"
    first = int(inputs["user_span"][0].nonzero()[0])
    # LLaVA-OneVision's template separates header and text with "\n", which is not the text.
    header = {"qwen2_5_vl": "<|im_start|>user\n", "llava_onevision": "<|im_start|>user \n"}[family]
    assert tokenizer.decode(inputs["input_ids"][0][:first]).endswith(header)


def test_build_inputs_right_pads_a_batch() -> None:
    inputs = _encoder().build_inputs(None, TEXTS)
    mask = inputs["attention_mask"]
    assert mask[0, -1] == 0 and mask[1].all()
    assert not (inputs["user_span"] & ~mask.bool()).any()


@pytest.mark.parametrize(("image_size", "side"), [(16, 16), (30, 32), (64, 64)])
def test_image_token_count_follows_image_size(image_size: int, side: int) -> None:
    # 30 is rounded by smart_resize to the 8 px grid (32), as DIM's 1024 becomes 1036.
    encoder = _encoder(image_size=image_size)
    inputs = encoder.build_inputs(_images(1, 50, 20), ["x"])
    assert int((inputs["input_ids"] == encoder.model.config.image_token_id).sum()) == (side // 4 // 2) ** 2
    assert inputs["image_grid_thw"].tolist() == [[1, side // 4, side // 4]]


def test_llava_image_size_squashes_before_anyres_tiling() -> None:
    encoder = _encoder(LLAVA, image_size=16)
    inputs = encoder.build_inputs(_images(1, 50, 20), ["x"])
    # 16 px is one tile: whole-image tile 16 + 1×1 grid 16 + 4 row newlines, whatever the source aspect.
    assert int((inputs["input_ids"] == encoder.model.config.image_token_id).sum()) == 36
    assert inputs["image_sizes"].tolist() == [[16, 16]]


def test_dim_resolution_gives_1369_tokens_with_qwen_patching() -> None:
    # Qwen2.5-VL-3B's published patching (14 px, merge 2, pixels 3136…12845056): 1024² → 1036² → 37².
    qwen_patching = TinyVLMConfig(hidden_size=64, num_layers=2, patch_size=14, min_pixels=56 * 56, max_pixels=16384 * 28 * 28)
    encoder = VLMEncoder(VLMConfig(tiny=qwen_patching, image_size=1024))
    inputs = encoder.build_inputs(_images(1, 64, 80), ["Remove the lemons."])
    assert inputs["image_grid_thw"].tolist() == [[1, 74, 74]]
    text_tokens = len(encoder.processor.tokenizer("Remove the lemons.").input_ids)
    assert int(inputs["user_span"].sum()) == 1 + 1369 + 1 + text_tokens


def test_condition_is_last_normed_state_of_the_span_zero_padded(family: str) -> None:
    encoder = _encoder(FAMILIES[family])
    images = _images(1)
    states, mask = encoder.condition(images, TEXTS[:1])
    hidden_states, span = _reference_hidden_states(encoder, images, TEXTS[:1])
    inputs = encoder.build_inputs(images, TEXTS[:1])
    inputs.pop("user_span")
    with torch.no_grad():
        last = encoder.model.model(**inputs).last_hidden_state[0]  # after the final RMSNorm
    n = int(span[0].sum())
    assert states.shape == (1, LENGTH, encoder.hidden_size) and states.dtype == torch.float32
    assert mask.dtype == torch.bool and mask[0].tolist() == [True] * n + [False] * (LENGTH - n)
    torch.testing.assert_close(states[0, :n], last[span[0]], rtol=0, atol=1e-6)
    # Bit for bit what transformers' output_hidden_states path gives (the encoder's former path).
    assert torch.equal(states[0, :n], hidden_states[-1][0, span[0]])
    assert torch.count_nonzero(states[0, n:]) == 0


@pytest.mark.parametrize("hidden_layer", [-4, -3, -2, -1, 0, 1, 2, 3])
def test_hidden_layer_k_is_hidden_states_k(family: str, hidden_layer: int) -> None:
    tiny = TinyVLMConfig(family=family, hidden_size=64, num_layers=3)
    images = [None, _images(2)[1]]  # a mixed batch: the hook reads both rows of the one forward
    encoder = _encoder(tiny, hidden_layer=hidden_layer)
    states, mask = encoder.condition(images, TEXTS)
    hidden_states, span = _reference_hidden_states(_encoder(tiny), images, TEXTS)
    assert len(hidden_states) == 4  # embeddings + 3 decoder layers, the last after the final norm
    for b in range(2):
        assert torch.equal(states[b, mask[b]], hidden_states[hidden_layer][b, span[b]])
    if hidden_layer not in (-1, 3):
        assert not torch.allclose(states, _encoder(tiny).condition(images, TEXTS)[0])


def test_hidden_layer_outside_the_model_is_a_config_error() -> None:
    for hidden_layer in (3, -4):  # a 2-layer LLM has hidden_states[-3 … 2]
        with pytest.raises(ConfigError, match=r"hidden_layer must be in \[-3, 2\]"):
            _encoder(hidden_layer=hidden_layer)


def test_condition_computes_no_lm_head_logits(family: str) -> None:
    encoder = _encoder(FAMILIES[family])
    calls: list[int] = []
    hook = encoder.model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    encoder.condition(_images(2), TEXTS)
    hook.remove()
    assert calls == []


def test_condition_truncates_keeping_the_last_tokens() -> None:
    full_states, full_mask = _encoder(max_condition_length=64).condition(_images(2), TEXTS)
    short_states, short_mask = _encoder(max_condition_length=8).condition(_images(2), TEXTS)
    assert short_mask.all() and short_states.shape == (2, 8, 64)
    for b in range(2):
        n = int(full_mask[b].sum())
        assert n > 8
        torch.testing.assert_close(short_states[b], full_states[b, n - 8 : n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("images", ["all", "none", "mixed"])
def test_batch_equals_each_sample_alone(family: str, images: str) -> None:
    encoder = _encoder(FAMILIES[family])
    per_sample = {"all": list(_images(2)), "none": [None, None], "mixed": [None, _images(2)[1]]}[images]
    states, mask = encoder.condition(per_sample, TEXTS)
    assert mask.sum(1)[0] < mask.sum(1)[1]  # different lengths: sample 0 is right-padded
    for b in range(2):
        alone = None if per_sample[b] is None else per_sample[b][None]
        alone_states, alone_mask = encoder.condition(alone, TEXTS[b : b + 1])
        assert torch.equal(alone_mask[0], mask[b])
        torch.testing.assert_close(alone_states[0], states[b], rtol=0, atol=1e-5)
    if images == "mixed":  # only the second sample's span opens with its image tokens
        assert _span_text(encoder, per_sample, TEXTS) == [TEXTS[0], IMAGE_BLOCK[family] + TEXTS[1]]


def test_tensor_and_list_of_images_give_the_same_states() -> None:
    encoder = _encoder()
    images = _images(2)
    assert torch.equal(encoder.condition(images, TEXTS)[0], encoder.condition(list(images), TEXTS)[0])


def test_frozen_by_default_and_stays_in_eval(family: str) -> None:
    encoder = _encoder(FAMILIES[family])
    parent = nn.ModuleDict({"mllm": encoder, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent.training and parent["head"].training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.enable_grad():
        states, _ = encoder.condition(_images(1), TEXTS[:1])
    assert not states.requires_grad


def test_unfrozen_encoder_trains_and_gets_gradients() -> None:
    encoder = _encoder(freeze=False)
    encoder.train()
    assert encoder.model.training and all(p.requires_grad for p in encoder.parameters())
    states, mask = encoder.condition(_images(1), TEXTS[:1])
    states[mask].sum().backward()
    assert encoder.model.lm_head.weight.grad is None  # the LM head is not on the condition path
    assert encoder.model.model.language_model.norm.weight.grad.abs().sum() > 0
    assert encoder.model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def test_intermediate_layer_gradients_stop_below_it() -> None:
    encoder = _encoder(freeze=False, hidden_layer=1)
    states, mask = encoder.condition(_images(1), TEXTS[:1])
    states[mask].sum().backward()
    layers = encoder.model.model.language_model.layers
    assert layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert layers[1].mlp.down_proj.weight.grad is None and encoder.model.model.language_model.norm.weight.grad is None


def test_generate_is_bounded_greedy_and_batch_consistent(family: str) -> None:
    encoder = _encoder(FAMILIES[family])
    steps: list[int] = []
    hook = encoder.model.register_forward_hook(lambda *_: steps.append(1))
    replies = encoder.generate(_images(2), ["Describe the image.", "What changed?"], max_new_tokens=6)
    hook.remove()
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert 1 <= len(steps) <= 6  # one forward per new token
    assert encoder.generate(_images(2), ["Describe the image.", "What changed?"], max_new_tokens=6) == replies
    # Left padding: the shorter prompt's reply is the same as when it runs alone.
    assert encoder.generate(_images(2)[:1], ["Describe the image."], max_new_tokens=6) == replies[:1]
    assert encoder.generate(None, ["Describe."], max_new_tokens=3)[0] != "<|im_end|>"


def test_generate_stops_at_stop_string() -> None:
    encoder = _encoder()
    prompt = ["Describe the image."]
    full = encoder.generate(_images(1), prompt, max_new_tokens=16)[0]
    stop = full[6:9]
    assert len(stop) == 3 and full.index(stop) >= 1
    cut = encoder.generate(_images(1), prompt, max_new_tokens=16, stop_strings=[stop])[0]
    assert stop in cut and full.startswith(cut) and len(cut) < len(full)


def test_save_pretrained_round_trip_through_the_auto_classes(family: str, tmp_path: Path) -> None:
    encoder = _encoder(FAMILIES[family])
    encoder.save_pretrained(str(tmp_path))
    reloaded = VLMEncoder(VLMConfig(pretrained=str(tmp_path), max_condition_length=LENGTH, image_size=32))
    classes = {
        "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
        "llava_onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor),
    }[family]
    assert (type(reloaded.model), type(reloaded.processor)) == classes and reloaded.family == family
    for images in (_images(2), None):
        states, mask = encoder.condition(images, TEXTS)
        states2, mask2 = reloaded.condition(images, TEXTS)
        assert torch.equal(mask, mask2) and torch.equal(states, states2)
    assert reloaded.generate(_images(1), TEXTS[:1], max_new_tokens=4) == encoder.generate(_images(1), TEXTS[:1], max_new_tokens=4)
    assert not any(p.requires_grad for p in reloaded.parameters())


# Lightning's ddp_spawn pickles the LightningModule into fresh processes, where no model was ever
# built: nothing registered in transformers' process-global state at model construction exists there.
_UNPICKLE_AND_ENCODE = """
import pickle, sys, torch
encoder = pickle.loads(open(sys.argv[1], "rb").read())
images, texts = torch.load(sys.argv[2])
torch.save(encoder.condition(images, texts), sys.argv[3])
"""


def _condition_in_a_fresh_process(encoder: VLMEncoder, images: Images, tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    (tmp_path / "encoder.pkl").write_bytes(pickle.dumps(encoder))
    torch.save((images, TEXTS), tmp_path / "inputs.pt")
    command = [sys.executable, "-c", _UNPICKLE_AND_ENCODE, *(str(tmp_path / n) for n in ("encoder.pkl", "inputs.pt", "out.pt"))]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("hidden_layer", [-1, 1])
def test_unpickled_in_a_fresh_process_gives_the_same_states(hidden_layer: int, tmp_path: Path) -> None:
    encoder = _encoder(hidden_layer=hidden_layer)
    images = _images(2)
    states, mask = encoder.condition(images, TEXTS)  # an encoder that has run pickles as one that has not
    spawned_states, spawned_mask = _condition_in_a_fresh_process(encoder, images, tmp_path)
    assert torch.equal(spawned_mask, mask)
    torch.testing.assert_close(spawned_states, states, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.condition(images, TEXTS)[0], states, rtol=0, atol=0)


def test_llava_unpickled_in_a_fresh_process_encodes_images(tmp_path: Path) -> None:
    encoder = _encoder(LLAVA)
    encoder.condition(None, TEXTS)  # text only: the vision tower has not run
    images = _images(2)
    states, mask = _condition_in_a_fresh_process(encoder, images, tmp_path)
    expected_states, expected_mask = encoder.condition(images, TEXTS)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(states, expected_states, rtol=0, atol=1e-6)


@pytest.mark.xfail(
    strict=True,
    raises=(AttributeError, pickle.PicklingError),
    reason="transformers 5 selects LLaVA-OneVision's vision feature layer through output-capture hooks "
    "(local closures) that it installs at the first image forward and that pickle cannot write",
)
def test_llava_that_encoded_an_image_pickles() -> None:
    encoder = _encoder(LLAVA)
    encoder.condition(_images(1), TEXTS[:1])
    pickle.dumps(encoder)


def test_encoding_needs_no_transformers_output_capture_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _encoder()
    expected = encoder.condition(_images(2), TEXTS)
    # What a process that never built the model sees (the registration is made at construction).
    monkeypatch.setattr(output_capturing, "_CAN_RECORD_REGISTRY", output_capturing._CanRecordRegistry())
    states, mask = encoder.condition(_images(2), TEXTS)
    assert torch.equal(mask, expected[1]) and torch.equal(states, expected[0])


def test_tiny_options_default_to_the_factories_models(family: str) -> None:
    model, processor = TinyVLMConfig(family=family).build()
    factory_model, factory_processor = {"qwen2_5_vl": tiny_qwen2_5_vl, "llava_onevision": tiny_llava_onevision}[family]()
    assert type(model) is type(factory_model) and model.config.to_dict() == factory_model.config.to_dict()
    state, factory_state = model.state_dict(), factory_model.state_dict()
    assert state.keys() == factory_state.keys() and all(torch.equal(state[k], factory_state[k]) for k in state)
    assert processor.tokenizer.backend_tokenizer.to_str() == factory_processor.tokenizer.backend_tokenizer.to_str()


def test_options_parse_from_a_recipe() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--mllm", type=VLMConfig)
    yaml = "mllm:\n  tiny:\n    family: llava_onevision\n    hidden_size: 32\n  hidden_layer: 1\n  lora:\n    r: 4\n"
    config = parser.instantiate(parser.parse_string(yaml)).mllm
    assert isinstance(config.tiny, TinyVLMConfig) and (config.tiny.family, config.tiny.hidden_size) == ("llava_onevision", 32)
    assert (config.hidden_layer, config.lora.r, config.lora.lora_alpha, config.lora.target_modules) == (1, 4, 8, None)


def test_missing_pretrained_is_one_clear_error() -> None:
    with pytest.raises(MissingPretrainedError, match="does/not-exist"):
        VLMEncoder(VLMConfig(pretrained="does/not-exist"))


def test_pretrained_of_another_family_is_one_clear_error(tmp_path: Path) -> None:
    model, _ = tiny_clip()
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="'clip' model; the VLM encoder serves"):
        VLMEncoder(VLMConfig(pretrained=str(tmp_path)))


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        VLMConfig()
    with pytest.raises(ConfigError, match="exactly one"):
        VLMConfig(pretrained="x", tiny=QWEN)
    with pytest.raises(ConfigError, match="torch_dtype"):
        VLMConfig(tiny=QWEN, torch_dtype="fp8")
    with pytest.raises(ConfigError, match="attn_implementation"):
        VLMConfig(tiny=QWEN, attn_implementation="flash")
    with pytest.raises(ConfigError, match="max_condition_length"):
        VLMConfig(tiny=QWEN, max_condition_length=0)
    with pytest.raises(ConfigError, match="image_size"):
        VLMConfig(tiny=QWEN, image_size=0)
    with pytest.raises(TypeError, match="hidden_sise"):
        TinyVLMConfig(hidden_sise=64)
    with pytest.raises(ConfigError, match="tiny.family"):
        TinyVLMConfig(family="gpt")
    with pytest.raises(ConfigError, match="tiny.num_layers"):
        TinyVLMConfig(num_layers=0)
    with pytest.raises(ConfigError, match="tiny.vocab_size"):
        TinyVLMConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="tiny.merge_size does not apply to family 'llava_onevision'"):
        TinyVLMConfig(family="llava_onevision", merge_size=3)
    with pytest.raises(ConfigError, match="tiny.tile_size does not apply to family 'qwen2_5_vl'"):
        TinyVLMConfig(tile_size=32)


def test_bad_inputs_are_rejected() -> None:
    encoder = _encoder()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encoder.condition(_images(1) * 2 - 1, ["x"])
    with pytest.raises(ValueError, match="one image per text"):
        encoder.condition(_images(2), ["x"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        encoder.condition(_images(1)[0], ["x"])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        encoder.condition([None, _images(1)], ["x", "y"])
    with pytest.raises(ValueError, match="nothing to condition on"):
        encoder.condition(None, ["ok", ""])
    encoder.processor.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'][-1]['text'] }}{% endfor %}"
    with pytest.raises(ValueError, match="user header"):
        encoder.build_inputs(None, ["x"])


REPLIES = ['optimized_prompt: "no red circle" negative_prompt: "red circle"', 'optimized_prompt: "blue square left of the star"']


@pytest.mark.parametrize("hidden_layer", [1, -1])
def test_reply_forward_states_are_the_condition_and_its_ce_is_the_lm_heads(family: str, hidden_layer: int) -> None:
    """Teacher forcing: the user-span states of hidden_layer are condition()'s (causal mask), and the
    CE is the LM head's next-token CE on the reply and its closing <|im_end|>."""
    tiny = TinyVLMConfig(family=family, hidden_size=64, num_layers=3)
    encoder = _encoder(tiny, hidden_layer=hidden_layer, freeze=False)
    images = [None, _images(2)[1]]
    ce, states, mask = encoder.reply_loss_and_states(images, TEXTS, REPLIES)
    with torch.no_grad():
        expected_states, expected_mask = encoder.condition(images, TEXTS)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(states, expected_states, rtol=1e-5, atol=1e-5)
    # Reference CE: the whole model's logits at the reply tokens.
    tokenizer = encoder.processor.tokenizer
    inputs = encoder.build_inputs(images, TEXTS, REPLIES)
    inputs.pop("user_span")
    with torch.no_grad():
        logits = encoder.model(**inputs, use_cache=False).logits
    losses = []
    for b, reply in enumerate(REPLIES):
        target = tokenizer(reply + "<|im_end|>", add_special_tokens=False).input_ids
        ids = inputs["input_ids"][b].tolist()
        end = max(i for i in range(len(ids) - len(target) + 1) if ids[i : i + len(target)] == target)
        losses.append(torch.nn.functional.cross_entropy(logits[b, end - 1 : end + len(target) - 1], torch.tensor(target), reduction="sum"))
        count = len(target) if b == 0 else count + len(target)
    torch.testing.assert_close(ce, torch.stack(losses).sum() / count, rtol=1e-5, atol=1e-5)
    ce.backward()
    assert all(p.grad is not None for p in encoder.model.get_output_embeddings().parameters())


def test_reply_forward_checks_its_inputs() -> None:
    encoder = _encoder()
    with pytest.raises(ValueError, match="got 1 replies for 2 texts"):
        encoder.reply_loss_and_states(None, TEXTS, REPLIES[:1])


def test_condition_ids_are_the_span_tokens_with_vision_end_after_the_image() -> None:
    encoder = _encoder(max_condition_length=64)
    images = [_images(2)[0], None]
    states, mask, ids = encoder.condition_and_ids(images, TEXTS)
    assert torch.equal(states, encoder.condition(images, TEXTS)[0])
    inputs = encoder.build_inputs(images, TEXTS)
    for b in range(2):
        assert ids[b, mask[b]].tolist() == inputs["input_ids"][b, inputs["user_span"][b]].tolist()
        assert int(ids[b, ~mask[b]].abs().sum()) == 0
    vision_end = encoder.token_id("<|vision_end|>")
    image_tokens = int((inputs["input_ids"][0] == encoder.model.config.image_token_id).sum())
    assert ids[0].tolist().index(vision_end) == 1 + image_tokens, "<|vision_start|>, the image tokens, then <|vision_end|>"
    assert vision_end not in ids[1].tolist()
    with pytest.raises(KeyError, match="no token"):
        encoder.token_id("<|no_such_token|>")
