"""Readers of the ImgEdit-Bench definition files (PKU-YuanGroup/ImgEdit ``Benchmark/``, ImgEdit paper §5);
the training release (parquet, pre-processing JSON, image tars) is read by :mod:`datamodules.formats.imgedit_release`.

Three suites, each a JSON file plus the benchmark images (``Benchmark.tar`` on the HF dataset
``sysuyy/ImgEdit``, unpacked by the user):

- **basic** ``basic_edit.json``: 737 items ``key -> {"id": "<category>/<file>.jpg", "prompt", "edit_type"}``;
  images under ``<images>/singleturn/<id>``. Until 2025-06-16 the 94 ``adjust`` items were labelled
  ``alter``; both labels are accepted and reported as ``adjust`` (the rubric key of ``prompts.json``).
- **uge** ``UGE_edit.json``: 47 hard items ``key -> {"id": "<file>.jpg", "prompt"}``; images under
  ``<images>/UGE/<id>`` (one score per sample, no edit type).
- **multiturn**: ``key -> {"id": "<file>.jpg", "turn1", "turn2"[, "turn3"]}`` (``Multiturn_readme.md``);
  images under ``<images>/multiturn/<id>``.

Image folders are tried as ``<images>/<sub>/<id>`` then ``<images>/<id>`` so either the tar root or
the suite folder can be passed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from datamodules.samples import EditSample

log = logging.getLogger(__name__)

BASIC_TYPES = ("add", "remove", "replace", "adjust", "extract", "style", "background", "action", "compose")
"""The 9 edit types of the basic suite, in the column order of the ImgEdit paper's Table 3."""

LEGACY_LABELS = {"alter": "adjust"}
"""Edit-type labels of basic_edit.json before upstream commit b3eb8e7 (2025-06-16) -> current label."""

SUITES = ("basic", "uge", "multiturn")
IMAGE_SUBFOLDERS = {"basic": "singleturn", "uge": "UGE", "multiturn": "multiturn"}


@dataclass
class ImgEditCase:
    """One benchmark case: ``turns`` holds one instruction (basic, UGE) or 2-3 (multi-turn)."""

    key: str
    image_id: str
    turns: list[str]
    edit_type: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def normalise_edit_type(label: str, renames: Mapping[str, str] = LEGACY_LABELS, known: Sequence[str] | None = BASIC_TYPES) -> str:
    """``label`` with ``renames`` applied (default: the benchmark's ``alter`` -> ``adjust``); with
    ``known`` (default :data:`BASIC_TYPES`) the result must be one of them."""
    label = renames.get(label, label)
    if known is not None and label not in known:
        raise ValueError(f"unknown ImgEdit edit_type {label!r}; expected one of {tuple(known)} (or legacy 'alter')")
    return label


def read_cases(path: str | os.PathLike[str], suite: str) -> list[ImgEditCase]:
    """The cases of one suite file, in file order.

    Raises:
        ValueError: unknown suite, a file that is not a JSON object, or an item missing its fields
            (naming the key), so a wrong file never yields a partial benchmark.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an ImgEdit-Bench file is a JSON object key -> case, got {type(data).__name__}")
    cases = []
    for key, item in data.items():
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError(f"{path}: case {key!r} has no string 'id' field: {item!r}")
        if suite == "multiturn":
            turns = [item[f"turn{i}"] for i in range(1, 4) if isinstance(item.get(f"turn{i}"), str)]
            if len(turns) < 2:
                raise ValueError(f"{path}: multi-turn case {key!r} needs 'turn1' and 'turn2' (and optionally 'turn3')")
        elif isinstance(item.get("prompt"), str):
            turns = [item["prompt"]]
        else:
            raise ValueError(f"{path}: case {key!r} has no string 'prompt' field")
        edit_type = normalise_edit_type(item.get("edit_type", "")) if suite == "basic" else ""
        cases.append(ImgEditCase(key=str(key), image_id=item["id"], turns=turns, edit_type=edit_type))
    return cases


def resolve_case_image(images_dir: str | os.PathLike[str], suite: str, image_id: str) -> Path | None:
    """The case's source image file, or None when it is in neither accepted place."""
    root = Path(images_dir)
    for candidate in (root / IMAGE_SUBFOLDERS[suite] / image_id, root / image_id):
        if candidate.is_file():
            return candidate
    return None


def load_case(images_dir: str | os.PathLike[str], suite: str, case: ImgEditCase) -> EditSample:
    """The case as an :class:`EditSample`: its first turn as instruction, the later ones as ``turns``
    (the module edits each from the previous result), no target (judged, not compared).

    Raises:
        FileNotFoundError / OSError: the image is missing or undecodable (naming case and path).
    """
    path = resolve_case_image(images_dir, suite, case.image_id)
    if path is None:
        raise FileNotFoundError(
            f"ImgEdit {suite} case {case.key!r}: image {case.image_id!r} not found under {images_dir} "
            f"(or its {IMAGE_SUBFOLDERS[suite]}/ folder); unpack Benchmark.tar from the HF dataset sysuyy/ImgEdit"
        )
    with Image.open(path) as image:
        source = image.convert("RGB")
    return EditSample(key=case.key, source=source, instruction=case.turns[0], edit_type=case.edit_type or None, turns=case.turns[1:])
