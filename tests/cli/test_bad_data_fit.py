"""A tiny DIM fit over shards with bad samples trains on, and totals its skips in TensorBoard and the summary."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import toy
from tests.helpers.faults import FaultTable
from tests.helpers.recipes import configs, tiny_run_overlay
from zoo.cli import main

pytestmark = pytest.mark.faults


def drop_members(shard: Path, names: set[str]) -> None:
    """Rewrite ``shard`` without the tar members ``names``."""
    with tarfile.open(shard) as tar:
        kept = [(info, tar.extractfile(info).read()) for info in tar.getmembers() if info.name not in names]
    with tarfile.open(shard, "w") as tar:
        for info, data in kept:
            tar.addfile(info, io.BytesIO(data))


def test_fit_skips_bad_samples_and_reports_the_total(tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: FaultTable) -> None:
    fault.injected("data: bad samples in a fit", count=2)
    data = tmp_path / "toy"
    args = ["--out", str(data), "--train", "16", "--val", "4", "--test", "4", "--seed", "0", "--resolution", "32"]
    assert toy.main([*args, "--samples-per-shard", "8", "--task", "edit"]) == 0
    drop_members(data / "train" / "shard-000000.tar", {"train_000001.target.png", "train_000002.source.png"})
    overlay = tiny_run_overlay(tmp_path / "run", data, max_steps=4, data_args={"batch_size": 4}, model_args={"num_inference_steps": 2})
    recipes = configs(["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"])
    assert main(["fit", *recipes, *overlay, "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"]) == 0
    assert "data: skipped samples: train 2, val 0 (see the skipped-sample warnings)" in capsys.readouterr().out.splitlines()
    events = EventAccumulator(str(tmp_path / "run" / "train"))
    events.Reload()
    assert [e.value for e in events.Scalars("data/skipped_train")][-1] == 2
    assert (tmp_path / "run" / "train" / "checkpoints" / "last.ckpt").is_file()
    fault.survived("data: bad samples in a fit", count=2)
