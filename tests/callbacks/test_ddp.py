"""2-process DDP on CPU (gloo): test-time evaluator and image grids gather every rank to rank 0.

The ranks are launched the way torchrun or srun launch them (each process builds its own model,
Lightning's ``ddp`` with ``LOCAL_RANK`` set), not with ``ddp_spawn``: a DIM unpickled in a spawned
process has no hidden states from its MLLM (transformers registers the output-capturing specs in
``PreTrainedModel.__init__``, which unpickling skips). The callbacks live in the worker processes,
so the assertions are on the files rank 0 writes, not on Python objects.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from callbacks.image_logger import ImageLogger, edit_grid
from callbacks.toy_score import ToyEditEvaluator
from datamodules.shards import ShardDataModule
from datamodules.toy import main as toy_main
from tests.modules.conftest import tiny_dim_kwargs
from zoo.modules.dim import DIMModule

WORLD_SIZE, NUM_TEST, BATCH_SIZE, RESOLUTION, GRID_SAMPLES = 2, 12, 2, 16, 4
DEADLOCK_AFTER_S = 180  # the run takes ~15-25 s on a 2-core CPU; a collective entered by one rank hangs forever


def _toy_shards(root: Path) -> Path:
    args = ["--out", str(root), "--train", "8", "--val", "8", "--test", str(NUM_TEST), "--resolution", str(RESOLUTION)]
    assert toy_main(args + ["--samples-per-shard", "4"]) == 0
    return root / "test"


def _test_run(tmp_path: Path, strategy: str) -> None:
    """``Trainer.test`` of a tiny DIM over the toy test shards, logging to ``tmp_path/logs/version_0``."""
    L.seed_everything(0)
    module = DIMModule(**tiny_dim_kwargs(num_inference_steps=2))
    data = ShardDataModule(
        test_shards=str(tmp_path / "toy" / "test"),
        batch_size=BATCH_SIZE,
        resolution=RESOLUTION,
        mllm_resolution=RESOLUTION,
        num_workers=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=strategy,
        logger=CSVLogger(save_dir=str(tmp_path / "logs"), name="", version=0),
        callbacks=[ToyEditEvaluator(label="tiny"), ImageLogger(num_samples=GRID_SAMPLES)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.test(module, datamodule=data)


def _rank_main(rank: int, tmp_path: Path, port: int) -> None:
    """One rank of an externally launched job (as torchrun or srun start it): builds its own model."""
    for name in [n for n in os.environ if n.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))]:
        del os.environ[name]
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD_SIZE),
        NODE_RANK="0",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    _test_run(tmp_path, "ddp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_rank_zero_wrote_everything(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs" / "version_0"
    # metrics.json: written once (by rank 0), over all 12 samples of both ranks (6 + 6 here).
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json")] == [Path("logs/version_0/metrics.json")]
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["tiny"]["overall"]["count"] == NUM_TEST
    assert sum(v["count"] for group, v in metrics["tiny"].items() if group != "overall") == NUM_TEST
    # Toy masks are exactly the changed pixels: copying the source keeps everything and edits nothing.
    assert metrics["copy_source"]["overall"] == {"score": 0.5, "edit": 0.0, "preserve": 1.0, "count": NUM_TEST}
    records = [json.loads(line) for line in (log_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == NUM_TEST and len({r["key"] for r in records}) == NUM_TEST  # none lost, none doubled

    # Test image grid: one PNG; each rank's first batch (BATCH_SIZE samples) as rows, ranks stacked.
    pngs = list((log_dir / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["test_step0000000.png"]
    tiles = torch.zeros(min(BATCH_SIZE, GRID_SAMPLES), 3, RESOLUTION, RESOLUTION)
    one_rank = edit_grid(tiles, tiles, tiles)  # [3, H, W] of source | edited | target rows
    with Image.open(pngs[0]) as image:
        width, height = image.size
    assert (height, width) == (WORLD_SIZE * one_rank.shape[1], one_rank.shape[2])


def _launch_ranks(tmp_path: Path) -> None:
    """Run every rank; a rank's exception is raised here, a hang fails the test after ``DEADLOCK_AFTER_S``."""
    context = mp.start_processes(
        _rank_main, args=(tmp_path, _free_port()), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLOCK_AFTER_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"DDP test run did not finish in {DEADLOCK_AFTER_S} s: deadlock between ranks")


@pytest.mark.timeout(300)
def test_ddp_test_gathers_all_ranks_to_rank_zero(tmp_path: Path) -> None:
    _toy_shards(tmp_path / "toy")
    _launch_ranks(tmp_path)
    _assert_rank_zero_wrote_everything(tmp_path)
