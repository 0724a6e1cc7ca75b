"""StepProgressBar: Lightning's Rich progress bar counting optimizer steps of ``max_steps``.

The zoo's recipes train for ``max_steps`` over an endless stream (``max_epochs: -1``), where the
stock bar reads ``Epoch 4/-2`` and restarts every epoch, and shows the last four letters of the
logger's version (``v_num: rain`` for ``train``). This bar shows ``Step 1234/1600`` across epochs
(and resumes at the checkpoint's step); runs without ``max_steps`` keep the stock epoch bar.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich progress bar over ``trainer.global_step`` of ``trainer.max_steps``, without ``v_num``."""

    @staticmethod
    def _counts_steps(trainer: pl.Trainer) -> bool:
        return trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._counts_steps(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._counts_steps(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
