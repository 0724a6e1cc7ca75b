"""DIMModule at tiny size: what trains, what is saved, that it learns, and inference entry points."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import lightning as L
import pytest
import torch
from PIL import Image

from datamodules.samples import EditBatch, EditSample, collate, signed_to_pil
from datamodules.toy import edit_sample, t2i_sample
from tests.modules.conftest import TINY_SANA, toy_batch, tiny_dim_kwargs
from zoo.blocks.config import ConfigError
from zoo.modules.base import Optimization
from zoo.modules.dim import DIMModule


def _fit(model: DIMModule, batch: EditBatch, steps: int, lr: float = 3e-3) -> list[float]:
    """Plain AdamW steps over the module's own trainable parameters on one fixed batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.training_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_only_trainable_parts_get_gradients(batch: EditBatch) -> None:
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs())
    model.train()
    model.training_loss(batch)["loss"].backward()
    assert not model.mllm.training, "the frozen MLLM must stay in eval mode"
    assert all(p.grad is None and not p.requires_grad for p in model.mllm.parameters())
    # Frozen parts live outside the module tree: not parameters, not submodules, not in the state dict.
    frozen = {id(p) for p in model.mllm.parameters()}
    assert frozen and not frozen & {id(p) for p in model.parameters()}
    assert not any(name.startswith(("mllm", "codec")) for name, _ in model.named_modules())
    assert not any(key.startswith("mllm.") for key in model.state_dict())
    for name in ("connector", "denoiser"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert grads and all(g is not None for g in grads), name


def test_dropped_conditions_train_the_null_table(batch: EditBatch) -> None:
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs(cfg_dropout=1.0))
    model.train()
    model.training_loss(batch)["loss"].backward()
    assert model.null_caption.table.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.connector.parameters())


def test_connector_only_warmup_freezes_the_dit(batch: EditBatch) -> None:
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs(train_denoiser=False))
    model.train()
    model.training_loss(batch)["loss"].backward()
    assert all(p.grad is None for p in model.denoiser.parameters())
    assert all(p.grad is not None for p in model.connector.parameters())


def test_frozen_mllm_is_absent_from_optimizer_and_checkpoint(tmp_path, batch: EditBatch) -> None:
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs(optim=Optimization(lr=1e-3)))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    model.trainer = trainer
    optimizer = model.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.mllm.parameters()}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}

    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert not any(k.startswith("mllm.") for k in keys)
    assert {k for k in keys if k.startswith("connector.")} == {k for k in model.state_dict() if k.startswith("connector.")}
    assert any(k.startswith("denoiser.") for k in keys) and "null_caption.table" in keys

    restored = DIMModule(**tiny_dim_kwargs())
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(restored.state_dict()[key], value), key
    checkpoint["state_dict"].pop("connector.net.0.weight")
    with pytest.raises(ConfigError, match=r"lacks 1 trainable tensors \(first: connector.net.0.weight\)"):
        restored.on_load_checkpoint(checkpoint)


def test_loss_decreases_on_a_fixed_toy_batch() -> None:
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs(cfg_dropout=0.0))
    batch = toy_batch(size=8)
    # The flow-matching loss is noisy per step (random t, ε): compare seeded evaluations.
    def evaluate() -> float:
        with torch.random.fork_rng():
            torch.manual_seed(123)
            model.eval()
            with torch.no_grad():
                return sum(model.training_loss(batch)["loss"].item() for _ in range(4)) / 4

    before = evaluate()
    _fit(model, batch, steps=40)
    after = evaluate()
    assert after < 0.6 * before, (before, after)


def test_edit_returns_an_image_of_the_model_size_and_is_deterministic() -> None:
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs())
    model.eval()
    source = Image.new("RGB", (40, 24), (200, 30, 30))
    edited = model.edit(source, "make the background blue", blueprint=None)
    assert isinstance(edited.image, Image.Image) and edited.image.size == (16, 16) and edited.image.mode == "RGB"
    assert edited.text == "make the background blue"
    again = model.edit(source, "make the background blue")
    assert list(edited.image.getdata()) == list(again.image.getdata())
    other = model.edit(source, "remove the red square")
    assert list(edited.image.getdata()) != list(other.image.getdata())


