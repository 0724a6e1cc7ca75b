"""Convert a DIM "tos" release (jsonl + images [+ CoT jsonl]), a GoT dataset, HumanEdit or ImgEdit into tar shards with ``index.json``.

``python -m zoo data convert --jsonl X --image-root Y [--cot-jsonl Z] --out DIR --samples-per-shard N``
``python -m zoo data convert --format got --got-kind t2i|edit|multi_turn|mixed --jsonl X [--fields '{"chain": "got_text"}'] --out DIR``
``python -m zoo data convert --format humanedit --parquet data/ --out DIR [--test-size 500]`` writes
``DIR/train`` and ``DIR/test`` (the split of :mod:`datamodules.formats.humanedit`), with masks.
``python -m zoo data convert --format imgedit --parquet Parquet/remove_part5.parquet --images Singleturn/remove_part5.tar.split.* [--json jsons/part0.tar] --out DIR``
reads single-turn and multi-turn parquet files alike (each by its columns: a ``data`` column is
multi-turn) with their images from folders, tars or split-tar parts
(:mod:`datamodules.formats.imgedit_release`), and prints what rows, archives and JSON lack of each
other. Its bad arguments or inputs are one ``zoo: error:`` line and exit status 2.
Images keep the bytes they were read from (a JPEG stays the same JPEG under the schema's
``source.png``/``target.png`` names; nothing is resized), a target that repeats the source file is
stored once, and the row's extra fields go into the sample json.

``--annotations FILE`` (any format) joins the ``{"key", "optimized_instruction"}`` lines that
``zoo data annotate`` writes into the edit samples' ``optimized_instruction``, by shard key; how many
edit samples found none is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Iterable, Iterator

from datamodules.formats.dim import TosJsonl, read_jsonl
from datamodules.formats.got import KINDS, GoTReader
from datamodules.formats.humanedit import TEST_SIZE, HumanEditParquet
from datamodules.formats.imgedit_release import ImgEditRelease
from datamodules.samples import DataConfigError, EditSample, T2ISample
from datamodules.shard_format import write_split

Pairs = Iterable[tuple[EditSample | T2ISample, dict]]


def shard_key(key: str) -> str:
    """The shard key of a release's sample id (also the key annotations are joined by)."""
    # webdataset splits member names at the first dot, so ids like "a.b" would break grouping.
    return re.sub(r"[./\\\s]", "_", key)


ANNOTATION_FIELDS = ("key", "optimized_instruction")
"""The string fields of every line ``zoo data annotate`` writes."""


def read_annotations(path: str, strict: bool) -> tuple[dict[str, str], int]:
    """``key -> optimized_instruction`` of an annotations JSONL, and how many malformed lines were
    skipped (an interrupted ``zoo data annotate`` can leave its last line cut short); ``strict``
    raises on the first one instead."""
    rows, bad = read_jsonl(path, strict=strict, required=ANNOTATION_FIELDS)
    return {row["key"]: row["optimized_instruction"] for row in rows}, bad


