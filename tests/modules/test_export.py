"""``zoo export`` / ``from_pretrained`` / ``save_pretrained`` (zoo/export.py) for every module class:
a checkpoint written by a real one-step fit becomes a folder whose module edits exactly as the
checkpoint's did, whose trained diffusers denoiser loads with diffusers itself, and bad input is one
``zoo: error:`` line with exit status 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from datamodules.samples import EditBatch
from callbacks.ema import STATE_KEY
from datamodules.toy import edit_sample
from tests.helpers.recipes import error_lines
from tests.modules import test_got, test_imgedit_e1, test_mind_edit
from tests.modules.conftest import tiny_dim_kwargs, toy_batch
from zoo.blocks.config import ConfigError
from zoo.cli import main
from zoo.modules.base import EditingModule
from zoo.modules.dim import DIMModule
from zoo.modules.got import GoTModule

MODULES: dict[str, tuple[Callable[[], EditingModule], Callable[[], EditBatch], str | None]] = {
    # name -> (a tiny module, a training batch, the diffusers class of its trained denoiser or None)
    "dim": (lambda: DIMModule(**tiny_dim_kwargs()), lambda: toy_batch(2), "SanaTransformer2DModel"),
    "got": (lambda: test_got.make(autoencoder=test_got.PIXELS, denoiser=test_got.TINY_PIXEL_UNET), lambda: toy_batch(2), "UNet2DConditionModel"),
    "mind_edit": (test_mind_edit.make, lambda: test_mind_edit.toy_batch(2), None),
    "imgedit_e1": (lambda: test_imgedit_e1.make(stage=2), lambda: test_imgedit_e1.toy_batch(2), "FluxTransformer2DModel"),
}


def fit_one_step(module: EditingModule, batch: EditBatch, path: Path) -> None:
    """One real optimiser step on ``batch``, then Lightning's checkpoint of it at ``path``."""
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(path)


def edits(module: EditingModule) -> tuple[np.ndarray, str]:
    sample = edit_sample(0, "test", 1, module.resolution)[0]
    result = module.eval().edit(sample.source, sample.instruction)
    return np.asarray(result.image), result.text


@pytest.fixture(scope="module", params=sorted(MODULES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    build, batch, diffusers_class = MODULES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    module = build()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit_one_step(module, batch(), folder / "last.ckpt")
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items()), "the step changed nothing"
    assert main(["export", str(folder / "last.ckpt"), str(folder / "export")]) == 0
    return {"module": module, "folder": folder, "out": folder / "export", "diffusers": diffusers_class, "name": request.param}


def test_from_pretrained_edits_exactly_as_the_checkpoint(exported: dict[str, Any]) -> None:
    module = exported["module"]
    again = type(module).from_pretrained(exported["out"])
    assert type(again) is type(module)
    assert not again.training
    image, text = edits(module)
    image_again, text_again = edits(again)
    assert text_again == text
    np.testing.assert_array_equal(image_again, image)
    for key, value in module.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    for name, part in module.frozen_parts.items():
        for (key, value), other in zip(part.state_dict().items(), again.frozen_parts[name].state_dict().values()):
            assert torch.equal(other, value), f"frozen {name}.{key} rebuilt differently"


def test_the_folder_holds_trainable_weights_only_a_config_and_the_bases(exported: dict[str, Any]) -> None:
    module, out = exported["module"], exported["out"]
    weights = load_file(out / "model.safetensors")
    assert set(weights) == module.trainable_state_keys()
    config = json.loads((out / "config.json").read_text())
    assert config["class_path"] == f"{type(module).__module__}.{type(module).__qualname__}"
    assert config["source"]["global_step"] == 1 and config["source"]["weights"] == "live"
    assert config["view"] == {"resolution": module.resolution, "mllm_resolution": module.mllm_resolution}
    bases = json.loads((out / "bases.json").read_text())
    assert set(bases["frozen_parts"]) == set(module.frozen_parts)
    assert "autoencoder" in bases["sources"] and "mllm" in bases["sources"]


def test_save_pretrained_writes_the_same_folder_as_export(exported: dict[str, Any]) -> None:
    module, out = exported["module"], exported["out"]
    saved = module.save_pretrained(exported["folder"] / "saved")
    first, second = load_file(out / "model.safetensors"), load_file(saved / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    exported_config, saved_config = (json.loads((f / "config.json").read_text()) for f in (out, saved))
    assert {k: v for k, v in exported_config.items() if k != "source"} == {k: v for k, v in saved_config.items() if k != "source"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in saved.iterdir())


def test_the_trained_denoiser_loads_with_diffusers_directly(exported: dict[str, Any]) -> None:
    module, out, name = exported["module"], exported["out"], exported["diffusers"]
    if name is None:  # MIND-Edit trains no diffusers model (its IP-Adapter SD1.5 side is frozen)
        assert not (out / "denoiser").exists()
        return
    import diffusers

    loaded = getattr(diffusers, name).from_pretrained(out, subfolder="denoiser")
    trained = module.denoiser.model.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_ema_flag_exports_the_ema_weights(tmp_path: Path) -> None:
    module = DIMModule(**tiny_dim_kwargs())
    fit_one_step(module, toy_batch(2), tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    ema = {n: torch.full_like(p, 0.5) for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["callbacks"][STATE_KEY] = {"weights": ema, "updates": 3, "last_step": 3, "decay": 0.999}
    torch.save(checkpoint, tmp_path / "ema.ckpt")
    assert main(["export", str(tmp_path / "ema.ckpt"), str(tmp_path / "out"), "--ema"]) == 0
    again = DIMModule.from_pretrained(tmp_path / "out")
    assert all(torch.equal(again.get_parameter(n), ema[n]) for n in trainable)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["source"]["weights"] == "ema"


def test_from_pretrained_refuses_another_class(exported: dict[str, Any]) -> None:
    other = GoTModule if exported["name"] != "got" else DIMModule
    with pytest.raises(ConfigError, match=f"not a {other.__name__}"):
        other.from_pretrained(exported["out"])
    assert type(EditingModule.from_pretrained(exported["out"])) is type(exported["module"])


def _checkpoint_of(tmp_path: Path, **changes: Any) -> Path:
    module = DIMModule(**tiny_dim_kwargs())
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    checkpoint.update(changes)
    path = tmp_path / "odd.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    "make_input, needle",
    [
        (lambda tmp: tmp / "missing", "is neither a checkpoint file nor a DeepSpeed checkpoint folder"),
        (lambda tmp: tmp, "is neither a checkpoint file nor a DeepSpeed checkpoint folder"),
        (lambda tmp: (tmp / "junk.ckpt").write_bytes(b"not a checkpoint") and tmp / "junk.ckpt", "is not a readable checkpoint"),
        (lambda tmp: _checkpoint_of(tmp, zoo_class="collections.OrderedDict"), "unknown module class 'collections.OrderedDict'"),
        (lambda tmp: _checkpoint_of(tmp, zoo_class=None), "unknown module class None"),
    ],
    ids=["missing", "plain-folder", "not-a-checkpoint", "not-a-module", "no-class"],
)
def test_bad_input_is_one_line_and_exit_2(
    make_input: Callable[[Path], Path], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_input(tmp_path)
    assert main(["export", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = error_lines(err)
    assert needle in line
    assert not (tmp_path / "out").exists()


def test_ema_flag_without_ema_state_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _checkpoint_of(tmp_path)
    assert main(["export", str(path), str(tmp_path / "out"), "--ema"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "holds no EMA weights" in line
