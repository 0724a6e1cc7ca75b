"""Reader of HumanEdit (Bai et al. 2024, arXiv:2412.04280), MIND-Edit's training and test data (MIND-Edit §4).

The release is parquet (HF ``BryanW/HumanEdit``, ``data/train-000NN-of-00034-*.parquet``, one
``train`` split of 5,751 rows). Its dataset card declares the columns of :data:`COLUMNS`: strings
``IMAGE_ID``, ``EDITING_TYPE`` (Action, Add, Counting, Relation, Remove, Replace),
``EDITING_INSTRUCTION``, ``OUTPUT_DESCRIPTION``, ``INPUT_CAPTION_BY_LLAMA``,
``OUTPUT_CAPTION_BY_LLAMA``; int32 flags ``CORE`` and ``MASK``; and the images ``INPUT_IMG``,
``MASK_IMG``, ``OUTPUT_IMG`` as HF ``datasets`` Image features, i.e. structs
``{"bytes": binary, "path": string}``. The flags and captions go into the sample json as extras.

Mask polarity: the release's ``MASK_IMG`` is black (0) inside the edit region; the authors' own
``mask_convert.py`` (viiika/HumanEdit) turns it into a mask by taking exactly the pixels whose grey
value is 0. So does :func:`edit_mask`, giving the zoo's convention (an "L" image, 255 inside).

The split (:func:`held_out_ids`): MIND-Edit trains on "5244 randomly selected images" and tests on "the
remaining 500" without publishing which. Here the test set is the 500 ids first in the order of
``sha256(IMAGE_ID)`` (hex digest), the rest are train: deterministic, independent of file and row
order, and of which rows fail to decode. The paper's 5,244 + 500 is 7 fewer than the 5,751 rows
published; the 7 it dropped are not known, so train keeps them (5,251 rows).

A row with a null id, type or instruction, an image without bytes, an undecodable image, or a mask
whose size differs from the source's is skipped, counted in ``skipped`` and logged (``strict``
raises instead); a file without the columns is an error either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from datamodules.formats.images import as_rgb, decode_image
from datamodules.samples import EditSample
from datamodules.skip_log import SkipLog

log = logging.getLogger(__name__)

COLUMNS = (
    "IMAGE_ID",
    "EDITING_TYPE",
    "CORE",
    "MASK",
    "EDITING_INSTRUCTION",
    "OUTPUT_DESCRIPTION",
    "INPUT_CAPTION_BY_LLAMA",
    "OUTPUT_CAPTION_BY_LLAMA",
    "INPUT_IMG",
    "MASK_IMG",
    "OUTPUT_IMG",
)
"""The published columns, in the dataset card's order."""

IMAGE_COLUMNS = ("INPUT_IMG", "MASK_IMG", "OUTPUT_IMG")
EXTRA_COLUMNS = ("CORE", "MASK", "OUTPUT_DESCRIPTION", "INPUT_CAPTION_BY_LLAMA", "OUTPUT_CAPTION_BY_LLAMA")
"""Columns kept in the sample json (not read by any module)."""

TEST_SIZE = 500
"""MIND-Edit's HumanEdit test set size (§4)."""

Split = Literal["train", "test", "all"]

# Rows are decoded a few at a time: a row holds three ~1024 px images.
_BATCH_ROWS = 8


def parquet_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The parquet files named, a folder standing for its ``*.parquet`` files (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"{path} holds no .parquet file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such parquet file or folder: {path}")
    return files


def held_out_ids(ids: Sequence[str], test_size: int = TEST_SIZE) -> set[str]:
    """The ``test_size`` ids first in ``sha256(id)`` order: the test split (see the module docstring)."""
    if not 0 <= test_size <= len(set(ids)):
        raise ValueError(f"test_size must be in [0, {len(set(ids))}] (the number of distinct ids), got {test_size}")
    ordered = sorted(set(ids), key=lambda i: hashlib.sha256(i.encode("utf-8")).hexdigest())
    return set(ordered[:test_size])