def test_edit_sees_a_non_square_image_exactly_as_training_does() -> None:
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs())
    model.eval()
    wide = Image.new("RGB", (48, 16), (255, 255, 255))
    wide.paste((220, 40, 40), (0, 0, 16, 16))  # a red left third: cropped away by the training view
    wide.paste((40, 80, 220), (16, 0, 32, 16))
    training = collate([EditSample(key="0", source=wide, instruction="x")], model.resolution, model.mllm_resolution)
    inference = model.inference_batch([wide], ["x"])
    assert torch.equal(inference.source, training.source) and torch.equal(inference.mllm_image, training.mllm_image)
    blue = torch.tensor([40, 80, 220]).view(3, 1, 1) / 127.5 - 1
    assert torch.allclose(training.source[0], blue.expand(3, 16, 16), atol=1e-6), "the centre crop is the blue middle third"
    generator = torch.Generator().manual_seed(model.eval_seed)
    expected = model.edit_batch(training, generator)[0][0]
    assert list(model.edit(wide, "x").image.getdata()) == list(signed_to_pil(expected).getdata())


def test_edit_mode_requires_the_source_and_t2i_generates() -> None:
    torch.manual_seed(0)
    t2i = DIMModule(**tiny_dim_kwargs(mode="t2i"))
    image = t2i.generate("a red circle at the top left").image
    assert image.size == (16, 16)
    with pytest.raises(ValueError, match="mode='edit'"):
        t2i.edit(Image.new("RGB", (16, 16)), "x")
    edit = DIMModule(**tiny_dim_kwargs())
    with pytest.raises(ValueError, match="needs the source image"):
        edit.training_loss(toy_batch(size=2).replace(source=None))


def test_a_sample_of_the_other_task_is_an_actionable_error() -> None:
    # DIM trains T2I, then editing: a black T2I "source" must never be trained or sampled as an edit.
    torch.manual_seed(0)
    edit, t2i = DIMModule(**tiny_dim_kwargs()), DIMModule(**tiny_dim_kwargs(mode="t2i"))
    mixed = collate([edit_sample(0, "train", 0, 16)[0], t2i_sample(0, "train", 1, 16)[0]], 16, 16)
    with pytest.raises(ValueError, match=r"edit-mode DIMModule got text-to-image samples \['train_000001'\].*edit-only split"):
        edit.training_loss(mixed)
    with pytest.raises(ValueError, match=r"t2i-mode DIMModule got edit samples \['train_000000'\].*text-to-image split"):
        t2i.training_loss(mixed)
    with pytest.raises(ValueError, match="edit-mode DIMModule got text-to-image samples"):
        edit.edit_batch(collate([t2i_sample(0, "train", 0, 16)[0]], 16, 16))
    with pytest.raises(ValueError, match="t2i-mode DIMModule got edit samples"):
        t2i.edit_batch(toy_batch(size=2))


def test_blueprint_is_the_condition_when_present(caplog: pytest.LogCaptureFixture) -> None:
    model = DIMModule(**tiny_dim_kwargs())
    batch = toy_batch(size=2)
    assert model.condition_text(batch) == batch.blueprint and model.instruction_fallbacks == 0
    batch.blueprint = ["", batch.blueprint[1]]
    assert model.condition_text(batch) == [batch.instruction[0], batch.blueprint[1]]
    with caplog.at_level(logging.WARNING, logger="zoo.modules.dim"):
        model.edit_batch(batch, torch.Generator().manual_seed(0))  # reads condition_text twice
        model.edit_batch(batch, torch.Generator().manual_seed(0))
    # The fallback is counted once per conditioned sample and announced once, with its count.
    [warning] = [r.getMessage() for r in caplog.records if "no blueprint" in r.getMessage()]
    assert "1 of 2 samples" in warning and model.instruction_fallbacks == 2
    with caplog.at_level(logging.INFO):
        model.teardown("test")  # the stage's end gives the total
    assert "use_blueprint: 2 samples so far had no blueprint (and no designer)" in caplog.text
    plain = DIMModule(**tiny_dim_kwargs(use_blueprint=False))
    plain.edit_batch(batch, torch.Generator().manual_seed(0))
    assert plain.condition_text(batch) == batch.instruction and plain.instruction_fallbacks == 0


