"""Test-only callbacks that record what a fit did, for assertions after ``zoo fit`` in the same process."""

from __future__ import annotations

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
