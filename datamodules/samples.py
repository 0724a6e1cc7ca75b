"""Typed sample records and the batch contract every zoo module consumes.

A reader (shards, DIM jsonl, toy generator) yields :class:`EditSample` or :class:`T2ISample`;
:func:`collate` turns a list of them into the batch dict documented there, and :func:`edit_rows`
tells modules which of its samples are edits. This file is the only thing ``datamodules`` shares
with ``zoo`` (DESIGN.md, "Data flows one way").

Image transforms follow DIM (``data/tos_dataset.py``): the generation branch sees the image
resized so its shorter side is R (bicubic) and centre-cropped to R x R, in [-1, 1]; the MLLM
branch sees the *full* source squashed to M x M (aspect not kept), in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

BOX_RANGE = 1000
"""Box coordinates are integers in [0, BOX_RANGE), relative to the full image (GoT convention)."""


def check_boxes(boxes: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Validate GoT-style boxes ``{"box": [x1, y1, x2, y2], "color": str, "label": str}``.

    Raises ValueError naming the sample key, so a bad annotation never reaches a model silently.
    """
    checked = []
    for i, entry in enumerate(boxes):
        box = entry.get("box") if isinstance(entry, dict) else None
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, int) and 0 <= v < BOX_RANGE for v in box)
            or box[0] > box[2]
            or box[1] > box[3]
        ):
            raise ValueError(
                f"sample {key!r}: box {i} must be [x1, y1, x2, y2] ints in [0, {BOX_RANGE}) with x1<=x2, y1<=y2,"
                f" got {entry!r}"
            )
        checked.append({"box": [int(v) for v in box], "color": str(entry.get("color", "")), "label": str(entry.get("label", ""))})
    return checked


@dataclass
class EditSample:
    """One instruction-guided edit: ``source`` + ``instruction`` -> ``target``.

    ``target`` is None for predict sets; ``blueprint`` is DIM's 5-section chain-of-thought;
    ``mask`` is a PIL "L" image, 255 inside the edit region; ``boxes`` describe the target image;
    ``chain`` is GoT's reasoning chain (text with ``<|box_start|>(x1,y1),(x2,y2)<|box_end|> (colour)``).
    """

    key: str
    source: Image.Image
    instruction: str
    target: Image.Image | None = None
    blueprint: str | None = None
    edit_type: str | None = None
    mask: Image.Image | None = None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    chain: str | None = None

    def __post_init__(self) -> None:
        if self.source.mode != "RGB":
            self.source = self.source.convert("RGB")
        if self.target is not None and self.target.mode != "RGB":
            self.target = self.target.convert("RGB")
        if self.mask is not None and self.mask.mode != "L":
            self.mask = self.mask.convert("L")
        self.boxes = check_boxes(self.boxes, self.key)


@dataclass
class T2ISample:
    """One text-to-image pair; ``image`` is None for predict sets (prompts only); ``chain`` as in EditSample."""

    key: str
    image: Image.Image | None
    prompt: str
    blueprint: str | None = None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    chain: str | None = None

    def __post_init__(self) -> None:
        if self.image is not None and self.image.mode != "RGB":
            self.image = self.image.convert("RGB")
        self.boxes = check_boxes(self.boxes, self.key)


def resize_center_crop(image: Image.Image, resolution: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``resolution`` then centre-crop a square (torchvision rounding)."""
    width, height = image.size
    if width == resolution and height == resolution:
        return image
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = int(round((new_w - resolution) / 2.0)), int(round((new_h - resolution) / 2.0))
    return image.crop((left, top, left + resolution, top + resolution))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _signed(image: Image.Image, resolution: int) -> torch.Tensor:
    return _to_tensor(resize_center_crop(image, resolution)).mul_(2.0).sub_(1.0)


def collate(samples: Sequence[EditSample | T2ISample], resolution: int, mllm_resolution: int) -> dict[str, Any]:
    """Build the batch dict of the zoo's data contract.

    Keys: ``key``, ``task`` ("edit" or "t2i" per sample), ``instruction`` (T2I: the prompt),
    ``blueprint``, ``chain`` and ``edit_type`` ("" where absent), ``boxes``; ``target`` [B,3,R,R] in
    [-1,1] unless no sample has one; batches holding an edit add ``source`` [B,3,R,R] in [-1,1] and
    ``mllm_image`` [B,3,M,M] in [0,1] (full source squashed); ``mask`` [B,1,R,R] in {0,1} only when
    every sample has a mask.

    A batch may mix edit and T2I samples (GoT pretrains on both). Its T2I rows then get a black
    ``source`` (-1 everywhere: GoT encodes a black image as the T2I reference) and an all-zero
    ``mllm_image`` that is no image: modules read ``task`` (:func:`edit_rows`) to keep it from the MLLM.
    """
    if not samples:
        raise ValueError("collate() got an empty list of samples")
    edits = [isinstance(s, EditSample) for s in samples]
    batch: dict[str, Any] = {
        "key": [s.key for s in samples],
        "task": ["edit" if edit else "t2i" for edit in edits],
        "instruction": [s.instruction if isinstance(s, EditSample) else s.prompt for s in samples],
        "blueprint": [s.blueprint or "" for s in samples],
        "chain": [s.chain or "" for s in samples],
        "edit_type": [(s.edit_type or "") if isinstance(s, EditSample) else "" for s in samples],
        "boxes": [s.boxes for s in samples],
    }
    if any(edits):
        batch.update(_sources(samples, resolution, mllm_resolution))
    targets = [s.target if isinstance(s, EditSample) else s.image for s in samples]
    present = [t is not None for t in targets]
    if all(present):
        batch["target"] = torch.stack([_signed(t, resolution) for t in targets])
    elif any(present):
        missing = [s.key for s, p in zip(samples, present) if not p]
        raise ValueError(f"some samples of the batch have a target image and some do not (missing: {missing})")
    return batch


def _sources(samples: Sequence[EditSample | T2ISample], resolution: int, mllm_resolution: int) -> dict[str, Tensor]:
    """``source`` and ``mllm_image`` of a batch holding edits (T2I rows: black / zeros), and ``mask``."""
    black = -torch.ones(3, resolution, resolution)
    empty = torch.zeros(3, mllm_resolution, mllm_resolution)
    sources = [s.source if isinstance(s, EditSample) else None for s in samples]
    out = {
        "source": torch.stack([black if s is None else _signed(s, resolution) for s in sources]),
        "mllm_image": torch.stack(
            [empty if s is None else _to_tensor(s.resize((mllm_resolution, mllm_resolution), Image.BICUBIC)) for s in sources]
        ),
    }
    masks = [s.mask if isinstance(s, EditSample) else None for s in samples]
    if all(m is not None for m in masks):
        out["mask"] = torch.stack([(_to_tensor(resize_center_crop(m, resolution, Image.NEAREST)) > 0.5).float() for m in masks])
    return out


def edit_rows(batch: dict[str, Any]) -> list[bool]:
    """Which samples of a batch are edits: from ``task``, else (a batch built by hand, without
    ``task``) all of them when it has a ``source``, none otherwise."""
    if "task" in batch:
        unknown = sorted(set(batch["task"]) - {"edit", "t2i"})
        if unknown:
            raise ValueError(f"batch['task'] holds {unknown}; each entry must be 'edit' or 't2i'")
        return [task == "edit" for task in batch["task"]]
    return [("source" in batch)] * len(batch["key"])