def edit_mask(mask: Image.Image) -> Image.Image:
    """The zoo's mask ("L", 255 inside) of a HumanEdit ``MASK_IMG`` (grey value 0 inside)."""
    grey = np.asarray(mask.convert("L"))
    return Image.fromarray(np.where(grey == 0, 255, 0).astype(np.uint8), mode="L")


def _image(cell: Any, column: str) -> Image.Image:
    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not isinstance(data, bytes) or not data:
        raise ValueError(f"{column} has no image bytes")
    return decode_image(data, column)


def row_sample(row: dict[str, Any]) -> tuple[EditSample, dict[str, Any]]:
    """One row as ``(sample, extra)``; raises ValueError naming the defect."""
    for name in ("IMAGE_ID", "EDITING_TYPE", "EDITING_INSTRUCTION"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise ValueError(f"{name} is missing or empty")
    source, mask, target = (_image(row[name], name) for name in IMAGE_COLUMNS)
    if mask.size != source.size:
        raise ValueError(f"MASK_IMG is {mask.size[0]}x{mask.size[1]}, INPUT_IMG {source.size[0]}x{source.size[1]}")
    sample = EditSample(
        key=row["IMAGE_ID"],
        source=as_rgb(source),
        target=as_rgb(target),
        instruction=row["EDITING_INSTRUCTION"].strip(),
        edit_type=row["EDITING_TYPE"],
        mask=edit_mask(mask),
    )
    return sample, {name: row.get(name) for name in EXTRA_COLUMNS}


class HumanEditParquet:
    """HumanEdit's parquet files as typed edit samples of the train or test split.

    Args:
        paths: parquet files, or folders of them (the release's ``data/``).
        test_size: how many ids the test split takes (:func:`held_out_ids`).
        strict: raise on the first bad row instead of skipping and counting it.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], test_size: int = TEST_SIZE, strict: bool = False) -> None:
        self.files = parquet_files(paths)
        self.strict = strict
        self.skipped = 0
        self._skips = SkipLog(log)
        for file in self.files:
            missing = [c for c in COLUMNS if c not in pq.ParquetFile(file).schema_arrow.names]
            if missing:
                raise ValueError(f"{file} is not HumanEdit's schema: it lacks column(s) {missing}")
        # Only the id column is read here; the split must be known before any image is decoded.
        ids = [i for file in self.files for i in pq.read_table(file, columns=["IMAGE_ID"]).column(0).to_pylist() if isinstance(i, str)]
        self.ids = ids
        self.test = held_out_ids(ids, test_size)

    def split_size(self, split: Split) -> int:
        """Rows with an id in ``split`` (those that turn out bad are still counted here)."""
        if split == "all":
            return len(self.ids)
        return sum((i in self.test) == (split == "test") for i in self.ids)

    def _skip(self, where: str, error: ValueError) -> None:
        if self.strict:
            raise ValueError(f"{where}: {error}") from error
        self.skipped += 1
        self._skips.skipped(str(error), f"{where}: {error}")

    def pairs(self, split: Split = "all") -> Iterator[tuple[EditSample, dict[str, Any]]]:
        """``(sample, extra)`` for every good row of ``split``, in file and row order."""
        seen: set[str] = set()
        for file in self.files:
            number = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS, columns=list(COLUMNS)):
                for row in batch.to_pylist():
                    number += 1
                    image_id = row.get("IMAGE_ID")
                    if split != "all" and isinstance(image_id, str) and (image_id in self.test) != (split == "test"):
                        continue
                    try:
                        if image_id in seen:
                            raise ValueError("IMAGE_ID repeats an earlier row's")
                        sample = row_sample(row)
                    except ValueError as error:
                        self._skip(f"row {number} (IMAGE_ID={image_id!r}) of {file}", error)
                        continue
                    seen.add(sample[0].key)
                    yield sample

    def __iter__(self) -> Iterator[EditSample]:
        for sample, _ in self.pairs():
            yield sample
