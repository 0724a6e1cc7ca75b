"""Reader of a GEdit-Bench export (HF dataset ``stepfun-ai/GEdit-Bench``, Step1X-Edit paper §5).

The dataset is a parquet table; users export it once to a jsonl plus image files (any tool). One
row per case with ``task_type`` (one of the 11 :data:`GROUPS`), ``key``, the instruction
(``instruction``, or ``prompt`` as in DIM's ``tos_dataset_edit_en.jsonl``), ``instruction_language``
(``en``/``cn``), ``Intersection_exist`` (bool) and the input image path (``image``, or DIM's
``image_path``), relative to the jsonl's folder or ``image_root``. DIM's GEdit jsonl is accepted
as-is. Two keys repeat across task types, so a case id is ``"<task_type>/<key>"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from datamodules.formats.dim import resolve_image
from datamodules.samples import EditSample

GROUPS = (
    "background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
    "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer",
)
"""The 11 task groups of GEdit-Bench, in the order of Step1X-Edit's table."""

LANGUAGES = ("en", "cn")


@dataclass
class GEditCase:
    """One GEdit-Bench case; ``id`` = ``"<task_type>/<key>"`` is unique, ``key`` alone is not."""

    task_type: str
    key: str
    instruction: str
    language: str
    intersection: bool
    image: str

    @property
    def id(self) -> str:
        return f"{self.task_type}/{self.key}"


def read_gedit_jsonl(path: str | os.PathLike[str], language: str | None = "en") -> list[GEditCase]:
    """Cases of an export, filtered to ``language`` (None keeps all), in file order.

    Raises:
        ValueError: a row missing a field, an unknown task type or language, or a repeated id
            (naming the line), so a wrong export never yields a partial benchmark silently.
    """
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES} or None, got {language!r} (GEdit uses 'cn', not 'zh')")
    cases, seen = [], set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        instruction = row.get("instruction", row.get("prompt"))
        image = row.get("image", row.get("image_path"))
        where = f"{path}:{number}"
        if not all(isinstance(v, str) for v in (row.get("task_type"), row.get("key"), instruction, image)):
            raise ValueError(f"{where}: a GEdit row needs string task_type, key, instruction (or prompt) and image (or image_path)")
        if row["task_type"] not in GROUPS:
            raise ValueError(f"{where}: unknown task_type {row['task_type']!r}; expected one of {GROUPS}")
        lang = row.get("instruction_language", "en")
        if lang not in LANGUAGES:
            raise ValueError(f"{where}: instruction_language must be one of {LANGUAGES}, got {lang!r}")
        case = GEditCase(row["task_type"], row["key"], instruction, lang, bool(row.get("Intersection_exist", False)), image)
        if language is not None and lang != language:
            continue
        if case.id in seen:
            raise ValueError(f"{where}: case {case.id!r} appears twice")
        seen.add(case.id)
        cases.append(case)
    return cases


def load_gedit_case(image_root: str | os.PathLike[str], case: GEditCase) -> EditSample:
    """The case as an :class:`EditSample` keyed by its id, ``edit_type`` = task group.

    Raises:
        FileNotFoundError: the input image is missing (naming the case).
    """
    path = resolve_image(Path(image_root), case.image)
    if path is None:
        raise FileNotFoundError(f"GEdit case {case.id!r}: input image {case.image!r} not found under {image_root}")
    with Image.open(path) as image:
        source = image.convert("RGB")
    return EditSample(key=case.id, source=source, instruction=case.instruction, edit_type=case.task_type)
