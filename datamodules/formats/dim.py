"""Reader of DIM's "tos" jsonl files (showlab/DIM ``data/tos_dataset.py``).

One JSON object per line with string fields ``id``, ``image_path``, ``prompt`` and, for edits,
``image_path_target``; extra fields (GEdit's ``task_type``, GenEval's ``meta_data``...) are kept as
``extra``. A row's task (:func:`row_kind`) is its optional ``kind`` field (``"edit"`` or ``"t2i"``),
else DIM's rule: a row without ``image_path_target`` is text-to-image, its ``image_path`` a
placeholder or an upstream key, so no image is loaded for it. A predict file (:func:`predict_kind`)
holds rows of one kind; an edit row there needs no target (``kind: edit`` and ``image_path`` alone).

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

from datamodules.samples import ORIGINAL_BYTES, DataConfigError, EditSample, T2ISample
from datamodules.skip_log import SkipLog

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "image_path", "prompt")
BLUEPRINT_SECTIONS = (
    "Edit Instruction",
    "Global Layout Perception",
    "Local Object Perception",
    "Edit Area Localization",
    "Edited Image Imagination",
)


KINDS = ("edit", "t2i")
"""The tasks a row can be: an instruction edit of ``image_path``, or text-to-image from ``prompt``."""


def row_kind(raw: dict[str, Any]) -> str:
    """A row's task: its ``kind`` field when present, else ``edit`` exactly when it has ``image_path_target``.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    kind = raw.get("kind")
    if kind is None:
        return "edit" if isinstance(raw.get("image_path_target"), str) else "t2i"
    if kind not in KINDS:
        raise ValueError(f"row id={raw.get('id')!r}: kind must be one of {KINDS}, got {kind!r}")
    return kind


def predict_kind(path: str | os.PathLike[str]) -> str:
    """The one task of a predict jsonl, checked before any model is built.

    Raises:
        DataConfigError: the file is missing, has no readable row, a row with a bad ``kind``, or
            rows of both kinds (one batch of a model edits or generates, not both).
    """
    if not Path(path).is_file():
        raise DataConfigError(f"predict_jsonl {path} does not exist")
    rows, _ = read_jsonl(path)
    if not rows:
        raise DataConfigError(f"predict_jsonl {path} has no row with string fields {list(REQUIRED_FIELDS)}")
    by_kind: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for row in rows:
        try:
            by_kind[row_kind(row)].append(row["id"])
        except ValueError as error:
            raise DataConfigError(f"predict_jsonl {path}: {error}") from error
    if by_kind["edit"] and by_kind["t2i"]:
        minority = min(KINDS, key=lambda kind: len(by_kind[kind]))
        raise DataConfigError(
            f"predict_jsonl {path} mixes {len(by_kind['edit'])} edit rows and {len(by_kind['t2i'])} text-to-image rows "
            f"(first {minority}: id={by_kind[minority][0]!r}); a predict file holds one kind (a row's \"kind\", else edit "
            "when it has image_path_target): split it in two"
        )
    return "edit" if by_kind["edit"] else "t2i"


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
    rows, bad, skips = [], 0, SkipLog(log)
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
                skips.skipped("bad line", f"{path}:{number}: {error}")
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
        targets: Read edit rows' ``image_path_target`` (False for predict: edits have no target then).
    """

    def __init__(
        self,
        path: str,
        image_root: str | None = None,
        cot_jsonl: str | None = None,
        strict: bool = False,
        targets: bool = True,
    ) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.cot_jsonl = cot_jsonl
        self.strict = strict
        self.targets = targets
        self.skipped = 0
        self._skips = SkipLog(log)

    def _skip(self, kind: str, message: str) -> None:
        if self.strict:
            raise FileNotFoundError(message)
        self.skipped += 1
        self._skips.skipped(kind, message)

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
            extra = {k: v for k, v in raw.items() if k not in (*REQUIRED_FIELDS, "image_path_target", "kind")}
            try:
                kind = row_kind(raw)
            except ValueError as error:
                self._skip("bad kind", f"{self.path}: {error}")
                continue
            source = target = None
            if kind == "t2i":
                t2i_with_image += "kind" not in raw and resolve_image(self.image_root, raw["image_path"]) is not None
            else:
                source = resolve_image(self.image_root, raw["image_path"])
                wanted = raw.get("image_path_target") if self.targets else None
                if self.targets and not isinstance(wanted, str):
                    self._skip("no target", f"row id={raw['id']!r} of {self.path}: an edit row for training needs image_path_target")
                    continue
                target = resolve_image(self.image_root, wanted) if isinstance(wanted, str) else None
                if source is None or (wanted is not None and target is None):
                    lost = raw["image_path"] if source is None else wanted
                    self._skip("missing image", f"row id={raw['id']!r} of {self.path}: image {lost!r} not found under {self.image_root}")
                    continue
            rows.append(TosRow(raw["id"], raw["prompt"], source, target, blueprints.get(raw["id"]), extra))
        if t2i_with_image:
            # An existing image under a row without a target is most likely an edit the user meant.
            log.warning(
                "%d rows of %s have an existing image_path but no image_path_target: they are read as "
                "text-to-image prompts (DIM's format) and their image is not used; to edit an image, give "
                'the row "kind": "edit" (or an image_path_target); "kind": "t2i" silences this warning',
                t2i_with_image, self.path,
            )
        return rows

    def load(self, row: TosRow) -> EditSample | T2ISample:
        """Decode a row's images (format from the bytes, so JPEG data under a .png name loads)."""
        if not row.is_edit:
            return T2ISample(key=row.key, image=None, prompt=row.prompt, blueprint=row.blueprint)
        images = []
        files = (row.source_path, row.target_path) if row.target_path is not None else (row.source_path,)
        for path in dict.fromkeys(files):  # a repeated file is decoded once
            try:
                data = Path(path).read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    rgb = image.convert("RGB")
            except OSError as error:
                raise OSError(f"row id={row.key!r} of {self.path}: cannot decode image {path}: {error}") from error
            rgb.info[ORIGINAL_BYTES] = data
            images.append(rgb)
        # DIM's files repeat the source as the target where there is none: the same image object.
        source, target = images[0], (images[-1] if row.target_path is not None else None)
        return EditSample(key=row.key, source=source, target=target, instruction=row.prompt, blueprint=row.blueprint)

    def pairs(self) -> Iterator[tuple[TosRow, EditSample | T2ISample]]:
        """``(row, sample)`` for every row whose images exist and decode; the rest are counted."""
        for row in self.rows():
            try:
                yield row, self.load(row)
            except OSError as error:
                if self.strict:
                    raise
                self._skip("undecodable image", str(error))

    def __iter__(self) -> Iterator[EditSample | T2ISample]:
        for _, sample in self.pairs():
            yield sample
