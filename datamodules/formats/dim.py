"""Reader of DIM's "tos" jsonl files (showlab/DIM ``data/tos_dataset.py``).

One JSON object per line with string fields ``id``, ``image_path``, ``prompt`` and, for edits,
``image_path_target``; extra fields (GEdit's ``task_type``, GenEval's ``meta_data``...) are kept as
``extra``. A row without ``image_path_target`` is text-to-image: DIM's ``image_path`` there is a
placeholder or an upstream key, so no image is loaded for it.

DIM's ``*_cot.jsonl`` files have the same rows with ``prompt`` replaced by the GPT-4o 5-section
blueprint ("1. Edit Instruction: ...  5. Edited Image Imagination: ..."); passing one as
``cot_jsonl`` joins it by ``id`` into ``blueprint`` while ``instruction`` keeps the raw prompt.

Image paths in DIM's files are relative to the DIM repo root (``./cache/demo/x.png``). They are
resolved against ``image_root`` (default: the jsonl's folder) by trying the path as written, then
with its leading folders dropped one at a time, so a release folder copied elsewhere still resolves.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from PIL import Image

from datamodules.samples import ORIGINAL_BYTES, EditSample, T2ISample

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "image_path", "prompt")
BLUEPRINT_SECTIONS = (
    "Edit Instruction",
    "Global Layout Perception",
    "Local Object Perception",
    "Edit Area Localization",
    "Edited Image Imagination",
)


@dataclass
class TosRow:
    """One parsed row; image paths resolved (None for T2I rows)."""

    key: str
    prompt: str
    source_path: Path | None
    target_path: Path | None
    blueprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_edit(self) -> bool:
        return self.source_path is not None


def read_jsonl(
    path: str | os.PathLike[str], strict: bool = False, required: tuple[str, ...] = REQUIRED_FIELDS
) -> tuple[list[dict[str, Any]], int]:
    """Rows of a jsonl (by default DIM's tos) with the ``required`` string fields, and the number of bad lines skipped."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = [f for f in required if not isinstance(row.get(f), str)] if isinstance(row, dict) else ["object"]
                if missing:
                    raise ValueError(f"missing or non-string field(s) {missing}")
            except ValueError as error:
                if strict:
                    raise ValueError(f"{path}:{number}: {error}") from error
                bad += 1
                log.warning("skipped %s:%d: %s", path, number, error)
                continue
            rows.append(row)
    return rows, bad


def read_blueprints(cot_jsonl: str | os.PathLike[str], strict: bool = False) -> dict[str, str]:
    """``id -> blueprint`` from a DIM ``*_cot.jsonl`` (its ``prompt`` field is the blueprint)."""
    rows, _ = read_jsonl(cot_jsonl, strict=strict)
    return {row["id"]: row["prompt"] for row in rows}


def resolve_image(image_root: Path, image_path: str) -> Path | None:
    """First existing file among ``root/path``, ``root/path-minus-first-folder``, ... ``root/name``."""
    parts = [p for p in PurePosixPath(image_path.replace("\\", "/")).parts if p not in (".", "/")]
    for start in range(len(parts)):
        candidate = image_root.joinpath(*parts[start:])
        if candidate.is_file():
            return candidate
    return None


class TosJsonl:
    """A DIM tos jsonl as typed samples; ``skipped`` counts bad lines and missing/undecodable images.

    Args:
        path: The jsonl file.
        image_root: Folder the image paths are relative to (default: the jsonl's folder).
        cot_jsonl: Optional DIM ``*_cot.jsonl`` joined by id into ``blueprint``.
        strict: Raise on the first bad line or image instead of skipping and counting it.
    """

    def __init__(
        self,
        path: str,
        image_root: str | None = None,
        cot_jsonl: str | None = None,
        strict: bool = False,
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.cot_jsonl = cot_jsonl
        self.strict = strict
        self.skipped = 0

    def _skip(self, message: str) -> None:
        if self.strict:
            raise FileNotFoundError(message)
        self.skipped += 1
        log.warning("skipped %s", message)

    def rows(self) -> list[TosRow]:
        """Parsed rows with images resolved; rows whose images are missing are skipped (counted)."""
        raw_rows, bad = read_jsonl(self.path, strict=self.strict)
        self.skipped += bad
        blueprints = read_blueprints(self.cot_jsonl, strict=self.strict) if self.cot_jsonl else {}
        if self.cot_jsonl:
            unmatched = sum(1 for row in raw_rows if row["id"] not in blueprints)
            if unmatched:
                log.warning("%d of %d rows of %s have no blueprint in %s", unmatched, len(raw_rows), self.path, self.cot_jsonl)
        rows = []
        t2i_with_image = 0
        for raw in raw_rows:
            extra = {k: v for k, v in raw.items() if k not in REQUIRED_FIELDS and k != "image_path_target"}
            source = target = None
            if not isinstance(raw.get("image_path_target"), str):
                t2i_with_image += resolve_image(self.image_root, raw["image_path"]) is not None
            else:
                source = resolve_image(self.image_root, raw["image_path"])
                target = resolve_image(self.image_root, raw["image_path_target"])
                if source is None or target is None:
                    lost = raw["image_path"] if source is None else raw["image_path_target"]
                    self._skip(f"row id={raw['id']!r} of {self.path}: image {lost!r} not found under {self.image_root}")
                    continue
            rows.append(TosRow(raw["id"], raw["prompt"], source, target, blueprints.get(raw["id"]), extra))
        if t2i_with_image:
            # An existing image under a row without a target is most likely an edit the user meant.
            log.warning(
                "%d rows of %s have an existing image_path but no image_path_target: they are read as "
                "text-to-image prompts (DIM's format) and their image is not used; to edit an image, give "
                "image_path_target too (repeat image_path when there is no target)",
                t2i_with_image, self.path,
            )
        return rows

    def load(self, row: TosRow) -> EditSample | T2ISample:
        """Decode a row's images (format from the bytes, so JPEG data under a .png name loads)."""
        if not row.is_edit:
            return T2ISample(key=row.key, image=None, prompt=row.prompt, blueprint=row.blueprint)
        images = []
        for path in dict.fromkeys((row.source_path, row.target_path)):  # a repeated file is decoded once
            try:
                data = Path(path).read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    rgb = image.convert("RGB")
            except OSError as error:
                raise OSError(f"row id={row.key!r} of {self.path}: cannot decode image {path}: {error}") from error
            rgb.info[ORIGINAL_BYTES] = data
            images.append(rgb)
        # DIM's files repeat the source as the target where there is none: the same image object.
        source, target = images[0], images[-1]
        return EditSample(key=row.key, source=source, target=target, instruction=row.prompt, blueprint=row.blueprint)

    def pairs(self) -> Iterator[tuple[TosRow, EditSample | T2ISample]]:
        """``(row, sample)`` for every row whose images exist and decode; the rest are counted."""
        for row in self.rows():
            try:
                yield row, self.load(row)
            except OSError as error:
                if self.strict:
                    raise
                self._skip(str(error))

    def __iter__(self) -> Iterator[EditSample | T2ISample]:
        for _, sample in self.pairs():
            yield sample
