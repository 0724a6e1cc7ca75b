"""QwenVLEncoder on a tiny random Qwen2.5-VL: DIM's user-span condition, generate, freeze, reload."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.utils import output_capturing

from zoo.blocks.mllm import Images, QwenVLEncoder
from zoo.blocks.pretrained import MissingPretrainedError

REPO = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 64, "num_layers": 2, "seed": 0}
TEXTS = ["Remove the red circle.", "Add a small blue square to the left of the green star, keep the rest."]


def _encoder(**kwargs: object) -> QwenVLEncoder:
    return QwenVLEncoder(tiny=TINY, **{"max_condition_length": 64, "image_size": 32, **kwargs})


def _images(batch: int, height: int = 40, width: int = 48) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(7))


def _pads(n: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


def _span_text(encoder: QwenVLEncoder, images: Images, texts: list[str]) -> list[str]:
    inputs = encoder.build_inputs(images, texts)
    ids, span = inputs["input_ids"], inputs["user_span"]
    return [encoder.processor.tokenizer.decode(ids[b][span[b]]) for b in range(len(texts))]


def test_user_span_is_vision_block_then_instruction() -> None:
    encoder = _encoder()
    # 32 px → (32 / patch 4 / merge 2)² = 16 image tokens; nothing of system prompt or roles.
    assert _span_text(encoder, _images(2), TEXTS) == [_pads(16) + t for t in TEXTS]
    assert _span_text(encoder, None, TEXTS) == TEXTS


def test_user_span_excludes_role_header_even_when_text_starts_with_whitespace() -> None:
    encoder = _encoder()
    inputs = encoder.build_inputs(None, ["  move it"])
    tokenizer = encoder.processor.tokenizer
    decoded = tokenizer.decode(inputs["input_ids"][0][inputs["user_span"][0]])
    assert decoded == "  move it"
    first = int(inputs["user_span"][0].nonzero()[0])
    assert tokenizer.decode(inputs["input_ids"][0][:first]).endswith("<|im_start|>user\n")


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


def test_dim_resolution_gives_1369_tokens_with_qwen_patching() -> None:
    # Qwen2.5-VL-3B's published patching (14 px, merge 2, pixels 3136…12845056): 1024² → 1036² → 37².
    qwen_patching = {**TINY, "patch_size": 14, "min_pixels": 56 * 56, "max_pixels": 16384 * 28 * 28}
    encoder = QwenVLEncoder(tiny=qwen_patching, image_size=1024)
    inputs = encoder.build_inputs(_images(1, 64, 80), ["Remove the lemons."])
    assert inputs["image_grid_thw"].tolist() == [[1, 74, 74]]
    text_tokens = len(encoder.processor.tokenizer("Remove the lemons.").input_ids)
    assert int(inputs["user_span"].sum()) == 1 + 1369 + 1 + text_tokens


def test_condition_is_last_normed_state_of_the_span_zero_padded() -> None:
    encoder = _encoder()
    images = _images(1)
    states, mask = encoder.condition(images, TEXTS[:1])
    inputs = encoder.build_inputs(images, TEXTS[:1])
    span = inputs.pop("user_span")[0]
    with torch.no_grad():
        last = encoder.model.model(**inputs).last_hidden_state[0]  # after the final RMSNorm
    n = int(span.sum())
    assert states.shape == (1, 64, encoder.hidden_size) and states.dtype == torch.float32
    assert mask.dtype == torch.bool and mask[0].tolist() == [True] * n + [False] * (64 - n)
    torch.testing.assert_close(states[0, :n], last[span], rtol=0, atol=1e-6)
    assert torch.count_nonzero(states[0, n:]) == 0


def test_condition_truncates_keeping_the_last_tokens() -> None:
    full_states, full_mask = _encoder(max_condition_length=64).condition(_images(2), TEXTS)
    short_states, short_mask = _encoder(max_condition_length=8).condition(_images(2), TEXTS)
    assert short_mask.all() and short_states.shape == (2, 8, 64)
    for b in range(2):
        n = int(full_mask[b].sum())
        assert n > 8
        torch.testing.assert_close(short_states[b], full_states[b, n - 8 : n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("images", ["all", "none", "mixed"])
def test_batch_equals_each_sample_alone(images: str) -> None:
    encoder = _encoder()
    per_sample = {"all": list(_images(2)), "none": [None, None], "mixed": [None, _images(2)[1]]}[images]
    states, mask = encoder.condition(per_sample, TEXTS)
    assert mask.sum(1)[0] < mask.sum(1)[1]  # different lengths: sample 0 is right-padded
    for b in range(2):
        alone = None if per_sample[b] is None else per_sample[b][None]
        alone_states, alone_mask = encoder.condition(alone, TEXTS[b : b + 1])
        assert torch.equal(alone_mask[0], mask[b])
        torch.testing.assert_close(alone_states[0], states[b], rtol=0, atol=1e-5)
    if images == "mixed":  # only the second sample's span opens with its 16 image tokens
        assert _span_text(encoder, per_sample, TEXTS) == [TEXTS[0], _pads(16) + TEXTS[1]]


def test_tensor_and_list_of_images_give_the_same_states() -> None:
    encoder = _encoder()
    images = _images(2)
    assert torch.equal(encoder.condition(images, TEXTS)[0], encoder.condition(list(images), TEXTS)[0])


def test_frozen_by_default_and_stays_in_eval() -> None:
    encoder = _encoder()
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


def test_generate_is_bounded_greedy_and_batch_consistent() -> None:
    encoder = _encoder()
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


def test_save_pretrained_round_trip(tmp_path: object) -> None:
    encoder = _encoder()
    encoder.save_pretrained(str(tmp_path))
    reloaded = QwenVLEncoder(pretrained=str(tmp_path), max_condition_length=64, image_size=32)
    for images in (_images(2), None):
        states, mask = encoder.condition(images, TEXTS)
        states2, mask2 = reloaded.condition(images, TEXTS)
        assert torch.equal(mask, mask2) and torch.equal(states, states2)
    assert not any(p.requires_grad for p in reloaded.parameters())


# Lightning's ddp_spawn pickles the LightningModule into fresh processes, where no model was ever
# built: transformers' output-capture registration, made in PreTrainedModel.__init__, is missing there.
_UNPICKLE_AND_ENCODE = """
import pickle, sys, torch
encoder = pickle.loads(open(sys.argv[1], "rb").read())
images, texts = torch.load(sys.argv[2])
torch.save(encoder.condition(images, texts), sys.argv[3])
"""


def test_unpickled_in_a_fresh_process_gives_the_same_states(tmp_path: Path) -> None:
    encoder = _encoder()
    images = _images(2)
    # A forward first installs transformers' capture hooks (closures), which must not block pickling.
    states, mask = encoder.condition(images, TEXTS)
    (tmp_path / "encoder.pkl").write_bytes(pickle.dumps(encoder))
    torch.save((images, TEXTS), tmp_path / "inputs.pt")
    command = [sys.executable, "-c", _UNPICKLE_AND_ENCODE, *(str(tmp_path / n) for n in ("encoder.pkl", "inputs.pt", "out.pt"))]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    spawned_states, spawned_mask = torch.load(tmp_path / "out.pt")
    assert torch.equal(spawned_mask, mask)
    torch.testing.assert_close(spawned_states, states, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.condition(images, TEXTS)[0], states, rtol=0, atol=0)  # hooks come back


def test_missing_hidden_states_name_the_ddp_workaround(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _encoder()
    # What a process that never built the model sees when the registration cannot be restored.
    monkeypatch.setattr(output_capturing, "_CAN_RECORD_REGISTRY", output_capturing._CanRecordRegistry())
    with pytest.raises(RuntimeError, match="strategy 'ddp'"):
        encoder.condition(None, TEXTS)


def test_missing_pretrained_is_one_clear_error() -> None:
    with pytest.raises(MissingPretrainedError, match="does/not-exist"):
        QwenVLEncoder(pretrained="does/not-exist")


def test_bad_arguments_and_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        QwenVLEncoder()
    with pytest.raises(ValueError, match="exactly one"):
        QwenVLEncoder(pretrained="x", tiny=TINY)
    with pytest.raises(ValueError, match="torch_dtype"):
        QwenVLEncoder(tiny=TINY, torch_dtype="fp8")
    with pytest.raises(ValueError, match="unknown tiny"):
        QwenVLEncoder(tiny={"hidden_sise": 64})
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
