"""``zoo fit`` as a 2-process DDP job on CPU (gloo): one rank is sent SIGTERM, every rank saves at the
same step, and the resumed job reaches the weights of a job never stopped, each rank continuing its
own data share and RNG streams. The stopped job runs as 2 nodes x 1 process with srun's
variables, the uninterrupted one as 1 node x 2 processes with torchrun's: the node rank Lightning
derives from either environment gives the same global ranks, so the same data shares and weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from datamodules import toy
from tests.helpers.ddp import launch
from tests.helpers.recipes import configs, tiny_run_overlay
from zoo.cli import main

WORLD_SIZE, EVERY, STEPS, SIGNAL_AT = 2, 3, 6, 3
"""Ranks, periodic checkpoint interval, fit length; rank 1 is signalled at the start of step SIGNAL_AT."""
DEADLOCK_AFTER_S = 300


def _fit(argv: list[str]) -> None:
    """One rank: ``zoo fit ARGV`` with one thread; exit status 0 (a preemption too).

    Without ``OMP_NUM_THREADS`` Lightning's DDP sets cores // processes-per-node threads: 1 for
    1 node x 2 processes, 2 for 2 nodes x 1 here, and CPU sums ordered by thread then differ
    (measured: 5.1e-7 at step 3 between the two topologies)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    assert main(["fit", *argv]) == 0


def fit_args(data: Path, run_dir: Path, nodes: int, *extra: str) -> list[str]:
    overlay = tiny_run_overlay(
        run_dir, data, max_steps=STEPS, data_args={"batch_size": 2}, model_args={"num_inference_steps": 2},
        checkpoint_args={"every_n_train_steps": EVERY, "save_last": False},
    )
    return [
        *configs(["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"]), *overlay, "--trainer.enable_progress_bar=false",
        "--trainer.strategy=ddp", f"--trainer.num_nodes={nodes}", f"--trainer.devices={WORLD_SIZE // nodes}",
        "--trainer.callbacks+=tests.helpers.recorders.BatchKeys", f"--trainer.callbacks.init_args.out={run_dir / 'keys'}",
        *extra,
    ]


def keys(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    """``(global step, sample keys)`` of every batch rank ``rank`` trained on, over all starts of the run."""
    lines = (run_dir / "keys" / f"keys.rank{rank}.jsonl").read_text().splitlines()
    return [tuple(json.loads(line)) for line in lines]


def checkpoint(run_dir: Path, name: str) -> dict:
    [path] = (run_dir / "train" / "checkpoints").glob(name)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.timeout(3 * DEADLOCK_AFTER_S)
def test_ddp_job_stopped_on_one_rank_resumes_bit_exactly_per_rank(tmp_path: Path) -> None:
    data = tmp_path / "toy"
    args = ["--out", str(data), "--train", "32", "--val", "4", "--test", "4", "--seed", "0", "--resolution", "32"]
    assert toy.main([*args, "--samples-per-shard", "4", "--task", "edit"]) == 0
    full, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
    launch(_fit, (fit_args(data, full, nodes=1),), WORLD_SIZE, DEADLOCK_AFTER_S, nodes=1, launcher="torchrun")

    signal = ["--trainer.callbacks+=tests.helpers.recorders.SignalAt", f"--trainer.callbacks.init_args.step={SIGNAL_AT}",
              "--trainer.callbacks.init_args.rank=1"]
    launch(_fit, (fit_args(data, stopped, 2, *signal),), WORLD_SIZE, DEADLOCK_AFTER_S, nodes=2, launcher="slurm")
    last = stopped / "train" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == SIGNAL_AT + 1, "rank 1's signal stopped both ranks at the end of that step"
    # Each rank's streams are stored (the recipe seeds every rank alike; that a rank restores its own,
    # not rank 0's, is tests/callbacks/test_rng_state.py's, with ranks seeded apart).
    assert set(saved["callbacks"]["RNGState"]["ranks"]) == {"0", "1"}
    assert [step for step, _ in keys(stopped, 0)] == list(range(SIGNAL_AT + 1))
    launch(_fit, (fit_args(data, stopped, 2, f"--ckpt_path={last}"),), WORLD_SIZE, DEADLOCK_AFTER_S, nodes=2, launcher="slurm")

    for rank in range(WORLD_SIZE):
        # Each rank continues its own share where it stopped: no batch repeated or skipped.
        assert keys(stopped, rank) == keys(full, rank), f"rank {rank}'s batches differ"
    shares = [{key for _, batch in keys(full, rank) for key in batch} for rank in range(WORLD_SIZE)]
    assert shares[0] and shares[1] and not shares[0] & shares[1], "the ranks train on disjoint shares"
    resumed, uninterrupted = checkpoint(stopped, f"*step={STEPS}.ckpt"), checkpoint(full, f"*step={STEPS}.ckpt")
    differ = [k for k, v in uninterrupted["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not differ, f"{len(differ)} trainable tensors differ from the uninterrupted job's"
    for index, state in uninterrupted["optimizer_states"][0]["state"].items():
        assert all(torch.equal(v, resumed["optimizer_states"][0]["state"][index][n]) for n, v in state.items())
