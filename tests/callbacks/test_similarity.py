"""Similarity metrics on known image pairs, and the evaluator's records, tables, captions and resume.

Tiny random CLIP / DINO (zoo.blocks.tiny) and LPIPS over a random SqueezeNet checkpoint written
into a temporary torch hub cache: the same constructors the recipe uses, no download.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from callbacks.image_logger import ImageLogger
from callbacks.results import ResultsFolder
from callbacks.similarity import SimilarityEvaluator, lpips_metric, pair_metrics, read_captions
from datamodules.samples import EditBatch, EditOutputs
from tests.helpers.editors import OracleEditor, cpu_trainer, edit_batches, run_test
from zoo.blocks.chat import to_tensor
from zoo.blocks.pretrained import MissingPretrainedError

SIZE, NUM_SAMPLES = 32, 6
TINY = {"clip": {"seed": 0}, "dino": {"seed": 0}, "lpips": "squeeze", "batch_size": 4}


def read_records(folder: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, (folder / "records.jsonl").read_text().splitlines())}


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch hub cache holding a random SqueezeNet 1.1 under torchvision's file name (LPIPS's backbone)."""
    home = tmp_path / "torch_home"
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), checkpoints / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


# -- pixel metrics --


def test_identical_images() -> None:
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    metrics = pair_metrics(image, image)
    assert math.isinf(metrics["psnr"]) and metrics["ssim"] == pytest.approx(1.0) and metrics["l1"] == 0.0


def test_known_pair() -> None:
    black, grey = torch.zeros(3, 16, 16), torch.full((3, 16, 16), 0.1)
    metrics = pair_metrics(grey, black)
    assert metrics["psnr"] == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert metrics["l1"] == pytest.approx(0.1)
    assert metrics["ssim"] < 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        pair_metrics(black, torch.zeros(3, 8, 8))


def test_lpips_is_zero_for_identical_images(torch_home: Path) -> None:
    metric = lpips_metric("squeeze")
    a, b = torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    assert metric(a, a).tolist() == [0.0, 0.0]
    assert (metric(a, b) > 0).all()


def test_missing_lpips_backbone_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingPretrainedError) as error:
        lpips_metric("alex")
    message = str(error.value)
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "\n" not in message


# -- the evaluator --


def test_perfect_edits_score_perfectly_and_unchanged_sources_strictly_worse(torch_home: Path, tmp_path: Path) -> None:
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"s{i:02d}", "output_caption": f"a picture {i}"}) + "\n" for i in range(0, NUM_SAMPLES, 2)))
    perfect, unchanged = tmp_path / "perfect", tmp_path / "unchanged"
    run_test(SimilarityEvaluator(label="oracle", captions=str(captions), output_dir=str(perfect), **TINY), OracleEditor("target"), edit_batches(NUM_SAMPLES), tmp_path / "logs")
    run_test(SimilarityEvaluator(output_dir=str(unchanged), **TINY), OracleEditor("source"), edit_batches(NUM_SAMPLES), tmp_path / "logs")

    best, worst = read_records(perfect), read_records(unchanged)
    assert sorted(best) == sorted(worst) == [f"s{i:02d}" for i in range(NUM_SAMPLES)]
    for key, record in best.items():
        assert record["error"] is None
        assert math.isinf(record["psnr"]) and record["l1"] == 0.0 and record["lpips"] == 0.0
        assert record["ssim"] == pytest.approx(1.0) and record["clip_i"] == pytest.approx(1.0) and record["dino"] == pytest.approx(1.0)
        other = worst[key]
        assert other["psnr"] < 100 and other["ssim"] < record["ssim"] and other["l1"] > 0 and other["lpips"] > 0
        assert other["clip_i"] < record["clip_i"] - 1e-4 and other["dino"] < record["dino"] - 1e-4

    # Per-sample LPIPS although batched: the record of s03 is that of its pair alone.
    folder = ResultsFolder(unchanged)
    alone = [to_tensor(folder.load_image(path))[None] for path in (folder.edited("s03"), folder.companion("s03", "TARGET"))]
    assert worst["s03"]["lpips"] == pytest.approx(float(lpips_metric("squeeze")(*alone)), rel=1e-5)

    table = list(csv.reader((perfect / "similarity.csv").open()))
    assert table[0] == ["edit type", "CLIP-I", "CLIP-T", "DINO", "LPIPS", "PSNR", "SSIM", "L1", "samples", "failed", "no caption"]
    assert [row[0] for row in table[1:]] == ["add", "remove", "overall"]
    assert [row[-3:] for row in table[1:]] == [["3", "0", "0"], ["3", "0", "3"], ["6", "0", "3"]]  # captions: even ids = "add"
    markdown = (perfect / "similarity.md").read_text()
    assert markdown.startswith("# Similarity to the reference (oracle;") and "| overall | 1.000 |" in markdown
    summary = json.loads((perfect / "summary.json").read_text())["groups"]
    assert summary["overall"]["psnr"] == math.inf and summary["overall"]["lpips"] == 0.0
    assert summary["overall"]["clip_t"] == pytest.approx(sum(best[f"s{i:02d}"]["clip_t"] for i in (0, 2, 4)) / 3)
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))


