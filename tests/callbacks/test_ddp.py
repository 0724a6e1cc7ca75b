"""2-process DDP on CPU (gloo): evaluators and image grids gather every rank to rank 0.

The ranks are launched the way torchrun or srun launch them (:mod:`tests.helpers.ddp`); the
callbacks live in the worker processes, so the assertions are on the files rank 0 writes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from callbacks.image_logger import ImageLogger, edit_grid
from callbacks.imgedit_bench import ImgEditEvaluator
from callbacks.judges import ToyJudge
from callbacks.similarity import SimilarityEvaluator
from callbacks.toy_score import ToyEditEvaluator
from datamodules.shards import ShardDataModule
from datamodules.toy import main as toy_main
from tests.helpers.ddp import launch
from tests.helpers.editors import OracleEditor
from tests.modules.conftest import tiny_dim_kwargs
from zoo.modules.dim import DIMModule

WORLD_SIZE, NUM_TEST, BATCH_SIZE, RESOLUTION, GRID_SAMPLES = 2, 12, 2, 16, 4
DEADLOCK_AFTER_S = 180  # a run takes ~15-25 s on a 2-core CPU; a collective entered by one rank hangs forever
PROMPTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "imgedit-bench" / "prompts.json"


def _toy_shards(root: Path, num_test: int = NUM_TEST) -> Path:
    args = ["--out", str(root), "--train", "8", "--val", "8", "--test", str(num_test), "--resolution", str(RESOLUTION)]
    assert toy_main(args + ["--samples-per-shard", "4"]) == 0
    return root / "test"


def _test_run(module: L.LightningModule, shards: Path, logs: Path, devices: int, callbacks: list[L.Callback]) -> None:
    """``Trainer.test`` over the toy test shards with ``callbacks``, logging to ``logs/version_0``."""
    data = ShardDataModule(test_shards=str(shards), batch_size=BATCH_SIZE, resolution=RESOLUTION, mllm_resolution=RESOLUTION, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=CSVLogger(save_dir=str(logs), name="", version=0),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.test(module, datamodule=data)


def _dim_job(tmp_path: Path) -> None:
    """One rank: a tiny DIM with the toy evaluator and the image grids."""
    L.seed_everything(0)
    module = DIMModule(**tiny_dim_kwargs(num_inference_steps=2))
    callbacks = [ToyEditEvaluator(label="tiny"), ImageLogger(num_samples=GRID_SAMPLES)]
    _test_run(module, tmp_path / "toy" / "test", tmp_path / "logs", WORLD_SIZE, callbacks)


def _assert_rank_zero_wrote_everything(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs" / "version_0"
    # metrics.json: written once (by rank 0), over all 12 samples of both ranks (6 + 6 here).
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json")] == [Path("logs/version_0/metrics.json")]
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["tiny"]["overall"]["count"] == NUM_TEST
    assert sum(v["count"] for group, v in metrics["tiny"].items() if group != "overall") == NUM_TEST
    # Toy masks are exactly the changed pixels: copying the source keeps everything and edits nothing.
    assert metrics["copy_source"]["overall"] == {"score": 0.5, "edit": 0.0, "preserve": 1.0, "kept": 1.0, "count": NUM_TEST}
    records = [json.loads(line) for line in (log_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == NUM_TEST and len({r["key"] for r in records}) == NUM_TEST  # none lost, none doubled

    # Test image grid: one PNG; each rank's first batch (BATCH_SIZE samples) as rows, ranks stacked.
    pngs = list((log_dir / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["test_step0000000.png"]
    tiles = torch.zeros(min(BATCH_SIZE, GRID_SAMPLES), 3, RESOLUTION, RESOLUTION)
    one_rank = edit_grid(tiles, tiles, tiles, [[""]] * len(tiles))  # [3, H, W]: source | edited | target | text rows
    with Image.open(pngs[0]) as image:
        width, height = image.size
    assert (height, width) == (WORLD_SIZE * one_rank.shape[1], one_rank.shape[2])


@pytest.mark.timeout(300)
def test_ddp_test_gathers_all_ranks_to_rank_zero(tmp_path: Path) -> None:
    _toy_shards(tmp_path / "toy")
    launch(_dim_job, (tmp_path,), WORLD_SIZE, DEADLOCK_AFTER_S)
    _assert_rank_zero_wrote_everything(tmp_path)


# -- benchmark evaluators (results folder flow) --------------------------------------------------


def _benchmark_run(root: Path, shards: Path, devices: int) -> None:
    """ImgEdit-Bench basic (toy judge) and pixel similarity of noise-free edits, into ``root/logs/version_0/<evaluator>``."""
    evaluators: list[L.Callback] = [
        ImgEditEvaluator(ToyJudge(), rubrics=str(PROMPTS), label="oracle"),
        SimilarityEvaluator(label="oracle", clip=None, dino=None, lpips=None),
    ]
    _test_run(OracleEditor("target_even_source_odd"), shards, root / "logs", devices, evaluators)


def _benchmark_job(tmp_path: Path) -> None:
    _benchmark_run(tmp_path / "ddp", tmp_path / "toy" / "test", WORLD_SIZE)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.mark.timeout(300)
def test_ddp_benchmark_evaluators_write_once_what_one_process_writes(tmp_path: Path) -> None:
    if not PROMPTS.is_file():
        pytest.skip(f"ImgEdit rubrics not found at {PROMPTS} (workspace-only fixture, see shared/data/README.md)")
    shards = _toy_shards(tmp_path / "toy")
    launch(_benchmark_job, (tmp_path,), WORLD_SIZE, DEADLOCK_AFTER_S)
    _benchmark_run(tmp_path / "single", shards, devices=1)

    ddp_logs, single_logs = (tmp_path / run / "logs" / "version_0" for run in ("ddp", "single"))
    samples = sorted(f"test_{i:06d}" for i in range(NUM_TEST))
    for name, table in (("imgedit_basic", "basic"), ("similarity", "similarity")):
        ddp, single = ddp_logs / name, single_logs / name
        assert sorted(_ids(ddp / "records.jsonl")) == samples  # every sample exactly once, none lost
        shares = [set(_ids(ddp / f"generated.rank{rank}.jsonl")) for rank in range(WORLD_SIZE)]
        assert all(shares) and not shares[0] & shares[1], "each rank generates its own share"
        assert list((tmp_path / "ddp").rglob(f"{table}.md")) == [ddp / f"{table}.md"]  # written by rank 0 alone
        for file in (f"{table}.csv", f"{table}.md", "summary.json"):
            assert (ddp / file).read_text() == (single / file).read_text(), file

    # The toy judge on exact edits: a reference edit scores 5 on every dimension, a copied source 1, 5, 3.
    records = [json.loads(line) for line in (ddp_logs / "imgedit_basic" / "records.jsonl").read_text().splitlines()]
    assert all(r["scores"] == ([5, 5, 5] if int(r["id"][-6:]) % 2 == 0 else [1, 5, 3]) for r in records)
    [logged] = [row for row in csv.DictReader((ddp_logs / "metrics.csv").open()) if row.get("imgedit_basic/overall/score")]
    summary = json.loads((ddp_logs / "imgedit_basic" / "summary.json").read_text())
    assert float(logged["imgedit_basic/overall/score"]) == pytest.approx(summary["headline"]["overall"]["score"])


def _one_case_job(tmp_path: Path) -> None:
    evaluator = SimilarityEvaluator(label="oracle", clip=None, dino=None, lpips=None)
    _test_run(OracleEditor("target"), tmp_path / "toy" / "test", tmp_path / "logs", WORLD_SIZE, [evaluator])


@pytest.mark.timeout(300)
def test_a_rank_without_cases_neither_fails_nor_deadlocks(tmp_path: Path) -> None:
    # A resumed benchmark run can have fewer cases left than ranks: rank 1 gets no batch, skips
    # the test loop and finishes its evaluator in teardown, joining rank 0's gather there.
    _toy_shards(tmp_path / "toy", num_test=1)
    launch(_one_case_job, (tmp_path,), WORLD_SIZE, DEADLOCK_AFTER_S)
    folder = tmp_path / "logs" / "version_0" / "similarity"
    assert _ids(folder / "records.jsonl") == ["test_000000"]
    assert "| overall | inf | 1.000 | 0.000 | 1 | 0 |" in (folder / "similarity.md").read_text()
