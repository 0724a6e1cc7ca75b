"""ImgEdit's pre-processing JSON (HF ``sysuyy/ImgEdit_recap_mask``, ``jsons/part*.tar``): boxes and masks.

One JSON object per LAION image (README "Preprocess Data Json Format"): ``path``
(``00095/00019/000197953.jpg``), ``cap``, ``resolution{height, width}``, ``tags``, and
``segmentation{background: [...], object: [...], box_format: "xyxy"}`` whose items are
``{class_name, bbox: [x1, y1, x2, y2] in pixels, mask, score, clip_score, aes_score}``.

Masks: ``mask`` is the ``counts`` string of a *compressed* COCO RLE of the item's SAM2 mask at the
image's ``resolution``: upstream's ``dataprocessor/4_yolo_seg_aes_clip.py`` stores
``pycocotools.mask.encode(np.asfortranarray(mask))["counts"].decode("utf-8")``, and its
``inpaint-workflow/imgedit/utils/mask.py::rle_to_mask`` decodes ``{"counts": s.encode(), "size":
[height, width]}``. That helper returns the *inverted* image ``(1 - mask) * 255`` (object = 0);
:func:`rle_mask` gives the zoo's convention instead: an "L" image, 255 inside the object.

Linking a JSON to the edit rows: the release's single-turn folders are named after the LAION path
with ``/`` -> ``_`` and the extension dropped (README: ``00094_00030_000304748`` for
``00094/00030/000304748.jpg``): :func:`row_image_id` and :func:`json_image_id` give that id.

Which object an edit changed is not in the parquet. ``5_generate_single_turn_prompt.py`` picks it
from ``segmentation.object`` (remove, replace, adjust) or ``segmentation.background`` (background)
and has GPT-4o write the prompt around its ``class_name``. :func:`edit_region` therefore takes the
item of that list whose ``class_name`` occurs in the prompt as whole words, and only when exactly
one item does; for other edit types (add, style, action, extract, hybrid, ...) or any doubt it
gives no mask. Boxes (:meth:`SegmentedImage.boxes`) are every detected item of the JSON's image.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from datamodules.samples import BOX_RANGE, DataConfigError

EDIT_REGION_GROUP = {"remove": "object", "replace": "object", "adjust": "object", "background": "background"}
"""Edit type -> the segmentation list its edited item comes from (``5_generate_single_turn_prompt.py``)."""

GROUPS = ("object", "background")


def row_image_id(path: str) -> str:
    """The id of a release row's image: its folder name
    (``results_remove_laion_part5/00094_00030_000304748/original.png`` -> ``00094_00030_000304748``)."""
    return PurePosixPath(path).parent.name


def json_image_id(path: str) -> str:
    """The id of a JSON object's ``path``: ``/`` -> ``_``, no extension (``00094/00030/000304748.jpg`` -> ``00094_00030_000304748``)."""
    return PurePosixPath(path).with_suffix("").as_posix().replace("/", "_")


def rle_mask(counts: str, height: int, width: int) -> Image.Image:
    """The mask of a compressed-RLE ``counts`` string: "L", 255 inside the object (see the module docstring)."""
    decoded = mask_util.decode({"counts": counts.encode("utf-8"), "size": [height, width]})
    return Image.fromarray((decoded > 0).astype(np.uint8) * 255, mode="L")


@dataclass(frozen=True)
class Segment:
    """One detected item: ``group`` "object" or "background", ``bbox`` xyxy in pixels, ``counts`` its RLE."""

    class_name: str
    group: str
    bbox: tuple[float, float, float, float]
    counts: str


@dataclass(frozen=True)
class SegmentedImage:
    """One pre-processing JSON object, as far as the converter uses it."""

    path: str
    height: int
    width: int
    segments: tuple[Segment, ...]
    source: str
    """The JSON file (or ``tar:member``) it was read from, for the report."""

    def boxes(self) -> list[dict[str, Any]]:
        """Every item's box in the zoo's format (:func:`datamodules.samples.check_boxes`): ints in
        [0, 1000) relative to the image, ``label`` the class name."""
        scale = (BOX_RANGE / self.width, BOX_RANGE / self.height) * 2
        return [
            {"box": [min(BOX_RANGE - 1, max(0, int(v * s))) for v, s in zip(segment.bbox, scale)], "color": "", "label": segment.class_name}
            for segment in self.segments
        ]

    def masks(self, group: str) -> list[tuple[str, Image.Image]]:
        """``(class_name, mask)`` of the items of ``group``, masks as :func:`rle_mask`."""
        return [(s.class_name, rle_mask(s.counts, self.height, self.width)) for s in self.segments if s.group == group]


