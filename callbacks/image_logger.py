"""Image grids of edits (source | edited | target) with the text that produced them.

Sampling runs on every rank in lock-step (ZeRO-3 and DDP need all ranks inside the forward,
pitfall 12); the grids are gathered to rank 0, which writes them to TensorBoard (image + text) and
as PNG files under ``<log_dir>/images/``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image

from callbacks.gather import gather_objects, run_folder
from datamodules.samples import EditBatch, EditOutputs
from zoo.modules.base import EditingModule


def edit_grid(edited: Tensor, target: Tensor | None, source: Tensor | None) -> Tensor:
    """Rows of ``source | edited | target`` (whichever exist) in [0,1], as one [3,H,W] image."""
    columns = [x for x in (source, edited, target) if x is not None]
    tiles = torch.stack([((x.float().cpu() + 1) / 2).clamp(0, 1) for x in columns], dim=1)
    return make_grid(tiles.flatten(0, 1), nrow=len(columns), padding=2, pad_value=1.0)


class ImageLogger(L.Callback):
    """Logs edit grids at validation (first batch, edited now by the module's ``edit_outputs``) and
    test (first batch's outputs).

    Args:
        num_samples: samples per rank shown in a grid.
        every_n_validations: sample at every n-th validation run (sampling costs many forwards).
    """

    def __init__(self, num_samples: int = 4, every_n_validations: int = 1) -> None:
        self.num_samples = num_samples
        self.every_n_validations = every_n_validations
        self._validations = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: EditingModule,
        outputs: Any,
        batch: EditBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        subset = _head(batch, self.num_samples)
        edits = pl_module.edit_outputs(subset, batch_idx)
        self._write(trainer, "val", subset, edits.edited, edits.text)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: EditOutputs,
        batch: EditBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0:
            return
        subset = _head(batch, self.num_samples)
        self._write(trainer, "test", subset, outputs.edited[: self.num_samples], outputs.text[: self.num_samples])

    def _write(self, trainer: L.Trainer, stage: str, batch: EditBatch, edited: Tensor, texts: list[str]) -> None:
        grid = edit_grid(edited, batch.target, batch.source)
        caption = [f"**{key}** — {text}" for key, text in zip(batch.key, texts)]
        gathered = gather_objects(trainer, (grid, caption))
        folder = run_folder(trainer) / "images"
        if not trainer.is_global_zero:
            return
        full = torch.cat([g for g, _ in gathered], dim=1)
        lines = [line for _, c in gathered for line in c]
        folder.mkdir(parents=True, exist_ok=True)
        save_image(full, folder / f"{stage}_step{trainer.global_step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{stage}/edits", full, trainer.global_step)
                logger.experiment.add_text(f"{stage}/text", "\n\n".join(lines), trainer.global_step)


def _head(batch: EditBatch, n: int) -> EditBatch:
    """The first ``n`` samples of a batch."""
    return batch.select(range(min(n, len(batch))))
