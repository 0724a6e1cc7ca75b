"""``recipes/ema.yaml`` through ``zoo``: it adds the EMA to any recipe, ``zoo validate`` of a checkpoint
runs on its average and puts the training weights back, and bad input is one ``zoo: error:`` line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from callbacks.ema import ema_weights
from datamodules import toy
from tests.helpers.recipes import ParseOnly, configs, error_lines, tiny_run_overlay
from zoo.cli import main
from zoo.trainer_cli import ZooCLI

OVERLAY = "recipes/ema.yaml"
PAPER_RECIPES = [
    "recipes/dim_t2i.yaml", "recipes/dim_edit_stage1.yaml", "recipes/dim_edit.yaml", "recipes/got_pretrain.yaml",
    "recipes/mind_edit.yaml", "recipes/imgedit_e1_stage1.yaml", "recipes/imgedit_e1_stage2.yaml",
]


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_overlay_appends_the_ema_to_the_recipes_callbacks(recipe: str) -> None:
    before = [c.class_path for c in ParseOnly(args=configs([recipe]), run=False).config.trainer.callbacks]
    callbacks = ParseOnly(args=configs([recipe, OVERLAY]), run=False).config.trainer.callbacks
    assert [c.class_path for c in callbacks] == [*before, "callbacks.ema.EMA"] and before
    assert vars(callbacks[-1].init_args) == {"decay": 0.9999, "every_n_steps": 1, "start_step": 0, "swap_for_eval": True, "cpu": False}


def tiny_args(data: Path, run_dir: Path) -> list[str]:
    overlay = tiny_run_overlay(run_dir, data, max_steps=4, data_args={"batch_size": 4}, model_args={"num_inference_steps": 2})
    return [*configs(["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"]), *overlay, "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(toy data, run folder) of a 4-step tiny DIM fit with the overlay at decay 0.5."""
    data, run_dir = tmp_path_factory.mktemp("toy"), tmp_path_factory.mktemp("run")
    args = ["--out", str(data), "--train", "16", "--val", "4", "--test", "4", "--seed", "0", "--resolution", "32"]
    assert toy.main([*args, "--samples-per-shard", "8", "--task", "edit"]) == 0
    assert main(["fit", *tiny_args(data, run_dir), *configs([OVERLAY]), "--trainer.callbacks.init_args.decay=0.5"]) == 0
    return data, run_dir


def validate(args: list[str]) -> tuple[float, ZooCLI]:
    cli = ZooCLI(args=["validate", *args])
    return float(cli.trainer.callback_metrics["val/loss"]), cli


def test_validate_runs_on_the_checkpoints_average_and_restores_the_training_weights(
    fitted: tuple[Path, Path], tmp_path: Path
) -> None:
    data, run_dir = fitted
    path = run_dir / "train" / "checkpoints" / "last.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    averages = ema_weights(saved)
    assert saved["callbacks"]["EMA"]["updates"] == 4 and averages.keys() <= saved["state_dict"].keys()
    with_ema, cli = validate([*tiny_args(data, tmp_path / "ema"), *configs([OVERLAY]), f"--ckpt_path={path}"])
    plain, _ = validate([*tiny_args(data, tmp_path / "plain"), f"--ckpt_path={path}"])
    # The same checkpoint with its average written over the weights, validated without the overlay.
    swapped = tmp_path / "swapped.ckpt"
    torch.save(saved | {"state_dict": saved["state_dict"] | averages}, swapped)
    by_hand, _ = validate([*tiny_args(data, tmp_path / "by_hand"), f"--ckpt_path={swapped}"])
    assert with_ema == by_hand and with_ema != plain, (with_ema, by_hand, plain)
    after = cli.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in saved["state_dict"].items()), "the training weights came back"
    assert any(not torch.equal(saved["state_dict"][k], v) for k, v in averages.items())


def test_evaluating_a_checkpoint_without_an_average_is_refused(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run_dir = fitted
    saved = torch.load(run_dir / "train" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del saved["callbacks"]["EMA"]
    path = tmp_path / "no_ema.ckpt"
    torch.save(saved, path)
    assert main(["validate", *tiny_args(data, tmp_path), *configs([OVERLAY]), f"--ckpt_path={path}"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line == (
        "zoo: error: EMA swap_for_eval: there are no averaged weights to evaluate (give --ckpt_path of a "
        "fit that ran with the EMA callback, or set swap_for_eval false)"
    )


def test_a_bad_decay_is_one_line_before_anything_runs(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*tiny_args(fitted[0], tmp_path), *configs([OVERLAY]), "--trainer.callbacks.init_args.decay=1.5"]
    assert main(["fit", *args]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line == "zoo: error: EMA decay must be in [0, 1), got 1.5"
    assert not (tmp_path / "train").exists()



def test_export_of_a_fit_with_the_overlay_writes_its_average_or_its_live_weights(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    """``zoo export --ema`` of a checkpoint ``zoo fit`` wrote with the overlay holds the EMA's average; without
    ``--ema`` the training weights (the CLI-written checkpoint, ``_class_path`` in its hyperparameters)."""
    _, run_dir = fitted
    path = run_dir / "train" / "checkpoints" / "last.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    averages = ema_weights(saved)
    assert main(["export", str(path), str(tmp_path / "ema"), "--ema"]) == 0
    assert main(["export", str(path), str(tmp_path / "live")]) == 0
    ema, live = load_file(str(tmp_path / "ema" / "model.safetensors")), load_file(str(tmp_path / "live" / "model.safetensors"))
    assert ema.keys() == live.keys() == averages.keys()
    assert all(torch.equal(ema[k], averages[k].to(ema[k].dtype)) for k in ema)
    assert all(torch.equal(live[k], saved["state_dict"][k]) for k in live)
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
