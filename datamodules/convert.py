"""Convert a DIM "tos" release (jsonl + images [+ CoT jsonl]) or a GoT dataset into tar shards with ``index.json``.

``python -m zoo data convert --jsonl X --image-root Y [--cot-jsonl Z] --out DIR --samples-per-shard N``
``python -m zoo data convert --format got --got-kind t2i|edit|multi_turn|mixed --jsonl X [--fields '{"chain": "got_text"}'] --out DIR``
Images keep the bytes they were read from (a JPEG stays the same JPEG under the schema's
``source.png``/``target.png`` names; nothing is resized), a target that repeats the source file is
stored once, and the row's extra fields go into the sample json.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Iterable, Iterator

from datamodules.formats.dim import TosJsonl
from datamodules.formats.got import KINDS, GoTReader
from datamodules.samples import EditSample, T2ISample
from datamodules.shard_format import write_split



def _shard_key(key: str) -> str:
    # webdataset splits member names at the first dot, so ids like "a.b" would break grouping.
    return re.sub(r"[./\\\s]", "_", key)


def _records(pairs: Iterable[tuple[EditSample | T2ISample, dict]]) -> Iterator[tuple[EditSample | T2ISample, dict]]:
    for sample, extra in pairs:
        extra = dict(extra)
        shard_key = _shard_key(sample.key)
        if shard_key != sample.key:
            extra["id"] = sample.key
            sample.key = shard_key
        yield sample, extra


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code (0 ok, 1 when nothing could be converted)."""
    parser = argparse.ArgumentParser(prog="zoo data convert", allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("dim", "got"), default="dim", help="release format (default: dim)")
    parser.add_argument("--jsonl", required=True, help="DIM tos jsonl (id, image_path, prompt[, image_path_target]); GoT: .jsonl or .json")
    parser.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the jsonl's)")
    parser.add_argument("--cot-jsonl", default=None, help="DIM *_cot.jsonl whose prompts become the blueprint field")
    parser.add_argument("--got-kind", choices=KINDS, default=None, help="GoT rows: t2i, edit, multi_turn or mixed (each row by its fields; required with --format got)")
    parser.add_argument("--fields", default=None, help='GoT field-name overrides as JSON, e.g. \'{"chain": "got_text"}\'')
    parser.add_argument("--out", required=True, help="output split folder (tars + index.json)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--strict", action="store_true", help="fail on the first missing or undecodable image")
    args = parser.parse_args(argv)
    if args.format == "got":
        if args.got_kind is None:
            parser.error("--format got needs --got-kind (t2i, edit, multi_turn or mixed)")
        try:
            fields = json.loads(args.fields) if args.fields else None
            reader: TosJsonl | GoTReader = GoTReader(args.jsonl, args.got_kind, args.image_root, fields, args.strict)
        except ValueError as error:
            parser.error(f"--fields: {error}")
        pairs: Iterable[tuple[EditSample | T2ISample, dict]] = reader.pairs()
    else:
        reader = TosJsonl(args.jsonl, image_root=args.image_root, cot_jsonl=args.cot_jsonl, strict=args.strict)
        pairs = ((sample, row.extra) for row, sample in reader.pairs())
    index = write_split(args.out, _records(pairs), args.samples_per_shard, progress="converting")
    print(f"wrote {index['total']} samples in {len(index['shards'])} shard(s) to {args.out}; skipped {reader.skipped}")
    return 0 if index["total"] > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
