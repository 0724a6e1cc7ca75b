"""Collective helpers for callbacks that run on every rank and write on rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch

T = TypeVar("T")


def gather_objects(trainer: L.Trainer, value: T) -> list[T]:
    """``value`` from every rank, in rank order; an object gather, so ranks may hold different sizes."""
    if trainer.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def gather_records(trainer: L.Trainer, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' per-sample records, concatenated in rank order."""
    return [record for part in gather_objects(trainer, records) for record in part]


def run_folder(trainer: L.Trainer) -> Path:
    """The run's log folder. ``Trainer.log_dir`` broadcasts from rank 0, so every rank must call
    this at the same point: calling it on rank 0 alone, after the others returned, deadlocks."""
    return Path(trainer.log_dir or trainer.default_root_dir)
