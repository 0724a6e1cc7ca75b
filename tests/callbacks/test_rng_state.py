"""RNGState: each rank's RNG streams survive a stop and resume in 2-process DDP on CPU (gloo);
rank 1 continues its own streams, not rank 0's, and a fresh fit seeded alike on every rank draws
apart on each."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.rng_state import RNGState, collect, restore
from datamodules.samples import EditBatch
from datamodules.shards import ShardDataModule
from datamodules.toy import main as toy_main
from tests.helpers.ddp import launch

WORLD_SIZE, STEPS, STOP = 2, 5, 2


class Draws(L.LightningModule):
    """Test-only: a Linear whose loss uses one draw of each RNG per step; writes them per rank at the end."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.out = out
        self.draws: list[list[float]] = []

    def training_step(self, batch: EditBatch, batch_idx: int) -> torch.Tensor:
        draw = [torch.randn(()).item(), random.random(), float(np.random.rand())]
        self.draws.append([self.global_step, *draw])
        return (self.layer(batch.source.mean(dim=(2, 3))) * draw[0]).pow(2).mean()

    def on_train_end(self) -> None:
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.draws))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_job(data: Path, out: Path, max_steps: int, ckpt_path: str | None) -> None:
    L.seed_everything(1)  # every rank alike, as a recipe's seed_everything: RNGState moves rank 1 to seed 2
    out.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy="ddp", max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RNGState(), ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=STOP, save_top_k=-1)],
    )
    dm = ShardDataModule(train_shards=str(data / "train"), batch_size=2, resolution=16, mllm_resolution=16, seed=1)
    trainer.fit(Draws(out), datamodule=dm, ckpt_path=ckpt_path)


def _draws(out: Path, rank: int) -> list[list[float]]:
    return json.loads((out / f"rank{rank}.json").read_text())


def test_collect_and_restore_round_trip_every_generator() -> None:
    state = collect()
    before = (random.random(), float(np.random.rand()), torch.rand(()).item())
    restore(state)
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == before


@pytest.mark.timeout(400)
def test_each_rank_resumes_its_own_rng_streams(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "toy"), "--train", "16", "--val", "2", "--test", "2", "--resolution", "16"]
    assert toy_main([*args, "--samples-per-shard", "4"]) == 0
    data = tmp_path / "toy"
    launch(_fit_job, (data, tmp_path / "full", STEPS, None), WORLD_SIZE, deadlock_after_s=180)
    launch(_fit_job, (data, tmp_path / "stopped", STOP, None), WORLD_SIZE, deadlock_after_s=180)
    [checkpoint] = (tmp_path / "stopped" / "checkpoints").glob(f"*step={STOP}.ckpt")
    ranks = torch.load(checkpoint, weights_only=True)["callbacks"]["RNGState"]["ranks"]
    assert set(ranks) == {"0", "1"} and not torch.equal(ranks["0"]["torch"], ranks["1"]["torch"])
    launch(_fit_job, (data, tmp_path / "resumed", STEPS, str(checkpoint)), WORLD_SIZE, deadlock_after_s=180)
    for rank in range(WORLD_SIZE):
        assert _draws(tmp_path / "resumed", rank) == _draws(tmp_path / "full", rank)[STOP:]
    full = [_draws(tmp_path / "full", rank) for rank in range(WORLD_SIZE)]
    assert all(a[1:] != b[1:] for a, b in zip(*full)), "every step, rank 1 draws apart from rank 0"
    torch.manual_seed(2)
    assert full[1][0][1] == torch.randn(()).item(), "rank 1's streams start from seed_everything's seed + 1"


def test_a_cpu_resume_with_another_thread_count_says_it_is_not_bit_exact(caplog: pytest.LogCaptureFixture) -> None:
    callback = RNGState()
    saved = callback.state_dict()
    saved["ranks"]["0"]["threads"] = torch.get_num_threads() + 1
    callback.load_state_dict(saved)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    with caplog.at_level("WARNING", logger="callbacks.rng_state"):
        trainer.fit(BoringModel())
    now = torch.get_num_threads()
    assert f"rank 0 computed with {now + 1} threads before the checkpoint and {now} now" in caplog.text
    assert f"set OMP_NUM_THREADS={now + 1}" in caplog.text