def test_clip_t_is_the_output_caption_never_the_instruction(torch_home: Path, tmp_path: Path) -> None:
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"id": "s01", "output_caption": "a red circle"}) + "\n")
    evaluator = SimilarityEvaluator(clip={"seed": 0}, dino=None, lpips=None, captions=str(captions), output_dir=str(tmp_path / "out"))
    run_test(evaluator, OracleEditor("target"), edit_batches(num=2), tmp_path / "logs")
    records = read_records(tmp_path / "out")
    assert records["s00"]["clip_t"] is None  # no caption: recorded as missing, the instruction is not used
    assert evaluator.clip is not None
    folder = ResultsFolder(tmp_path / "out")
    image = to_tensor(folder.load_image(folder.edited("s01")))
    expected = (evaluator.clip.image_features([image]) @ evaluator.clip.text_features(["a red circle"]).T).item()
    assert records["s01"]["clip_t"] == pytest.approx(expected, abs=1e-5)
    assert "DINO" not in (tmp_path / "out" / "similarity.md").read_text()


def test_samples_without_reference_are_failures_and_reruns_score_nothing_twice(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pixels_only = {"clip": None, "dino": None, "lpips": None, "output_dir": str(out)}
    run_test(SimilarityEvaluator(**pixels_only), OracleEditor("source"), edit_batches(num=3, with_target=False), tmp_path / "logs")
    records = read_records(out)
    assert all(r["error"].startswith("no reference edit") for r in records.values()) and len(records) == 3
    overall = list(csv.reader((out / "similarity.csv").open()))[-1]
    assert overall == ["overall", "nan", "nan", "nan", "0", "3"]

    run_test(SimilarityEvaluator(**pixels_only), OracleEditor("source"), edit_batches(num=3, with_target=False), tmp_path / "logs")
    assert len((out / "records.jsonl").read_text().splitlines()) == 3


def test_edits_of_another_size_are_compared_at_the_reference_size(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_test(SimilarityEvaluator(clip=None, dino=None, lpips=None, output_dir=str(out)), OracleEditor("half_size_target"), edit_batches(num=2), tmp_path / "logs")
    for record in read_records(out).values():
        assert record["error"] is None and 5 < record["psnr"] < 100 and 0 < record["l1"] < 0.5


def test_validation_edits_are_the_modules_edit_outputs(tmp_path: Path) -> None:
    editor = OracleEditor("target")
    calls: list[tuple[list[str], int]] = []
    edit_outputs = editor.edit_outputs

    def recording(batch: EditBatch, batch_idx: int = 0, keep_given: bool = False) -> EditOutputs:
        calls.append((list(batch.key), batch_idx))
        return edit_outputs(batch, batch_idx, keep_given)

    editor.edit_outputs = recording  # type: ignore[method-assign]
    out = tmp_path / "out"
    evaluator = SimilarityEvaluator(clip=None, dino=None, lpips=None, output_dir=str(out), on_validation=True)
    cpu_trainer([evaluator, ImageLogger(num_samples=2)], tmp_path / "logs").validate(editor, dataloaders=edit_batches(NUM_SAMPLES))
    # Each validation batch once for the evaluator (seeded by its index), the grid's two samples of the first batch once.
    assert sorted(calls) == [(["s00", "s01"], 0), (["s00", "s01", "s02", "s03"], 0), (["s04", "s05"], 1)]
    records = read_records(out / "val" / "step0000000")
    assert sorted(records) == [f"s{i:02d}" for i in range(NUM_SAMPLES)] and all(math.isinf(r["psnr"]) for r in records.values())
    assert [p.name for p in (tmp_path / "logs").rglob("*.png")] == ["val_step0000000.png"]


def test_caption_file_rows_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_text('{"id": "a", "output_caption": "a cat"}\n\n{"id": "b", "caption": "a dog"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:3: expected"):
        read_captions(path)
    path.write_text('{"id": "a", "output_caption": "a cat"}\n')
    assert read_captions(path) == {"a": "a cat"}
