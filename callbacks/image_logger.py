"""Image grids of edits (source | edited | target) with the text that produced them.

Each row shows the tiles enlarged (nearest neighbour, at least :data:`MIN_TILE` pixels, so a 32 px
toy image stays legible), the ground-truth edit region outlined in red on the target where the
data has one, and the instruction and the text the model conditioned on (DIM's blueprint, GoT's
chain) written beside it.

Sampling runs on every rank in lock-step: ZeRO-3 gathers each layer's sharded weights from all
ranks during a forward, so a forward on rank 0 alone would hang (DDP also needs all ranks inside
it). The grids are gathered to rank 0, which writes them to TensorBoard (image + text) and as PNG
files under ``<log_dir>/images/``.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import save_image

from callbacks.gather import gather_objects, run_folder
from datamodules.samples import EditBatch, EditOutputs
from zoo.modules.base import EditingModule


MIN_TILE = 128
"""Smallest side of a tile in the grid, in pixels."""
TEXT_WIDTH = 384
"""Width of the text panel beside each row, in pixels."""
_OUTLINE = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
_GAP = 2


def _outlined(target: Tensor, mask: Tensor) -> Tensor:
    """``target`` [3, H, W] in [0, 1] with the boundary of ``mask`` [1, H, W] (the edit region) drawn red."""
    inside = mask > 0.5
    eroded = -F.max_pool2d(-inside.float()[None], 3, stride=1, padding=1)[0] > 0.5
    edge = inside & ~eroded
    return torch.where(edge, _OUTLINE, target)


def _text_panel(lines: list[str], height: int) -> Tensor:
    """A white ``[3, height, TEXT_WIDTH]`` panel with ``lines`` wrapped in black."""
    panel = Image.new("RGB", (TEXT_WIDTH, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(panel), ImageFont.load_default()
    wrapped = [row for line in lines for row in textwrap.wrap(line, width=60) or [""]]
    draw.multiline_text((4, 4), "\n".join(wrapped), fill=(0, 0, 0), font=font, spacing=2)
    return pil_to_tensor(panel).float() / 255


def edit_grid(
    edited: Tensor,
    target: Tensor | None,
    source: Tensor | None,
    texts: list[list[str]] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Rows of ``source | edited | target`` (whichever exist) in [0,1], as one [3,H,W] image.

    ``texts``: per row, lines written beside it; ``mask`` [B, 1, H, W]: the edit regions, outlined on
    the target tiles.
    """
    scale = max(1, math.ceil(MIN_TILE / edited.shape[-2]))
    rows = []
    for i in range(edited.shape[0]):
        row = [((x[i].float().cpu() + 1) / 2).clamp(0, 1) for x in (source, edited, target) if x is not None]
        if target is not None and mask is not None:
            row[-1] = _outlined(row[-1], mask[i].cpu())
        row = [F.interpolate(tile[None], scale_factor=scale, mode="nearest")[0] for tile in row]
        if texts is not None:
            row.append(_text_panel(texts[i], row[0].shape[-2]))
        rows.append(_join(row, dim=2))
    return F.pad(_join(rows, dim=1), (_GAP, _GAP, _GAP, _GAP), value=1.0)


def _join(tiles: list[Tensor], dim: int) -> Tensor:
    """``tiles`` side by side along ``dim`` (2: width, 1: height) with white gaps."""
    shape = list(tiles[0].shape)
    shape[dim] = _GAP
    gap = torch.ones(shape)
    return torch.cat([part for tile in tiles for part in (tile, gap)][:-1], dim=dim)


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
        lines = [[key, instruction, *([text] if text != instruction else [])] for key, instruction, text in zip(batch.key, batch.instruction, texts)]
        grid = edit_grid(edited, batch.target, batch.source, lines, batch.mask)
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
