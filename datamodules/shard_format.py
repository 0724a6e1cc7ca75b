"""WebDataset tar shards on disk: the schema, the writer and the reader every zoo data tool shares.

Shard schema (one split = one folder)
-------------------------------------
``<split>/shard-000000.tar, shard-000001.tar, ...`` written with ``webdataset.ShardWriter``.
One sample is the group of tar members sharing a ``__key__`` (keys must not contain "." or "/",
because webdataset splits a member name at its first dot):

* ``<key>.json``   utf-8 JSON object: ``task`` ("edit" | "t2i"), ``instruction`` (T2I: the prompt),
  ``blueprint`` (DIM 5-section CoT or null), ``chain`` (GoT reasoning chain, absent or null),
  ``optimized_instruction`` (edit only: MIND-Edit's appendix-C rewrite, absent or null),
  ``history`` (edit only: a later dialogue turn's earlier instructions, oldest first; absent or []),
  ``turns`` (edit only: the instructions of a multi-turn case's later turns; absent or []),
  ``edit_type`` (or null), ``boxes`` (list of
  ``{"box": [x1, y1, x2, y2] ints in [0,1000), "color": str, "label": str}``), plus free extra fields
  (kept out of the batch, e.g. the toy generator's scene description).
* ``<key>.source.png``  edit only: the source image (RGB; any PIL-readable bytes are accepted: a
  converted JPEG keeps its original bytes under this name).
* ``<key>.target.png``  the edited image (T2I: the image); absent in predict sets, and absent with
  ``"target_is_source": true`` in the json when the target is the source itself (stored once).
* ``<key>.mask.png``    optional "L" image, 255 inside the edit region.
* ``<key>.turn<k>_target.png``, ``<key>.turn<k>_mask.png``  a multi-turn case's exact target and
  "L" edit mask of turn ``k`` = 2, 3, ... (``EditSample.turn_targets`` / ``turn_masks``), for every
  later turn or none.

``<split>/index.json`` = ``{"shards": [{"url": "shard-000000.tar", "samples": n}, ...], "total": N}``
(urls relative to the folder) is written by :func:`write_split`, so sample counts are known without
reading the tars: this is what makes exact epochs, equal per-rank batch counts and ``len()`` possible.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps

from datamodules.features import unpack
from datamodules.samples import ORIGINAL_BYTES, DataConfigError, EditSample, T2ISample
from zoo.blocks.progress import counting

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
INDEX_NAME = "index.json"


# --- writing -----------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: shards are read far more often than written, and decode speed barely depends on it.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _encoded(image: Image.Image) -> bytes:
    """The bytes a reader decoded ``image`` from (:data:`ORIGINAL_BYTES`), else lossless PNG."""
    original = image.info.get(ORIGINAL_BYTES)
    return original if isinstance(original, bytes) else _png(image)


def encode_sample(sample: EditSample | T2ISample, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn a record into a ``ShardWriter`` sample following the schema above."""
    if "." in sample.key or "/" in sample.key or not sample.key:
        raise ValueError(f"shard keys must be non-empty and contain no '.' or '/': {sample.key!r}")
    meta: dict[str, Any] = dict(extra or {})
    record: dict[str, Any] = {"__key__": sample.key}
    if isinstance(sample, EditSample):
        meta.update(task="edit", instruction=sample.instruction, edit_type=sample.edit_type)
        record["source.png"] = _encoded(sample.source)
        target = sample.target
        if target is sample.source:  # one copy of a repeated image
            meta["target_is_source"], target = True, None
        if sample.mask is not None:
            record["mask.png"] = _png(sample.mask)
        if sample.optimized_instruction is not None:
            meta["optimized_instruction"] = sample.optimized_instruction
        if sample.history:
            meta["history"] = list(sample.history)
        if sample.turns:
            meta["turns"] = list(sample.turns)
        for turn, image in enumerate(sample.turn_targets, start=2):
            record[f"turn{turn}_target.png"] = _png(image)
        for turn, mask in enumerate(sample.turn_masks, start=2):
            record[f"turn{turn}_mask.png"] = _png(mask)
    else:
        meta.update(task="t2i", instruction=sample.prompt, edit_type=None)
        target = sample.image
    meta.update(blueprint=sample.blueprint, boxes=sample.boxes)
    if sample.chain is not None:
        meta["chain"] = sample.chain
    if target is not None:
        record["target.png"] = _encoded(target)
    record["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return record


def write_split(
    out_dir: str | os.PathLike[str],
    records: Iterable[EditSample | T2ISample | tuple[EditSample | T2ISample, dict[str, Any]]],
    samples_per_shard: int,
    progress: str | None = None,
    total: int | None = None,
) -> dict[str, Any]:
    """Write one split folder of tar shards plus its ``index.json``; returns the index.

    With ``progress`` (a label) a Rich progress bar counts the samples written, with their rate and,
    given ``total``, the time left, and a summary line ends it (:func:`zoo.blocks.progress.counting`).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: list[dict[str, Any]] = []
    holder: list[wds.ShardWriter] = []

    def record_count(fname: str) -> None:
        counts.append({"url": Path(fname).name, "samples": holder[0].count})

    writer = wds.ShardWriter(
        str(out / SHARD_PATTERN), maxcount=samples_per_shard, maxsize=float(1 << 40), post=record_count, verbose=0
    )
    holder.append(writer)
    seen: set[str] = set()
    with counting(progress, total, unit="samples") as advance:
        for item in records:
            sample, extra = item if isinstance(item, tuple) else (item, None)
            if sample.key in seen:
                raise ValueError(f"duplicate sample key {sample.key!r} in split {out}")
            seen.add(sample.key)
            writer.write(encode_sample(sample, extra))
            advance()
    writer.close()
    # ShardWriter opens its first shard eagerly, so an empty split leaves an empty tar behind.
    for entry in [c for c in counts if c["samples"] == 0]:
        (out / entry["url"]).unlink(missing_ok=True)
    shards = [c for c in counts if c["samples"] > 0]
    index = {"shards": shards, "total": sum(c["samples"] for c in shards)}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return index


# --- reading -----------------------------------------------------------------------------------


def _count_tar(url: str) -> int:
    return sum(1 for _ in read_tar(url))


def resolve_shards(spec: str) -> list[tuple[str, int]]:
    """``(url, n_samples)`` per shard from a split folder with ``index.json`` or a brace pattern;
    several of them joined by ``::`` (webdataset's separator) mix their splits, e.g. single- and
    multi-turn ImgEdit shards: ``data/imgedit/train::data/imgedit_multiturn/train``.

    A brace pattern (``data/train/shard-{000000..000009}.tar``) has no index, so its tars are read
    once here to count samples; write splits with :func:`write_split` to avoid that.
    """
    if "::" in spec:
        return [shard for part in spec.split("::") for shard in resolve_shards(part)]
    listed = _listing(spec)
    if any(n is None for _, n in listed):
        log.info("counting samples of %d shards (no %s for %s)", len(listed), INDEX_NAME, spec)
    return [(url, _count_tar(url) if n is None else n) for url, n in listed]


def cache_of(spec: str) -> dict[str, Any] | None:
    """The feature-cache description (``index.json``'s ``"features"``, :func:`datamodules.features.cache_info`)
    of a split, or None for plain shards; every part of a ``::`` mix must agree, else :class:`DataConfigError`."""
    infos = []
    for part in spec.split("::"):
        index = Path(part) / INDEX_NAME
        infos.append(json.loads(index.read_text()).get("features") if index.is_file() else None)
    if any(info != infos[0] for info in infos):
        raise DataConfigError(f"shard spec {spec} mixes splits of different feature caches (or cached with plain shards): cache them together")
    return infos[0]


def check_shards(spec: str) -> None:
    """Raise :class:`DataConfigError` naming the spec and the problem unless every shard it names
    exists and a split folder's index lists samples; reads no tar (``zoo`` checks a stage's splits
    before any model is built)."""
    for part in spec.split("::"):
        _listing(part)


def _listing(spec: str) -> list[tuple[str, int | None]]:
    """``(url, n_samples)`` of one split folder's index, or ``(url, None)`` per tar of a brace pattern."""
    path = Path(spec)
    if path.is_dir():
        index_file = path / INDEX_NAME
        if not index_file.is_file():
            raise DataConfigError(f"shard folder {spec} has no {INDEX_NAME} (write it with `python -m zoo data ...` or write_split())")
        index = json.loads(index_file.read_text())
        shards: list[tuple[str, int | None]] = [(str(path / s["url"]), int(s["samples"])) for s in index["shards"]]
        missing = [url for url, _ in shards if not Path(url).is_file()]
        if missing:
            raise DataConfigError(f"shard folder {spec}: {INDEX_NAME} lists {len(missing)} missing shard(s), e.g. {missing[0]}")
        if not any(n for _, n in shards):
            raise DataConfigError(f"shard folder {spec} holds no samples ({INDEX_NAME} lists none)")
        return shards
    urls = wds.shardlists.expand_urls(spec)
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        raise DataConfigError(f"shard spec {spec}: no such folder or file(s), e.g. {missing[0]}")
    return [(url, None) for url in urls]


def read_tar(url: str) -> Iterator[dict[str, Any]]:
    """Undecoded samples of one tar, ``{"__key__": ..., suffix: bytes}``, via webdataset's tar iterators."""
    streams = wds.tariterators.url_opener([{"url": url}])
    yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams))


