"""Writes ``zoo predict`` results: one PNG per edit and a JSONL of what produced it.

When the text is a GoT reasoning chain with boxes, a copy of the image with the parsed boxes drawn
(outlined in their colours, :mod:`zoo.blocks.spatial`) is written next to it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageDraw
from torchvision.utils import save_image

from callbacks.gather import gather_objects, run_folder
from callbacks.results import check_writable
from datamodules.samples import EditBatch, EditOutputs
from zoo.blocks.spatial import Box, box_pixels, parse_boxes


class EditWriter(BasePredictionWriter):
    """Saves ``<output_dir>/<key>.png`` and appends ``{"key", "instruction", "text", "image"}`` to
    ``<output_dir>/predictions.rank<R>.jsonl``: every rank writes the samples it edited. A text
    with valid GoT boxes also gets ``<key>.boxes.png`` (the image with the boxes drawn), recorded
    as ``"boxes_image"``.

    Args:
        output_dir: folder for the images; defaults to ``<log_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.folder = Path(output_dir) if output_dir else None
        self.written = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Resolved once on every rank (a collective call): ranks may write different numbers of batches.
        if self.folder is None:
            self.folder = run_folder(trainer) / "predictions"
        self.written = 0
        if stage != "predict":
            return
        check_writable(self.folder, "zoo predict")  # before the first edit, not after it
        earlier = sum(len(p.read_text().splitlines()) for p in self.folder.glob("predictions.rank*.jsonl"))
        if earlier:
            rank_zero_warn(
                f"{self.folder} already lists {earlier} predictions of an earlier run: new rows are appended and "
                "images of the same keys replaced (--trainer.logger.init_args.version=NAME writes elsewhere)"
            )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One summary line: the edits of every rank and the folder they are in."""
        total = sum(gather_objects(trainer, self.written))
        rank_zero_info(f"predict: {total} edits written -> {self.folder} (predictions.rank*.jsonl lists them)")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: EditOutputs,
        batch_indices: Sequence[int] | None,
        batch: EditBatch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, key in enumerate(prediction.key):
            path = folder / f"{key}.png"
            save_image(((prediction.edited[i].float().cpu() + 1) / 2).clamp(0, 1), path)
            text = prediction.text[i]
            record = {"key": key, "instruction": batch.instruction[i], "text": text, "image": path.name}
            boxes = parse_boxes(text).boxes
            if boxes:
                boxes_path = folder / f"{key}.boxes.png"
                _draw_boxes(Image.open(path).convert("RGB"), boxes).save(boxes_path)
                record["boxes_image"] = boxes_path.name
            lines.append(json.dumps(record) + "\n")
        with open(folder / f"predictions.rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.writelines(lines)
        self.written += len(lines)


def _draw_boxes(image: Image.Image, boxes: Sequence[Box]) -> Image.Image:
    """``image`` with each box outlined in its colour, at the pixels the SSGM mask fills."""
    draw = ImageDraw.Draw(image)
    line = max(1, min(image.size) // 128)
    for box in boxes:
        x1, y1, x2, y2 = box_pixels(box.box, image.height, image.width)
        draw.rectangle(((x1, y1), (x2, y2)), outline=box.colour, width=line)
    return image
