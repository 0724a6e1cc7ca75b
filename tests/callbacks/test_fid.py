"""FID of edits against the test targets or a reference folder, with a tiny feature extractor in place of Inception."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from callbacks.fid import FIDEvaluator, image_files
from tests.helpers.ddp import launch
from tests.helpers.editors import OracleEditor, edit_batches, run_test
from zoo.blocks.config import ConfigError
from zoo.blocks.pretrained import MissingPretrainedError

NUM_SAMPLES, WORLD_SIZE = 24, 2
DEADLOCK_AFTER_S = 90  # the 2-rank run takes ~10 s on a 2-core CPU; a collective entered by one rank hangs forever


class TinyFeatures(nn.Module):
    """Stands in for Inception: uint8 images ``[B, 3, H, W]`` -> 8 pooled random-conv features."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, self.num_features, 3)

    def forward(self, images: Tensor) -> Tensor:
        return self.conv(images.float() / 255).relu().mean(dim=(2, 3))


def _fid_run(tmp_path: Path, name: str, amount: float, **options: Any) -> dict[str, Any]:
    out = tmp_path / name
    evaluator = FIDEvaluator(label=name, feature=TinyFeatures(), batch_size=5, output_dir=str(out), **options)
    run_test(evaluator, OracleEditor("target", brighten=amount), edit_batches(num=NUM_SAMPLES), tmp_path / "logs")
    return json.loads((out / "summary.json").read_text())


def test_fid_of_the_targets_against_themselves_is_zero_and_grows_with_a_shift(tmp_path: Path) -> None:
    same, shifted, more = (_fid_run(tmp_path, name, amount) for name, amount in (("same", 0.0), ("shifted", 0.1), ("more", 0.3)))
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < shifted["fid"] < more["fid"]
    assert same["edits"] == same["references"] == NUM_SAMPLES
    table = list(csv.reader((tmp_path / "more" / "fid.csv").open()))
    assert table[0] == ["model", "FID", "edits", "references"] and table[1][0] == "more"
    assert float(table[1][1]) == pytest.approx(more["fid"])
    assert "# FID against targets of the evaluated samples" in (tmp_path / "more" / "fid.md").read_text()
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))


def test_fid_against_a_reference_folder_and_resume_counts_every_edit_once(tmp_path: Path) -> None:
    reference = tmp_path / "reference" / "nested"
    reference.mkdir(parents=True)
    for i, batch in enumerate(edit_batches(num=NUM_SAMPLES)):
        for j, target in enumerate(batch.target):
            save_image((target + 1) / 2, reference / f"{i}_{j}.png")
    (reference / "notes.txt").write_text("not an image")
    assert len(image_files(tmp_path / "reference")) == NUM_SAMPLES

    first = _fid_run(tmp_path, "out", 0.0, reference=str(tmp_path / "reference"))
    assert first["fid"] == pytest.approx(0.0, abs=1e-6) and first["references"] == NUM_SAMPLES
    # The same edits again into the same folder (a rerun): FID still covers each edit once.
    again = _fid_run(tmp_path, "out", 0.0, reference=str(tmp_path / "reference"))
    assert again["edits"] == NUM_SAMPLES and again["fid"] == pytest.approx(first["fid"], abs=1e-6)
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == NUM_SAMPLES


def test_too_few_images_give_nan_not_an_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    evaluator = FIDEvaluator(feature=TinyFeatures(), output_dir=str(out))
    run_test(evaluator, OracleEditor("target"), edit_batches(num=1), tmp_path / "logs")
    summary = json.loads((out / "summary.json").read_text())
    assert math.isnan(summary["fid"]) and summary["edits"] == 1


def test_missing_inception_weights_or_reference_fail_before_generating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(MissingPretrainedError) as error:
        FIDEvaluator().setup(trainer, L.LightningModule(), "test")
    message = str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "\n" not in message
    with pytest.raises(MissingPretrainedError, match=f"FID Inception weights {tmp_path / 'absent.pth'} do not exist: download "):
        FIDEvaluator(inception_weights=str(tmp_path / "absent.pth")).setup(trainer, L.LightningModule(), "test")
    with pytest.raises(ConfigError, match="reference folder"):
        FIDEvaluator(feature=TinyFeatures(), reference=str(tmp_path / "missing")).setup(trainer, L.LightningModule(), "test")


def _fid_job(out: Path, logs: Path) -> None:
    """One rank of the 2-rank FID run."""
    evaluator = FIDEvaluator(feature=TinyFeatures(), batch_size=5, output_dir=str(out))
    run_test(evaluator, OracleEditor("target", brighten=0.3), edit_batches(NUM_SAMPLES), logs, devices=WORLD_SIZE)


@pytest.mark.timeout(120)
def test_two_ranks_give_the_single_process_fid(tmp_path: Path) -> None:
    single = _fid_run(tmp_path, "single", 0.3)
    launch(_fid_job, (tmp_path / "ddp", tmp_path / "ddp_logs"), WORLD_SIZE, DEADLOCK_AFTER_S)
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert sorted((tmp_path / "ddp").glob("generated.rank*.jsonl")) == [tmp_path / "ddp" / f"generated.rank{r}.jsonl" for r in range(WORLD_SIZE)]
    assert ddp["edits"] == ddp["references"] == NUM_SAMPLES
    assert ddp["fid"] == pytest.approx(single["fid"], rel=1e-6)