def edit_region(image: SegmentedImage, edit_type: str, prompt: str) -> tuple[str, Image.Image] | None:
    """``(class_name, mask)`` of the item the edit changed, or None where that is not well defined
    (the rule of the module docstring: the one item of the edit type's list named in the prompt)."""
    group = EDIT_REGION_GROUP.get(edit_type)
    if group is None:
        return None
    text = prompt.lower()
    named = [s for s in image.segments if s.group == group and re.search(rf"\b{re.escape(s.class_name.lower())}\b", text)]
    if len(named) != 1:
        return None
    return named[0].class_name, rle_mask(named[0].counts, image.height, image.width)


def _segments(entry: dict[str, Any]) -> tuple[Segment, ...]:
    segmentation = entry["segmentation"]
    if segmentation.get("box_format", "xyxy") != "xyxy":
        raise ValueError(f"box_format {segmentation['box_format']!r} is not 'xyxy'")
    segments = []
    for group in GROUPS:
        for item in segmentation.get(group, []):
            bbox = item["bbox"]
            if not isinstance(item["class_name"], str) or not isinstance(item["mask"], str) or len(bbox) != 4:
                raise ValueError(f"a {group} item needs a string class_name and mask and a 4-number bbox: {str(item)[:120]}")
            segments.append(Segment(item["class_name"], group, tuple(float(v) for v in bbox), item["mask"]))  # type: ignore[arg-type]
    return tuple(segments)


def parse_entry(entry: Any, source: str) -> SegmentedImage:
    """One JSON object; raises ValueError naming the defect."""
    try:
        height, width = int(entry["resolution"]["height"]), int(entry["resolution"]["width"])
        if not isinstance(entry["path"], str) or height < 1 or width < 1:
            raise ValueError(f"needs a string path and a positive resolution, got {entry['path']!r}, {height}x{width}")
        return SegmentedImage(entry["path"], height, width, _segments(entry), source)
    except (KeyError, TypeError) as error:
        raise ValueError(f"not an ImgEdit pre-processing object (lacks {error})") from error


def _entries(document: Any) -> list[Any]:
    """The objects of one JSON document: one object, a list of them, or ``{key: object}`` (the pipeline's step files)."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict) and "path" not in document and all(isinstance(v, dict) for v in document.values()):
        return list(document.values())
    return [document]


def _documents(paths: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[str, bytes]]:
    """``(where, JSON bytes)`` of the JSON files named: files, folders of ``*.json``, tars of them."""
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(path.rglob("*.json")) + sorted(path.rglob("*.tar"))
        elif path.is_file():
            files = [path]
        else:
            raise DataConfigError(f"--json {path}: no such file or folder")
        for file in files:
            if file.suffix != ".tar":
                yield str(file), file.read_bytes()
                continue
            with tarfile.open(file) as tar:
                for member in (m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    yield f"{file}:{member.name}", handle.read()


def read_segmentations(paths: Sequence[str | os.PathLike[str]]) -> tuple[dict[str, SegmentedImage], list[str]]:
    """The JSON objects of ``paths`` by :func:`json_image_id` of their ``path``, and the ``path`` of each
    object whose id an earlier object already had (the first is kept).

    Raises:
        DataConfigError: a file that is not JSON or an object without the published fields (naming both).
    """
    images: dict[str, SegmentedImage] = {}
    repeated: list[str] = []
    for where, data in _documents(paths):
        try:
            entries = _entries(json.loads(data))
            parsed = [parse_entry(entry, where) for entry in entries]
        except ValueError as error:
            raise DataConfigError(f"--json {where}: {error}") from error
        for image in parsed:
            if json_image_id(image.path) in images:
                repeated.append(image.path)
            else:
                images[json_image_id(image.path)] = image
    return images, repeated
