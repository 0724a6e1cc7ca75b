"""GoTModule at tiny size: what trains, conditioning dropout, that it learns, SSGM masks, inference, checkpoints."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from datamodules.samples import EditBatch, EditSample, T2ISample, collate
from datamodules.shards import ShardDataModule
from datamodules.toy import edit_sample, t2i_sample
from datamodules.toy import main as toy_main
from tests.modules.conftest import toy_batch
from callbacks.toy_score import toy_edit_scores
from zoo.blocks.autoencoders import CodecConfig
from zoo.blocks.denoisers import UNetConfig
from zoo.blocks.got_chain import GoTLoRAConfig, GoTVLMConfig
from zoo.blocks.mllm import TinyVLMConfig
from zoo.blocks.spatial import box_mask_latents, box_pixels, parse_boxes, render_box_canvases, replace_box
from zoo.blocks.tiny import TINY_KL, TINY_SDXL_UNET
from zoo.blocks.dialogue import backtrack
from zoo.modules.got import GoTModule

TINY_MLLM = GoTVLMConfig(
    tiny=TinyVLMConfig(seed=0, hidden_size=32, num_layers=1, intermediate_size=64, vision_depth=1),
    image_size=16,
    lora=GoTLoRAConfig(r=4, lora_alpha=4),
)
TINY_UNET = UNetConfig(config=TINY_SDXL_UNET, subfolder=None)
TINY_KL_CODEC = CodecConfig("kl", config=TINY_KL, subfolder=None)
# Pixel space, as recipes/tiny/got.yaml trains the toy GoT: 3-channel UNet, identity codec.
TINY_PIXEL_UNET = UNetConfig(config=TINY_SDXL_UNET | {"sample_size": 16, "in_channels": 3, "out_channels": 3}, subfolder=None)
PIXELS = CodecConfig("identity")
CHAIN = (
    "A white background with <|object_ref_start|>circle<|object_ref_end|>"
    "<|box_start|>(100,100),(400,400)<|box_end|> (red); <|object_ref_start|>square<|object_ref_end|>"
    "<|box_start|>(500,600),(900,950)<|box_end|> (blue)."
)


def make(**overrides: Any) -> GoTModule:
    torch.manual_seed(0)
    kwargs = {"mllm": TINY_MLLM, "denoiser": TINY_UNET, "autoencoder": TINY_KL_CODEC, "num_inference_steps": 3, "max_chain_tokens": 8}
    return GoTModule(**(kwargs | overrides))


@pytest.fixture
def batch() -> EditBatch:
    return toy_batch(4, 16)


def _t2i_batch(size: int = 2) -> EditBatch:
    return collate([t2i_sample(0, "train", i, 16)[0] for i in range(size)], 16, 16)


def test_lora_projectors_and_unet_get_gradients_frozen_parts_none(batch: EditBatch) -> None:
    model = make(condition_dropout=0.0)
    model.train()
    model.training_loss(batch)["loss"].backward()
    assert model.mllm.training and not model.codec.training
    assert not any(name.startswith("codec") for name, _ in model.named_modules()), "the VAE is outside the module tree"
    assert all(p.grad is None and not p.requires_grad for p in model.codec.parameters())
    for name, p in model.mllm.named_parameters():
        trainable = ".lora_" in name or ".modules_to_save." in name
        assert p.requires_grad == trainable, name
        if not trainable:
            assert p.grad is None, name
    lora_b = [p.grad for n, p in model.mllm.named_parameters() if "language_model" in n and ".lora_B." in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)
    for part in (model.context_projector, model.pooled_projector, model.denoiser):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), type(part).__name__


def test_condition_dropout_samples_each_partial_combination_at_5_percent() -> None:
    model = make()
    model.train()
    torch.manual_seed(1)
    n = 40_000
    counts = Counter(tuple(row) for row in model.condition_keep(n).tolist())
    assert len(counts) == 8
    assert abs(counts[(True, True, True)] / n - 0.65) < 0.01
    assert all(abs(counts[c] / n - 0.05) < 0.006 for c in counts if c != (True, True, True))
    cfg = make(drop_combinations="cfg")
    cfg.train()
    counts = Counter(tuple(row) for row in cfg.condition_keep(n).tolist())
    assert set(counts) == {(True, True, True), (True, True, False), (False, True, False), (False, False, False)}
    assert abs(counts[(True, True, True)] / n - 0.85) < 0.01
    cfg.eval()
    assert cfg.condition_keep(100).all(), "no condition is dropped outside training"
    with pytest.raises(ValueError, match=r"condition_dropout × 7 combinations \('all'\) must be in \[0.0, 1.0\]"):
        make(condition_dropout=0.2)


def test_dropped_mask_latent_reaches_the_unet_as_zeros(batch: EditBatch) -> None:
    # p = 1/3 over the CFG combinations: every sample drops the mask, so the zero-initialised mask
    # channels of conv_in get no gradient, while the reference channels (kept by 2 of 3) do.
    model = make(drop_combinations="cfg", condition_dropout=1 / 3)
    model.train()
    torch.manual_seed(0)
    model.training_loss(batch)["loss"].backward()
    grad = model.denoiser.model.conv_in.weight.grad
    assert grad[:, 8:12].abs().sum() == 0
    assert grad[:, 4:8].abs().sum() > 0


def test_joint_loss_decreases_on_a_fixed_toy_batch(batch: EditBatch) -> None:
    model = make(condition_dropout=0.0)

    def evaluate() -> dict[str, float]:
        model.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            return {k: v.item() for k, v in model.training_loss(batch).items()}

    before = evaluate()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model.training_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert before["loss"] == pytest.approx(before["chain_ce"] + before["diffusion_mse"], rel=1e-5)
    assert after["chain_ce"] < 0.5 * before["chain_ce"]
    assert after["diffusion_mse"] < before["diffusion_mse"]
    assert after["loss"] < 0.6 * before["loss"]


def test_loss_weights_and_missing_chains(batch: EditBatch) -> None:
    model = make(ce_weight=0.0, condition_dropout=0.0)
    model.eval()
    terms = model.training_loss(batch)
    assert terms["loss"].item() == pytest.approx(terms["diffusion_mse"].item())
    with pytest.raises(ValueError, match="reasoning chains"):
        model.training_loss(batch.replace(chain=["", *batch.chain[1:]]))


def test_t2i_reference_is_an_encoded_black_image() -> None:
    model = make(condition_dropout=0.0)
    t2i = _t2i_batch()
    assert t2i.source is None
    black = model.codec.encode_unscaled(-torch.ones(1, 3, 16, 16))
    reference = model.reference_latent(t2i)
    torch.testing.assert_close(reference, black.expand(2, -1, -1, -1))
    assert reference.abs().sum() > 0, "a black image's latent is not the zero latent"
    assert torch.isfinite(model.training_loss(t2i)["loss"])


def _mixed_samples() -> list[EditSample | T2ISample]:
    """Edit, T2I, edit, T2I: GoT pretraining's mix of tasks in one batch."""
    return [make_sample(0, "train", i // 2, 16)[0] for i, make_sample in enumerate([edit_sample, t2i_sample] * 2)]


def _fixed_noise_loss(model: GoTModule, samples: list, rows: list[int], monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Training loss of ``samples[rows]`` where sample r always draws the same noise and timestep."""

    def noise(x0: Tensor) -> Tensor:
        return torch.randn(len(samples), *x0.shape[1:], generator=torch.Generator().manual_seed(0))[rows]

    def timesteps(batch_size: int, device: torch.device | None = None) -> Tensor:
        return torch.tensor([100, 300, 600, 900])[rows].to(device)

    monkeypatch.setattr(model.objective, "sample_noise", noise)
    monkeypatch.setattr(model.objective, "sample_timesteps", timesteps)
    with torch.no_grad():
        return {k: v.item() for k, v in model.training_loss(collate([samples[r] for r in rows], 16, 16)).items()}


def test_mixed_batch_loss_combines_the_per_sample_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make(condition_dropout=0.0).eval()
    samples = _mixed_samples()
    mixed = _fixed_noise_loss(model, samples, [0, 1, 2, 3], monkeypatch)
    alone = [_fixed_noise_loss(model, samples, [r], monkeypatch) for r in range(4)]
    # ε-MSE: mean over samples; chain CE: mean over the batch's chain tokens (+ closing <|im_gen_start|>).
    tokenizer = model.mllm.processor.tokenizer
    targets = [len(tokenizer(s.chain, add_special_tokens=False).input_ids) + 1 for s in samples]
    assert mixed["diffusion_mse"] == pytest.approx(sum(a["diffusion_mse"] for a in alone) / 4, abs=1e-5)
    assert mixed["chain_ce"] == pytest.approx(sum(n * a["chain_ce"] for n, a in zip(targets, alone)) / sum(targets), abs=1e-5)
    assert mixed["loss"] == pytest.approx(mixed["chain_ce"] + mixed["diffusion_mse"], abs=1e-5)


def test_mixed_batch_rows_are_conditioned_as_their_own_task() -> None:
    model = make().eval()
    batch = collate(_mixed_samples(), 16, 16)
    edits, t2i = toy_batch(2, 16), _t2i_batch(2)
    assert batch.task == ["edit", "t2i", "edit", "t2i"]
    with torch.no_grad():
        reference = model.reference_latent(batch)
        states = model.mllm.image_token_states(batch.mllm_images, batch.instruction, batch.chain)
        edit_states = model.mllm.image_token_states(edits.mllm_images, edits.instruction, edits.chain)
        t2i_states = model.mllm.image_token_states(t2i.mllm_images, t2i.instruction, t2i.chain)
    torch.testing.assert_close(reference[0::2], model.reference_latent(edits), rtol=0, atol=1e-5)
    torch.testing.assert_close(reference[1::2], model.reference_latent(t2i), rtol=0, atol=1e-5)
    torch.testing.assert_close(states[0::2], edit_states, rtol=0, atol=1e-5)
    torch.testing.assert_close(states[1::2], t2i_states, rtol=0, atol=1e-5)
    # A T2I row's reference is black even if a hand-built batch put an image in its source row.
    painted = batch.replace(source=batch.source.clone().fill_(0.5))
    torch.testing.assert_close(model.reference_latent(painted)[1::2], reference[1::2])
    images, _ = model.edit_batch(batch, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()


class _BatchRecorder(L.Callback):
    """Tasks and loss of every training batch."""

    def __init__(self) -> None:
        self.tasks: list[list[str]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.tasks.append(list(batch.task))
        self.losses.append(float(outputs["loss"]))


def test_fits_a_mixed_toy_shard_split(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--train", "8", "--val", "2", "--test", "2", "--resolution", "16", "--samples-per-shard", "4"]
    assert toy_main([*args, "--task", "mixed"]) == 0
    data = ShardDataModule(
        train_shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"), batch_size=4, resolution=16, mllm_resolution=16,
        shuffle_buffer=8,
    )
    model = make()
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    recorder = _BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )
    trainer.fit(model, datamodule=data)
    assert len(recorder.tasks) == 4 and all(math.isfinite(loss) for loss in recorder.losses)
    assert [sorted(a + b) for a, b in zip(recorder.tasks[::2], recorder.tasks[1::2])] == [["edit"] * 4 + ["t2i"] * 4] * 2
    assert any(set(tasks) == {"edit", "t2i"} for tasks in recorder.tasks), "the shuffle buffer mixes tasks within batches"
    moved = {name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[name])}
    assert any(".lora_B." in n for n in moved) and any(n.startswith("denoiser.") for n in moved)
    assert {"context_projector.weight", "pooled_projector.weight"} <= moved


def test_mask_latent_is_the_mean_of_per_box_canvas_latents() -> None:
    model = make()
    boxes = parse_boxes(CHAIN).boxes
    canvases = render_box_canvases(boxes, 16, 16)
    pixels = torch.stack([pil_to_tensor(c) for c in canvases])
    expected = model.codec.encode_unscaled(pixels.float() / 127.5 - 1).mean(dim=0)
    got = box_mask_latents(model.codec, [CHAIN, "no boxes here"], 16, 16)
    torch.testing.assert_close(got[0], expected)
    torch.testing.assert_close(got[1], model.codec.encode_unscaled(-torch.ones(1, 3, 16, 16))[0])


def test_pixel_space_reference_and_mask_reach_the_unet_as_exact_pixels(batch: EditBatch) -> None:
    model = make(denoiser=TINY_PIXEL_UNET, autoencoder=PIXELS, condition_dropout=0.0)
    target = batch.target
    roundtrip = model.codec.decode(model.codec.encode(target))
    assert torch.equal(roundtrip, target), "the toy GoT's codec loses nothing"
    assert toy_edit_scores((roundtrip + 1) / 2, (target + 1) / 2, batch.mask)["edit"].eq(1).all()
    channels = model.encode_condition(batch).channels
    assert channels.shape == (4, 6, 16, 16)
    reference, mask = channels.split(3, dim=1)
    assert torch.equal(reference, batch.source)
    for chain, canvas in zip(batch.chain, mask):
        boxes = parse_boxes(chain).boxes
        assert boxes, "toy chains ground every target object"
        for box in boxes:  # each box's colour, over the other boxes' black, at the box's pixels
            x1, y1, x2, y2 = (int(v) for v in box_pixels(box.box, 16, 16))
            inside = canvas[:, y1 : y2 + 1, x1 : x2 + 1]
            assert (inside > -1).any() and torch.equal(inside, inside[:, :1, :1].expand_as(inside))
        drawn = torch.stack([pil_to_tensor(c) for c in render_box_canvases(boxes, 16, 16)]).float() / 127.5 - 1
        torch.testing.assert_close(canvas, drawn.mean(dim=0), rtol=0, atol=0)
    assert torch.isfinite(model.training_loss(batch)["loss"])


def test_interactive_regeneration_follows_the_edited_chain() -> None:
    model = make().eval()
    moved = replace_box(CHAIN, 1, box=(100, 600, 500, 950))
    same, other = box_mask_latents(model.codec, [CHAIN, CHAIN, moved], 16, 16).split([2, 1])
    torch.testing.assert_close(same[0], same[1])
    assert (same[0] - other[0]).abs().max() > 1e-3, "moving a box must change the mask latent"
    with torch.no_grad():  # a trained SSGM reads the mask channels; the fresh ones are zero
        model.denoiser.model.conv_in.weight[:, 8:12].normal_(0, 0.5)
    a, b, c = (model.generate("two shapes", chain=chain) for chain in (CHAIN, moved, CHAIN))
    assert (a.text, b.text) == (CHAIN, moved), "a user chain is used as given"
    assert a.image.tobytes() == c.image.tobytes()
    assert a.image.tobytes() != b.image.tobytes()
    with pytest.raises(ValueError, match="cannot be drawn"):
        model.generate("x", chain="<|box_start|>(5,5),(1,1)<|box_end|> (red)")


def test_generate_edit_and_turns_return_chains_and_images_of_the_requested_size() -> None:
    model = make(max_chain_tokens=6).eval()
    generated = model.generate("a red circle", size=32)
    assert isinstance(generated.text, str) and isinstance(generated.image, Image.Image) and generated.image.size == (32, 32)
    assert len(model.mllm.processor.tokenizer(generated.text, add_special_tokens=False).input_ids) <= 6
    source = Image.new("RGB", (24, 16), (200, 30, 30))
    edited = model.edit(source, "make it blue")
    assert isinstance(edited.text, str) and edited.image.size == (16, 16), "the training view: shorter side resized, centre crop"
    turns = model.edit_turns(source, ["make it blue", "add a star"])
    assert len(turns) == 2 and turns[0].text == edited.text and turns[0].image.tobytes() == edited.image.tobytes()
    second = model.edit(turns[0].image, "add a star")
    assert turns[1].text == second.text and turns[1].image.tobytes() == second.image.tobytes(), "turn 2 edits turn 1's result"
    for version, start in ((0, source), (1, turns[0].image)):
        back = model.edit_turns(source, ["make it blue", "add a star", backtrack(version, "add a moon")])[2]
        alone = model.edit(start, backtrack(version, "add a moon"))
        assert back.image.tobytes() == alone.image.tobytes(), f"turn 3 goes back to version {version}"
    with pytest.raises(ValueError, match="only versions 0"):
        model.edit_turns(source, ["make it blue", "go back to the result of turn 2 and add a moon"])
    with pytest.raises(ValueError, match="multiple of 4"):
        model.generate("x", size=18)


def test_predict_outputs_carry_the_generated_chain(batch: EditBatch) -> None:
    model = make(max_chain_tokens=5).eval()
    out = model.predict_step(batch, 0)
    assert out.text == model.reason(batch) and out.text != batch.instruction
    assert out.edited.shape == (4, 3, 16, 16) and out.edited.abs().max() <= 1
    assert out.key == batch.key and out.turns == []


def test_checkpoint_keeps_lora_projectors_unet_not_base_mllm_or_vae(batch: EditBatch) -> None:
    model = make()
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert not any(k.startswith("codec.") for k in keys)
    mllm_keys = {k for k in keys if k.startswith("mllm.")}
    assert mllm_keys and all(".lora_" in k or ".modules_to_save." in k for k in mllm_keys)
    assert any(".lora_A." in k for k in mllm_keys) and any("embed_tokens.modules_to_save" in k for k in mllm_keys)
    assert {k for k in model.state_dict() if k.startswith(("context_projector.", "pooled_projector.", "denoiser."))} <= keys
    frozen = {k for k in model.state_dict() if k.startswith("mllm.") and k not in mllm_keys}
    assert any("base_layer" in k for k in frozen)

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    restored = make()
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], msg=key)
