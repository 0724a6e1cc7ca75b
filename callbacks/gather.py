"""Collect per-rank Python objects on every rank (evaluators run on all ranks, write on rank 0)."""

from __future__ import annotations

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