class _Records:
    """The pairs with shard keys (the release's id kept as ``id`` where it differs) and annotations
    joined; ``unannotated`` counts the edit samples the annotations lack."""

    def __init__(self, pairs: Pairs, annotations: dict[str, str] | None) -> None:
        self.pairs, self.annotations, self.unannotated = pairs, annotations, 0

    def __iter__(self) -> Iterator[tuple[EditSample | T2ISample, dict]]:
        for sample, extra in self.pairs:
            extra = dict(extra)
            key = shard_key(sample.key)
            if key != sample.key:
                extra["id"] = sample.key
                sample.key = key
            if self.annotations is not None and isinstance(sample, EditSample):
                sample.optimized_instruction = self.annotations.get(key)
                self.unannotated += sample.optimized_instruction is None
            yield sample, extra


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code (0 ok, 1 when nothing could be converted)."""
    parser = argparse.ArgumentParser(prog="zoo data convert", allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("dim", "got", "humanedit", "imgedit"), default="dim", help="release format (default: dim)")
    parser.add_argument("--jsonl", default=None, help="DIM tos jsonl (id, image_path, prompt[, image_path_target]); GoT: .jsonl or .json")
    parser.add_argument("--parquet", nargs="+", default=None, help="HumanEdit, ImgEdit: parquet files or folders of them")
    parser.add_argument("--images", nargs="+", default=None, help="ImgEdit: folders, .tar files and .tar.split.NNN parts holding the rows' images")
    parser.add_argument("--json", nargs="+", default=None, help="ImgEdit: pre-processing JSON files, folders or tars of them (boxes, edit masks)")
    parser.add_argument("--test-size", type=int, default=TEST_SIZE, help=f"HumanEdit: ids in the test split (default: {TEST_SIZE})")
    parser.add_argument("--annotations", default=None, help="zoo data annotate's JSONL, joined into optimized_instruction by key")
    parser.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the jsonl's)")
    parser.add_argument("--cot-jsonl", default=None, help="DIM *_cot.jsonl whose prompts become the blueprint field")
    parser.add_argument("--got-kind", choices=KINDS, default=None, help="GoT rows: t2i, edit, multi_turn or mixed (each row by its fields; required with --format got)")
    parser.add_argument("--fields", default=None, help='GoT field-name overrides as JSON, e.g. \'{"chain": "got_text"}\'')
    parser.add_argument("--out", required=True, help="output split folder (tars + index.json); HumanEdit: the folder of train/ and test/")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--strict", action="store_true", help="fail on the first missing or undecodable image")
    args = parser.parse_args(argv)
    parquet_format = args.format in ("humanedit", "imgedit")
    if parquet_format != (args.parquet is not None) or parquet_format == (args.jsonl is not None):
        parser.error("--format humanedit and imgedit read --parquet; dim and got read --jsonl")
    if (args.format == "imgedit") != (args.images is not None) or (args.json is not None and args.format != "imgedit"):
        parser.error("--images (and the optional --json) go with --format imgedit, which needs --images")
    try:
        return _convert(parser, args)
    except DataConfigError as error:
        print(f"zoo: error: {error}", file=sys.stderr)
        return 2


def _convert(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The conversion ``main`` checked the arguments of; raises DataConfigError for bad input."""
    annotations = None
    if args.annotations:
        try:
            annotations, _ = read_annotations(args.annotations, strict=True)
        except (OSError, ValueError) as error:
            parser.error(f"--annotations: {error}")
    reader: TosJsonl | GoTReader | HumanEditParquet | ImgEditRelease
    if args.format == "imgedit":
        imgedit = ImgEditRelease(args.parquet, args.images, args.json or (), strict=args.strict)
        splits, reader = {"": imgedit.pairs()}, imgedit
    elif args.format == "humanedit":
        try:
            humanedit = HumanEditParquet(args.parquet, test_size=args.test_size, strict=args.strict)
        except (OSError, ValueError) as error:
            parser.error(f"--parquet: {error}")
        splits = {split: humanedit.pairs(split) for split in ("train", "test")}
        reader = humanedit
    elif args.format == "got":
        if args.got_kind is None:
            parser.error("--format got needs --got-kind (t2i, edit, multi_turn or mixed)")
        try:
            fields = json.loads(args.fields) if args.fields else None
            reader = GoTReader(args.jsonl, args.got_kind, args.image_root, fields, args.strict)
        except ValueError as error:
            parser.error(f"--fields: {error}")
        splits = {"": reader.pairs()}
    else:
        tos = TosJsonl(args.jsonl, image_root=args.image_root, cot_jsonl=args.cot_jsonl, strict=args.strict)
        splits, reader = {"": ((sample, row.extra) for row, sample in tos.pairs())}, tos
    total, unannotated = 0, 0
    for split, pairs in splits.items():
        out = f"{args.out}/{split}" if split else args.out
        records = _Records(pairs, annotations)
        index = write_split(out, records, args.samples_per_shard, progress=f"converting {split}".strip())
        total, unannotated = total + index["total"], unannotated + records.unannotated
        print(f"wrote {index['total']} samples in {len(index['shards'])} shard(s) to {out}")
    joined = f"; {unannotated} edit sample(s) without an annotation" if annotations is not None else ""
    if isinstance(reader, ImgEditRelease):
        print("\n".join(reader.report()) + joined)
    else:
        print(f"skipped {reader.skipped}{joined}")
    return 0 if total > 0 else 1

if __name__ == "__main__":
    raise SystemExit(main())