def test_stage_two_starts_from_a_t2i_checkpoint_with_widened_input(tmp_path) -> None:
    torch.manual_seed(0)
    t2i = DIMModule(**tiny_dim_kwargs(mode="t2i"))
    checkpoint = {"state_dict": t2i.state_dict()}
    t2i.on_save_checkpoint(checkpoint)
    path = tmp_path / "t2i.ckpt"
    torch.save(checkpoint, path)

    edit = DIMModule(**tiny_dim_kwargs(mode="edit", denoiser=replace(TINY_SANA, zero_init_condition=True), init_from=str(path)))
    old = t2i.denoiser.model.patch_embed.proj.weight
    new = edit.denoiser.model.patch_embed.proj.weight
    assert new.shape[1] == 2 * old.shape[1]
    assert torch.equal(new[:, : old.shape[1]], old)
    assert torch.equal(new[:, old.shape[1] :], torch.zeros_like(new[:, old.shape[1] :]))
    assert torch.equal(edit.connector.net[0].weight, t2i.connector.net[0].weight)
    with pytest.raises(Exception, match="does not exist"):
        DIMModule(**tiny_dim_kwargs(init_from=str(tmp_path / "missing.ckpt")))


def test_designer_writes_the_blueprint_for_samples_without_one(caplog: pytest.LogCaptureFixture) -> None:
    from tests.helpers.openai_server import OpenAIServer, completion
    from zoo.blocks.designer import DesignerConfig

    blueprint = (
        "1. Edit Instruction: recolour the square.\n2. Global Layout Perception: one square.\n"
        "3. Local Object Perception: a red square.\n4. Edit Area Localization: the centre.\n"
        "5. Edited Image Imagination: a blue square."
    )
    batch = toy_batch(size=2)
    batch.blueprint = ["", batch.blueprint[1]]
    with OpenAIServer(completion(blueprint)) as server:
        config = DesignerConfig(base_url=server.base_url, model="gpt-4o-2024-11-20", api_key_env=None)
        model = DIMModule(**tiny_dim_kwargs(designer=config))
        model.eval()
        edited, texts = model.edit_batch(batch, generator=torch.Generator().manual_seed(0))
    assert texts == [blueprint, batch.blueprint[1]]
    assert edited.shape == batch.source.shape
    (request,) = server.requests
    content = request.body["messages"][-1]["content"]
    assert any(part.get("type") == "image_url" for part in content)
    assert batch.instruction[0] in json.dumps(content)
    # The stage ends with the designer's summary line.
    with caplog.at_level("INFO"):
        model.teardown("test")
    assert re.search(r"designer: 1 blueprints in \d+\.\d s \(.+/s\), 0 fell back to the raw instruction", caplog.text)


def test_ddp_and_ema_copies_see_only_what_trains(tmp_path) -> None:
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs())
    # An EMA / WeightAveraging copy shares the frozen MLLM and codec instead of duplicating them.
    averaged = copy.deepcopy(model)
    assert averaged.mllm is model.mllm and averaged.codec is model.codec
    assert averaged.connector is not model.connector
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        synced = {id(p) for p in wrapped.parameters()}
        assert synced == {id(p) for p in model.parameters()}
        assert not synced & {id(p) for p in model.mllm.parameters()}
        assert not any(key.startswith(("module.mllm.", "module.codec.")) for key in wrapped.state_dict())
    finally:
        dist.destroy_process_group()
