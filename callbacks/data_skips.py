"""DataSkips: the DataModule's skipped-sample counts in TensorBoard and in the run's summary.

A DataModule that skips bad samples (:class:`~datamodules.shards.ShardDataModule`: undecodable,
incomplete or oversized samples, and samples lost in damaged tars, each with a warning naming shard
and key) exposes ``skipped``, a ``split -> count`` mapping of this rank. This callback logs each count
as ``data/skipped_<split>`` every ``log_every_n_steps`` training steps (this rank's count so far) and,
at the end of a fit, test or predict, the total over all ranks, which ``zoo`` prints in its summary.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class DataSkips(Callback):
    """Logs ``data/skipped_<split>``; :attr:`totals` holds the all-rank totals after each stage."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            _log(trainer, skipped(trainer))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total(trainer)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total(trainer)

    def _total(self, trainer: L.Trainer) -> None:
        counts = skipped(trainer)
        self.totals = {
            split: int(trainer.strategy.reduce(torch.tensor(float(n), device=trainer.strategy.root_device), reduce_op="sum"))
            for split, n in sorted(counts.items())
        }
        _log(trainer, self.totals)

    def summary(self) -> str | None:
        """``data: skipped samples: train 3, val 0 (...)`` after a stage, None when nothing was counted."""
        if not self.totals:
            return None
        counts = ", ".join(f"{split} {n}" for split, n in self.totals.items())
        hint = " (see the skipped-sample warnings)" if any(self.totals.values()) else ""
        return f"data: skipped samples: {counts}{hint}"


def skipped(trainer: L.Trainer) -> dict[str, int]:
    """This rank's ``split -> skipped samples`` of the trainer's DataModule ({} when it counts none)."""
    counts = getattr(trainer.datamodule, "skipped", None)
    return dict(counts) if isinstance(counts, dict) else {}


def _log(trainer: L.Trainer, counts: dict[str, int]) -> None:
    if counts and trainer.logger is not None:
        trainer.logger.log_metrics({f"data/skipped_{split}": float(n) for split, n in counts.items()}, step=trainer.global_step)
