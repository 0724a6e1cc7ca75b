"""Reader of the ImgEdit training release (HF ``sysuyy/ImgEdit``, ImgEdit paper §3): parquet rows + image tars.

``Parquet/<task>_partK.parquet`` comes in two schemas, told apart per file by its columns:

- **single-turn** ``{input_images: [path], output_images: [path], prompt}`` (README:
  ``results_remove_laion_part5/<id>/original.png`` -> ``result.png``). The edit type is the file
  name's ``<task>``, with upstream's renames applied (:data:`RELEASE_RENAMES`: the ``compose``
  parquet is now ``hybrid``, ImgEdit#9; ``alter`` is ``adjust``; other names are kept, since the
  release documents no closed list of tasks). One row -> one sample keyed by its
  image folder (``results_remove_laion_part5/<id>``). With ``--json``, the pre-processing JSON of
  the row's image (:mod:`datamodules.formats.imgedit_segmentation`) gives the sample, where the
  edited item is well defined, its ``mask``, and the boxes of every detected item of the
  *original* image (the single-turn source) go into the json as ``source_boxes`` (with
  ``boxes_of``, the JSON path), not into ``boxes``, which describe the *target* image (GoT's).
- **multi-turn** ``{data: [{input_images, output_images, prompt}, ...]}``, one dict per turn
  (``origin_k.png`` -> ``result_k.png``); the file name gives the kind (:data:`MULTI_TURN_KINDS`:
  content understanding, content memory, version backtracking), stored as ``edit_type``. A dialogue
  of T turns -> T samples ``<dialogue>_t<k>`` (k = 1..T), ``history`` the prompts of turns 1..k-1,
  and in the json ``{"dialogue", "turn": k, "source_version": v}``: v = 0 when turn k edits the
  original, v = j when it edits turn j's result. The release stores each turn's input as its own
  file (``origin_k.png``), so v is the version whose path the input names or, failing that, whose
  pixels it equals, the latest version first; ``null`` (and counted) when none does.

Images come from :class:`datamodules.formats.images.ImageIndex` (folders, tars, split tars). A
row whose image is missing, undecodable, or that has not exactly one input and one output image
(reference edits are not supported) is skipped and counted by reason; a dialogue is skipped whole.
:meth:`ImgEditRelease.report` says what is missing on which side: the paths rows name that no
archive holds (with the row naming them), the archive members no row names, and the JSON objects
no row uses.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from datamodules.formats.humanedit import parquet_files
from datamodules.formats.images import ImageIndex, as_rgb, decode_image
from datamodules.formats.imgedit import normalise_edit_type
from datamodules.formats.imgedit_segmentation import (
    SegmentedImage,
    edit_region,
    read_segmentations,
    row_image_id,
)
from datamodules.samples import DataConfigError, EditSample
from datamodules.skip_log import SkipLog

log = logging.getLogger(__name__)

TURN_FIELDS = ("input_images", "output_images", "prompt")
"""Columns of a single-turn parquet, and the fields of each turn of a multi-turn one."""

MULTI_TURN_COLUMN = "data"

RELEASE_RENAMES = {"compose": "hybrid", "alter": "adjust"}
"""Task names of older release files -> the current ones."""

MULTI_TURN_KINDS = ("content_understanding", "content_memory", "version_backtracking")

_BATCH_ROWS = 16


def task_of(file: Path) -> str:
    """The task a parquet file's name gives: ``compose_part3.parquet`` -> ``hybrid``,
    ``results_content_memory_part2.parquet`` -> ``content_memory``."""
    stem = re.sub(r"_part\d+$", "", file.stem).removeprefix("results_")
    return normalise_edit_type(stem, RELEASE_RENAMES, known=None)


class _Missing(Exception):
    """A row names images no ``--images`` source holds (recorded in ``ImgEditRelease.missing``)."""


class _Undecodable(ValueError):
    """An image of the row does not decode."""


def _folder(path: str) -> str:
    """A row's key: its image folder (``results_remove_laion_part5/<id>``), or the file's path
    without extension for an image outside any folder."""
    posix = PurePosixPath(path)
    return str(posix.parent) if posix.parent.name else str(posix.with_suffix(""))


def _turn(value: Any) -> tuple[str, str, str]:
    """``(input path, output path, prompt)`` of one row or turn; raises ValueError naming the defect."""
    if not isinstance(value, dict):
        raise ValueError(f"a turn is a dict of {TURN_FIELDS}, got {type(value).__name__}")
    inputs, outputs, prompt = (value.get(name) for name in TURN_FIELDS)
    for name, paths in (("input_images", inputs), ("output_images", outputs)):
        if not isinstance(paths, list) or len(paths) != 1 or not isinstance(paths[0], str):
            raise ValueError(f"{name} must hold exactly one path, got {paths!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt is missing or empty")
    return inputs[0], outputs[0], prompt.strip()


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def _same_aspect(image: Image.Image, segmented: SegmentedImage) -> bool:
    width, height = image.size
    return abs(width * segmented.height - height * segmented.width) <= max(segmented.height, segmented.width)


class ImgEditRelease:
    """The release's parquet files as typed edit samples with their json extras.

    Args:
        parquet: parquet files or folders of them (single- and multi-turn may be mixed).
        images: folders, ``.tar`` files and ``.tar.split.NNN`` parts holding the rows' images.
        json: pre-processing JSON files, folders or tars of them (single-turn boxes and masks).
        strict: raise on the first skipped row instead of counting it.

    Raises:
        DataConfigError: a missing file, a parquet with neither schema, an unreadable archive or JSON.
    """

    def __init__(
        self,
        parquet: Sequence[str | os.PathLike[str]],
        images: Sequence[str | os.PathLike[str]],
        json: Sequence[str | os.PathLike[str]] = (),
        strict: bool = False,
    ) -> None:
        try:
            self.files = parquet_files(parquet)
            self.multi_turn = {file: self._schema(file) for file in self.files}
        except OSError as error:
            raise DataConfigError(f"--parquet: {error}") from error
        self.index = ImageIndex(images)
        self.segmentations, self.repeated_json = read_segmentations(json) if json else ({}, [])
        self.strict = strict
        self.skipped: Counter[str] = Counter()
        self._skips = SkipLog(log)
        self.counts: Counter[str] = Counter()
        self.missing: dict[str, str] = {}
        """Path a row names that no image source holds -> the first row naming it."""
        self.used_json: set[str] = set()

    @staticmethod
    def _schema(file: Path) -> bool:
        """Whether ``file`` is multi-turn; raises DataConfigError for a file of neither schema."""
        try:
            names = pq.ParquetFile(file).schema_arrow.names
        except (OSError, ValueError) as error:
            raise DataConfigError(f"--parquet {file}: not a readable parquet file ({error})") from error
        if MULTI_TURN_COLUMN in names:
            return True
        if not all(name in names for name in TURN_FIELDS):
            raise DataConfigError(
                f"--parquet {file} is not an ImgEdit parquet: it has columns {names}; expected "
                f"{list(TURN_FIELDS)} (single-turn) or {MULTI_TURN_COLUMN!r} (multi-turn)"
            )
        return False

    def _image(self, name: str) -> Image.Image:
        try:
            return as_rgb(decode_image(self.index.read(name), f"{name} ({self.index.where(name)})"))
        except ValueError as error:
            raise _Undecodable(str(error)) from error

    def _resolve(self, paths: Sequence[str], where: str) -> list[str]:
        """The member names of ``paths``; records every unresolved one and raises :class:`_Missing`."""
        names = [self.index.resolve(path) for path in paths]
        absent = [path for path, name in zip(paths, names) if name is None]
        for path in absent:
            self.missing.setdefault(path, where)
        if absent:
            raise _Missing(f"image(s) {absent} in no --images source")
        return [name for name in names if name is not None]

    def _single(self, row: dict[str, Any], task: str, where: str) -> list[tuple[EditSample, dict[str, Any]]]:
        source_path, target_path, prompt = _turn(row)
        source_name, target_name = self._resolve([source_path, target_path], where)
        sample = EditSample(
            key=_folder(source_path), source=self._image(source_name), target=self._image(target_name),
            instruction=prompt, edit_type=task,
        )
        return [(sample, self._annotate(sample, source_path, task, prompt))]

    def _annotate(self, sample: EditSample, source_path: str, task: str, prompt: str) -> dict[str, Any]:
        """Boxes and the edit-region mask from the row's JSON object, if one was given; the json extras."""
        if not self.segmentations:
            return {}
        segmented = self.segmentations.get(row_image_id(source_path))
        if segmented is None:
            self.counts["rows without a --json object"] += 1
            return {}
        self.used_json.add(row_image_id(source_path))
        if not _same_aspect(sample.source, segmented):
            self.counts["rows whose --json resolution has another aspect ratio (no boxes)"] += 1
            return {}
        extra: dict[str, Any] = {"boxes_of": segmented.path, "source_boxes": segmented.boxes()}
        region = edit_region(segmented, task, prompt)
        if region is None:
            return extra
        self.counts["edit-region masks"] += 1
        sample.mask = region[1].resize(sample.source.size, Image.NEAREST)
        return extra | {"mask_class": region[0]}

    def _dialogue(self, row: dict[str, Any], kind: str | None, where: str) -> list[tuple[EditSample, dict[str, Any]]]:
        turns = row.get(MULTI_TURN_COLUMN)
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{MULTI_TURN_COLUMN} must be a non-empty list of turns, got {turns!r}")
        parsed = [_turn(turn) for turn in turns]
        names = self._resolve([path for turn in parsed for path in turn[:2]], where)
        dialogue = _folder(parsed[0][0])
        version_names: list[str] = []
        versions: list[Image.Image] = []
        pairs = []
        for k, (_, _, prompt) in enumerate(parsed, start=1):
            source_name, target_name = names[2 * k - 2], names[2 * k - 1]
            source, target = self._image(source_name), self._image(target_name)
            if k == 1:
                version_names, versions, version = [source_name], [source], 0
            else:
                version = self._version(source_name, source, version_names, versions)
            version_names.append(target_name)
            versions.append(target)
            history = [turn[2] for turn in parsed[: k - 1]]
            sample = EditSample(key=f"{dialogue}_t{k}", source=source, target=target, instruction=prompt, edit_type=kind, history=history)
            pairs.append((sample, {"dialogue": dialogue, "turn": k, "source_version": version}))
        return pairs

    def _version(self, name: str, image: Image.Image, names: list[str], versions: list[Image.Image]) -> int | None:
        """Which earlier version (0 the original, j turn j's result) a turn's input is, latest first."""
        for version in reversed(range(len(versions))):
            if names[version] == name or _same_pixels(versions[version], image):
                return version
        self.counts["turn inputs equal to no earlier version"] += 1
        return None

    def _skip(self, reason: str, where: str, error: Exception) -> None:
        if self.strict:
            raise DataConfigError(f"{where}: {error}") from error
        self.skipped[reason] += 1
        self._skips.skipped(reason, f"{where}: {error}")

    def pairs(self) -> Iterator[tuple[EditSample, dict[str, Any]]]:
        """``(sample, extra)`` for every good row, in file and row order."""
        seen: set[str] = set()
        for file in self.files:
            task = task_of(file)
            multi_turn = self.multi_turn[file]
            kind = task if task in MULTI_TURN_KINDS else None
            columns = [MULTI_TURN_COLUMN] if multi_turn else list(TURN_FIELDS)
            number = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    number += 1
                    where = f"{file.name} row {number}"
                    try:
                        pairs = self._dialogue(row, kind, where) if multi_turn else self._single(row, task, where)
                        if pairs[0][0].key in seen:
                            raise ValueError(f"its images' folder {pairs[0][0].key!r} repeats an earlier row's")
                    except _Missing as error:
                        self._skip("missing image", where, error)
                        continue
                    except _Undecodable as error:
                        self._skip("undecodable image", where, error)
                        continue
                    except ValueError as error:
                        self._skip("bad row", where, error)
                        continue
                    seen.add(pairs[0][0].key)
                    yield from pairs

    def __iter__(self) -> Iterator[EditSample]:
        for sample, _ in self.pairs():
            yield sample

    def report(self, limit: int = 10) -> list[str]:
        """The mismatch report: what the rows, the image sources and the JSON each lack of the others."""
        lines = [f"skipped {sum(self.skipped.values())} row(s)" + "".join(f"; {reason}: {n}" for reason, n in sorted(self.skipped.items()))]
        lines += [f"{reason}: {n}" for reason, n in sorted(self.counts.items())]
        if self.missing:
            lines.append(f"{len(self.missing)} image path(s) named by parquet rows are in no --images source; the first {min(limit, len(self.missing))}:")
            lines += [f"  {path}  (named by {where})" for path, where in list(self.missing.items())[:limit]]
        unreferenced = self.index.unreferenced()
        if unreferenced:
            lines.append(f"{len(unreferenced)} image(s) in --images are named by no parquet row; the first {min(limit, len(unreferenced))}:")
            lines += [f"  {name}  (in {self.index.where(name)})" for name in unreferenced[:limit]]
        unused = [image for key, image in self.segmentations.items() if key not in self.used_json]
        if unused:
            lines.append(f"{len(unused)} --json object(s) describe an image no single-turn row uses; the first {min(limit, len(unused))}:")
            lines += [f"  {image.path}  (in {image.source})" for image in unused[:limit]]
        if self.repeated_json:
            lines.append(f"{len(self.repeated_json)} --json object(s) repeat an earlier object's image (the first kept): {self.repeated_json[:limit]}")
        return lines
