"""Resuming a tiny DIM fit through ``zoo fit --ckpt_path``: bit-exact, configuration wins, mismatches refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from callbacks.ema import ema_weights
from tests.helpers.recipes import configs, error_lines, tiny_run_overlay, toy_edits
from tests.helpers.recorders import LRRecorder
from zoo.cli import main

STEPS = 8
"""Length of the uninterrupted run; the toy split has 6 batches per epoch, so it crosses an epoch."""


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_edits(tmp_path_factory.mktemp("toy"), train=24)


EMA_DECAY = 0.9
"""The EMA runs' decay (``recipes/ema.yaml``'s 0.9999 would leave the average at its start in 8 steps)."""


def fit_args(data: Path, run_dir: Path, workers: int = 0, ema: bool = False) -> list[str]:
    """DIM edit + tiny overlay, batch 4, checkpoints every 2 steps, in ``run_dir``; ``ema`` adds
    ``recipes/ema.yaml`` with decay :data:`EMA_DECAY`."""
    overlay = tiny_run_overlay(
        run_dir, data, max_steps=STEPS, data_args={"batch_size": 4, "num_workers": workers}, model_args={"num_inference_steps": 2}
    )
    with_ema = [*configs(["recipes/ema.yaml"]), f"--trainer.callbacks.init_args.decay={EMA_DECAY}"] if ema else []
    return [*configs(["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"]), *overlay, *with_ema, "--trainer.enable_progress_bar=false"]


def checkpoint(run_dir: Path, step: int) -> dict:
    [path] = (run_dir / "train" / "checkpoints").glob(f"epoch=*-step={step}.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert main(["fit", *fit_args(toy_data, run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted_ema(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted_ema")
    assert main(["fit", *fit_args(toy_data, run_dir, ema=True)]) == 0
    return run_dir


def assert_same_trainable_state(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not differ, f"{len(differ)} trainable tensors differ, e.g. {differ[0]}"


@pytest.mark.parametrize("stop, workers", [(4, 0), (6, 1)], ids=["mid-epoch", "epoch-end-1-worker"])
def test_stopped_and_resumed_fit_is_bit_identical(
    toy_data: Path, uninterrupted: Path, tmp_path: Path, stop: int, workers: int, recwarn: pytest.WarningsRecorder
) -> None:
    # Without the RNG in the checkpoint the weights drift from the first resumed step (measured:
    # 6.8e-4 at step 6 and 1.5e-3 at step 8 after a step-4 stop); without loaders seeded apart from
    # the global RNG, a stop at the epoch's last batch drifts (1.8e-3 two steps later).
    args = fit_args(toy_data, tmp_path, workers)
    assert main(["fit", *args, f"--trainer.max_steps={stop}"]) == 0
    saved = checkpoint(tmp_path, stop)
    assert set(saved["callbacks"]["RNGState"]["ranks"]) == {"0"}
    [path] = (tmp_path / "train" / "checkpoints").glob(f"*step={stop}.ckpt")
    assert main(["fit", *args, f"--ckpt_path={path}"]) == 0
    for step in range(stop + 2, STEPS + 1, 2):
        assert_same_trainable_state(checkpoint(uninterrupted, step), checkpoint(tmp_path, step))
    resumed, full = checkpoint(tmp_path, STEPS), checkpoint(uninterrupted, STEPS)
    assert resumed["optimizer_states"][0]["state"].keys() == full["optimizer_states"][0]["state"].keys()
    for index, state in full["optimizer_states"][0]["state"].items():
        assert all(torch.equal(value, resumed["optimizer_states"][0]["state"][index][name]) for name, value in state.items())
    assert not [w for w in recwarn if "not resumable" in str(w.message)], "the zoo's loader is resumable"


def test_stopped_and_resumed_fit_with_ema_is_bit_identical(
    toy_data: Path, uninterrupted: Path, uninterrupted_ema: Path, tmp_path: Path
) -> None:
    args = fit_args(toy_data, tmp_path, ema=True)
    assert main(["fit", *args, "--trainer.max_steps=4"]) == 0
    [path] = (tmp_path / "train" / "checkpoints").glob("*step=4.ckpt")
    assert main(["fit", *args, f"--ckpt_path={path}"]) == 0
    for step in (6, 8):
        full, resumed = checkpoint(uninterrupted_ema, step), checkpoint(tmp_path, step)
        assert_same_trainable_state(full, resumed)
        averages, resumed_averages = ema_weights(full), ema_weights(resumed)
        assert averages.keys() == resumed_averages.keys()
        differ = [k for k, v in averages.items() if not torch.equal(v, resumed_averages[k])]
        assert not differ, f"{len(differ)} averaged tensors differ after the resume, e.g. {differ[0]}"
        assert {k: resumed["callbacks"]["EMA"][k] for k in ("updates", "last_step")} == {"updates": step, "last_step": step}
    last = checkpoint(tmp_path, STEPS)
    # The tiny DIM's trainable modules hold no buffers: the checkpoint keeps exactly the averaged tensors.
    assert set(ema_weights(last)) == set(last["state_dict"])
    # The checkpoint's weights are the training weights (those of the run without EMA), the average another tensor.
    assert_same_trainable_state(checkpoint(uninterrupted, STEPS), last)
    lag = max(float((v - last["state_dict"][k]).abs().max()) for k, v in ema_weights(last).items())
    assert lag > 1e-4, f"the average at decay {EMA_DECAY} lags the weights (largest difference {lag:.3g})"


def test_resume_takes_lr_and_schedule_from_the_command_line(toy_data: Path, uninterrupted: Path, tmp_path: Path) -> None:
    args = fit_args(toy_data, tmp_path)
    assert main(["fit", *args, "--trainer.max_steps=4"]) == 0
    assert checkpoint(tmp_path, 4)["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-3  # the tiny recipe's
    LRRecorder.steps.clear()
    [path] = (tmp_path / "train" / "checkpoints").glob("*step=4.ckpt")
    changed = ["--model.init_args.optim.lr=0.123", "--model.init_args.optim.schedule=constant", "--model.init_args.optim.warmup_steps=0"]
    recorder = "--trainer.callbacks+=tests.helpers.recorders.LRRecorder"
    assert main(["fit", *args, *changed, recorder, "--trainer.max_steps=6", f"--ckpt_path={path}"]) == 0
    # The restored optimiser would have stepped with the checkpoint's warm-up lr, 1e-3 * 5/20.
    assert LRRecorder.steps == [(4, 0.123), (5, 0.123)]
    last = checkpoint(tmp_path, 6)
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == 0.123 and last["lr_schedulers"][0]["base_lrs"] == [0.123]
    saved = yaml.safe_load((tmp_path / "train" / "config.yaml").read_text())
    optim = saved["model"]["init_args"]["optim"]
    assert (optim["lr"], optim["schedule"], optim["warmup_steps"], saved["trainer"]["max_steps"]) == (0.123, "constant", 0, 6)


def test_checkpoint_of_another_module_class_is_refused_before_building(
    uninterrupted: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = checkpoint(uninterrupted, 2)
    foreign["hyper_parameters"]["_class_path"] = "zoo.modules.got.GoTModule"  # what a GoT fit records
    path = tmp_path / "got.ckpt"
    torch.save(foreign, path)
    assert main(["fit", *fit_args(toy_data, tmp_path / "run"), f"--ckpt_path={path}"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line == (
        f"zoo: error: --ckpt_path {path} was written by zoo.modules.got.GoTModule, "
        "but this configuration builds zoo.modules.dim.DIMModule"
    )
    assert not (tmp_path / "run" / "train").exists(), "refused before anything ran"


def test_checkpoint_of_another_configuration_is_refused_in_one_line(
    uninterrupted: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [path] = (uninterrupted / "train" / "checkpoints").glob("*step=2.ckpt")
    args = [*fit_args(toy_data, tmp_path), "--model.init_args.connector_hidden=32", f"--ckpt_path={path}"]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = error_lines(err)
    assert line == (
        "zoo: error: the checkpoint does not fit this DIMModule configuration: "
        "connector.net.0.bias has shape (64,) there, (32,) here (3 tensors differ in shape)"
    )
    assert not list((tmp_path / "train" / "checkpoints").glob("*.ckpt")), "refused before training"
