"""Test-only callbacks that record what a fit did (in this process, or in files for fits in other
processes), and one that interrupts it with a signal."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class LRRecorder(Callback):
    """Records ``(global step, learning rate)`` of every optimiser step, as the optimiser used it."""

    steps: list[tuple[int, float]] = []
    """Every instance appends here (the CLI builds the instance, the test reads the class)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        [optimizer] = trainer.optimizers
        type(self).steps.append((trainer.global_step, optimizer.param_groups[0]["lr"]))


class WeightRecorder(Callback):
    """Records the module's trainable weights after every optimiser step (``after_step[s]``, ``s`` =
    ``global_step``, 0 = when training starts) and as each validation pass sees them."""

    def __init__(self) -> None:
        self.after_step: dict[int, dict[str, Any]] = {}
        self.in_validation: list[tuple[int, dict[str, Any]]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.after_step[0] = _trainable(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after_step[trainer.global_step] = _trainable(pl_module)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.in_validation.append((trainer.global_step, _trainable(pl_module)))


def _trainable(module: L.LightningModule) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


class BatchKeys(Callback):
    """Appends ``[global step, sample keys]`` of every training batch to ``<out>/keys.rank<R>.jsonl`` of its rank."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"keys.rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps([trainer.global_step, list(batch.key)]) + "\n")


class SignalAt(Callback):
    """Sends the signal ``signal_name`` to its own process at the start of step ``step`` on global rank
    ``rank``: a real signal, as a scheduler sends it to one task of a job."""

    def __init__(self, step: int, rank: int = 0, signal_name: str = "SIGTERM") -> None:
        self.step, self.rank, self.signum = step, rank, signal.Signals[signal_name]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)
