"""NaNGuard in a real tiny DIM fit: a NaN loss at step 5 stops the run with one line (or is skipped),
and no checkpoint ever holds non-finite weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.faults import FaultTable
from tests.helpers.recipes import configs, error_lines, tiny_run_overlay, toy_edits
from tests.helpers.variants import NaNAtStepDIM
from zoo.cli import main

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_edits(tmp_path_factory.mktemp("toy"), train=16)


def fit(data: Path, run_dir: Path, *extra: str) -> int:
    """A 7-step fit of :class:`NaNAtStepDIM` (batch 4), a checkpoint after every step."""
    overlay = tiny_run_overlay(
        run_dir, data, max_steps=7, data_args={"batch_size": 4}, model_args={"num_inference_steps": 2},
        checkpoint_args={"every_n_train_steps": 1},
    )
    recipes = configs(["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"])
    variant = f"--model.class_path={NaNAtStepDIM.__module__}.{NaNAtStepDIM.__name__}"
    return main(["fit", *recipes, *overlay, variant, "--trainer.enable_progress_bar=false", *extra])


def weights(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """Trainable weights of the checkpoint of ``step`` (None: ``last.ckpt``)."""
    [path] = (run_dir / "train" / "checkpoints").glob("last.ckpt" if step is None else f"epoch=*-step={step}.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_nan_loss_stops_the_fit_and_keeps_the_last_good_checkpoint(
    toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: FaultTable
) -> None:
    fault.injected("training: NaN loss+grads (stop)")
    assert fit(toy_data, tmp_path) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "non-finite loss (train/loss=nan, train/nan_probe=nan) at step 5" in line, line
    saved = sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir())
    assert saved == [*(f"epoch=0-step={s}.ckpt" for s in (1, 2, 3, 4)), "last.ckpt"]  # 4 batches an epoch
    last, step4 = weights(tmp_path), weights(tmp_path, 4)
    assert all_finite(last)
    assert all(torch.equal(last[k], step4[k]) for k in step4), "last.ckpt is the step-4 checkpoint"
    fault.survived("training: NaN loss+grads (stop)")


def test_skip_policy_drops_the_update_and_trains_on(
    toy_data: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder, fault: FaultTable
) -> None:
    fault.injected("training: NaN loss+grads (skip)")
    guard = ["--trainer.callbacks+=callbacks.nan_guard.NaNGuard", "--trainer.callbacks.init_args.policy=skip"]
    assert fit(toy_data, tmp_path, *guard) == 0
    assert [str(w.message) for w in recwarn if "skipped optimizer step" in str(w.message)] == [
        "zoo: skipped optimizer step 5: non-finite loss (train/loss=nan, train/nan_probe=nan) (1 of at most 10)"
    ]
    before, skipped, after = (weights(tmp_path, step) for step in (4, 5, 6))
    assert all(torch.equal(before[k], skipped[k]) for k in before), "step 5 changed no weight"
    assert any(not torch.equal(skipped[k], after[k]) for k in before), "step 6 trained again"
    assert all_finite(weights(tmp_path))
    fault.survived("training: NaN loss+grads (skip)")


def test_skip_policy_stops_past_its_limit(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: FaultTable) -> None:
    fault.injected("training: NaN past max_skips")
    guard = ["--trainer.callbacks+=callbacks.nan_guard.NaNGuard", "--trainer.callbacks.init_args.policy=skip",
             "--trainer.callbacks.init_args.max_skips=0"]
    assert fit(toy_data, tmp_path, *guard) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert line.endswith("at step 5 after 0 skipped step(s) (max_skips 0): stopped before the update; "
                         "the last checkpoint holds the last finite weights"), line
    assert all_finite(weights(tmp_path))
    fault.survived("training: NaN past max_skips")
