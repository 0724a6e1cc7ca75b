"""Running recipes in tests: parse-only CLI, subprocess runs, and a tiny-run overlay written to a tmp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import toy
from zoo.trainer_cli import ZooCLI

ROOT = Path(__file__).resolve().parents[2]


class ParseOnly(ZooCLI):
    """Stops after parsing and validation: paper recipes name checkpoints no test machine has."""

    def instantiate_classes(self) -> None:
        return None


NO_GPU_NO_DATA = ["--trainer.accelerator=cpu", "--data.init_args.train_shards=null", "--data.init_args.val_shards=null"]
"""Overrides that let a paper recipe reach its model on a CPU machine without the converted data
(the accelerator and shard checks would speak first): for tests of what building the model reports."""


def configs(files: list[str]) -> list[str]:
    """``--config`` arguments for recipe paths relative to the repository root."""
    return [arg for path in files for arg in ("--config", str(ROOT / path))]


def run_zoo(*args: str, timeout: int = 300, same_threads: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m zoo ARGS`` in a subprocess from the repository root; with ``same_threads``, computing
    with this process's torch thread count (CPU sums are ordered by thread, so runs compared bit for
    bit must share it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())} if same_threads else None
    return subprocess.run([sys.executable, "-m", "zoo", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def lr_steps(events: Path) -> list[int]:
    """Steps at which a TensorBoard events file logged the AdamW learning rate."""
    return [event.step for event in EventAccumulator(str(events)).Reload().Scalars("lr-AdamW")]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("zoo: error:")]


def toy_edits(root: Path, train: int) -> Path:
    """Toy edit splits under ``root`` (``zoo data toy``): ``train`` training samples, 4 val, 4 test,
    32 px, 8 samples per shard, seed 0; returns ``root``."""
    args = ["--out", str(root), "--train", str(train), "--val", "4", "--test", "4", "--seed", "0", "--resolution", "32"]
    assert toy.main([*args, "--samples-per-shard", "8", "--task", "edit"]) == 0
    return root


def tiny_run_overlay(
    run_dir: Path,
    data: Path,
    max_steps: int,
    data_args: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
    checkpoint_args: dict[str, Any] | None = None,
) -> list[str]:
    """A ``--config`` overlay for a short CPU run: toy shards, a tmp run folder, checkpoints every 2
    steps (``checkpoint_args`` changes ``ModelCheckpoint``'s arguments)."""
    overlay = {
        "trainer": {
            "default_root_dir": str(run_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir), "name": ""},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "save_last": True, "enable_version_counter": False}
                    | (checkpoint_args or {}),
                },
                {"class_path": "callbacks.image_logger.ImageLogger", "init_args": {"num_samples": 2}},
            ],
            "max_steps": max_steps,
            "val_check_interval": max_steps,
            "limit_val_batches": 1,
        },
        "data": {
            "init_args": {f"{split}_shards": str(data / split) for split in ("train", "val", "test")}
            | {"num_workers": 0}
            | (data_args or {})
        },
        "model": {"init_args": model_args or {}},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "test_overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return ["--config", str(path)]