MAX_PIXELS = 64_000_000
"""Default cap on the pixels of one image of a sample (``ShardDataModule(max_pixels=...)``): a
100-megapixel image decodes to 1.2 GB before any resize."""


def _open_image(data: bytes, mode: str, max_pixels: int | None) -> Image.Image:
    """Decode ``data`` as ``mode`` ("RGB" or "L"); images over ``max_pixels`` are refused from their
    header, before decoding. 16-bit greyscale (``I;16*``, and ``I`` as PIL opens some 16-bit files)
    is scaled to 8 bits: PIL's own conversion clips it to 255, a white image. An EXIF orientation
    (a camera's JPEG stored sideways) is applied, so the pixels are the upright image a viewer shows."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{width}x{height} image ({width * height / 1e6:.1f} MP) is over the {max_pixels / 1e6:g} MP cap (max_pixels)")
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image, dtype=np.float64)
        if levels.min() < 0 or levels.max() > 65535:
            raise ValueError(f"{image.mode} image with values outside 16 bits ({levels.min():g}..{levels.max():g})")
        image = Image.fromarray(np.round(levels / 257).astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)  # convert() to the same mode copies


def _optional_text(meta: dict[str, Any], name: str) -> str | None:
    """``meta[name]``: a string or null/absent; a GoT chain must also be non-empty."""
    value = meta.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"json {name!r} must be a string or null, got {type(value).__name__}")
    if name == "chain" and value is not None and not value.strip():
        raise ValueError("json 'chain' is empty (a GoT sample needs its reasoning chain, or null)")
    return value


def decode_sample(
    raw: dict[str, Any], need_target: bool = False, max_pixels: int | None = MAX_PIXELS, features: bool = True
) -> EditSample | T2ISample:
    """Raw webdataset sample (member suffix -> bytes) -> typed record; raises on any defect.

    ``need_target``: a sample without a target image is a defect (training and validation compute a
    loss on it; a batch cannot mix samples with and without one). ``max_pixels``: cap of each image.
    ``features``: read a feature cache's member (:mod:`datamodules.features`) into ``features``.
    """
    key = raw["__key__"]
    if "json" not in raw:
        raise ValueError("no .json member")
    meta = json.loads(raw["json"].decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("task") not in ("edit", "t2i"):
        raise ValueError(f"json must be an object with task 'edit' or 't2i', got {str(meta)[:80]!r}")
    if not isinstance(meta.get("instruction"), str):
        raise ValueError("json has no string 'instruction'")
    texts = {name: _optional_text(meta, name) for name in ("optimized_instruction", "blueprint", "chain", "edit_type")}
    history, turns = meta.get("history") or [], meta.get("turns") or []
    for name, given in (("history", history), ("turns", turns)):
        if not isinstance(given, list) or not all(isinstance(text, str) for text in given):
            raise ValueError(f"json {name!r} must be a list of instruction strings")
    target_is_source = meta.get("target_is_source") is True and meta["task"] == "edit"
    if need_target and "target.png" not in raw and not target_is_source:
        raise ValueError("no target.png (training and validation need a target image)")
    target = _open_image(raw["target.png"], "RGB", max_pixels) if "target.png" in raw else None
    boxes = meta.get("boxes") or []
    cached = unpack(raw) if features else None
    if meta["task"] == "t2i":
        return T2ISample(
            key=key, image=target, prompt=meta["instruction"], blueprint=texts["blueprint"], boxes=boxes, chain=texts["chain"], features=cached
        )
    if "source.png" not in raw:
        raise ValueError("edit sample without source.png")
    source = _open_image(raw["source.png"], "RGB", max_pixels)
    if target_is_source:
        target = source.copy()
    return EditSample(
        key=key,
        source=source,
        instruction=meta["instruction"],
        target=target,
        blueprint=texts["blueprint"],
        edit_type=texts["edit_type"],
        mask=_open_image(raw["mask.png"], "L", max_pixels) if "mask.png" in raw else None,
        boxes=boxes,
        chain=texts["chain"],
        optimized_instruction=texts["optimized_instruction"],
        history=history,
        turns=turns,
        turn_targets=_turn_images(raw, "target", "RGB", max_pixels),
        turn_masks=_turn_images(raw, "mask", "L", max_pixels),
        features=cached,
    )


def _turn_images(raw: dict[str, Any], name: str, mode: str, max_pixels: int | None) -> list[Image.Image]:
    """The ``turn<k>_<name>.png`` members of a sample for k = 2, 3, ... until one is missing."""
    images = []
    while (member := f"turn{len(images) + 2}_{name}.png") in raw:
        images.append(_open_image(raw[member], mode, max_pixels))
    return images
