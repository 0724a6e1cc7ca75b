"""Annotate edit samples with MIND-Edit's optimized instructions through a chat model (MIND-Edit §4, appendix C).

MIND-Edit's instruction-optimisation targets were written by GPT-4o from the source image and the
appendix-C prompt. ``zoo data annotate`` does that for every edit sample of a shard split or of
HumanEdit's parquet files, with any OpenAI-compatible endpoint (:mod:`zoo.blocks.chat`):

``python -m zoo data annotate --parquet data/ --split train --out ann.jsonl --base-url URL --model gpt-4o-2024-11-20``
``python -m zoo data annotate --shards data/toy/train --out ann.jsonl --base-url http://localhost:8000/v1 --model M --api-key-env ""``

Each reply is parsed (:func:`zoo.blocks.optimized_instruction.parse`) and written re-rendered as
``{"key": <shard key>, "optimized_instruction": ...}``, one line per sample, appended and flushed
at once: the output is also the cache, so a rerun (after an interruption, or to retry failures)
asks only for the keys it lacks. Failed samples (chat errors, unparsable replies, empty
instructions) are logged, counted by kind in the one summary line and never written. The shards
with the annotations joined are written by ``zoo data convert --annotations ann.jsonl``.

Exit status: 0 when anything was annotated or nothing was left to do, 1 when every sample asked
for failed, 2 for bad arguments (one ``zoo: error:`` line, before any request is sent).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, cast

from datamodules.convert import read_annotations, shard_key
from datamodules.formats.humanedit import TEST_SIZE, HumanEditParquet, Split
from datamodules.samples import EditSample
from datamodules.shard_format import decode_sample, read_tar, resolve_shards
from zoo.blocks.chat import ChatClient, ChatConfig, ChatError, build_chat_client, complete_many
from zoo.blocks.config import ConfigError
from zoo.blocks.optimized_instruction import OptimizedInstructionError, annotation_prompt, parse
from zoo.blocks.progress import counting

log = logging.getLogger(__name__)


class ArgumentError(ValueError):
    """A bad argument, found before any request is sent."""


def _shard_samples(split: str) -> tuple[Iterator[EditSample | None], int]:
    """Every sample of a shard split (None for a T2I one, which has nothing to edit) and their count."""
    shards = resolve_shards(split)

    def samples() -> Iterator[EditSample | None]:
        for url, _ in shards:
            for raw in read_tar(url):
                sample = decode_sample(raw)
                yield sample if isinstance(sample, EditSample) else None

    return samples(), sum(count for _, count in shards)


def _parquet_samples(paths: list[str], split: Split, test_size: int) -> tuple[Iterator[EditSample | None], int]:
    """The edit samples of a HumanEdit split, keyed as ``zoo data convert`` writes (and joins) them."""
    reader = HumanEditParquet(paths, test_size=test_size)

    def samples() -> Iterator[EditSample | None]:
        for sample, _ in reader.pairs(split):
            sample.key = shard_key(sample.key)
            yield sample

    return samples(), reader.split_size(split)


class Annotator:
    """Asks ``client`` for the optimized instruction of samples, writing each success to ``out`` at once.

    ``counts`` holds ``annotated``, ``cached`` (already in ``out``) and one entry per kind of failure.
    """

    def __init__(self, client: ChatClient, out: IO[str], done: set[str], workers: int) -> None:
        self.client, self.out, self.done, self.workers = client, out, done, workers
        self.counts: Counter[str] = Counter()

    def run(self, samples: Iterator[EditSample | None], advance: Callable[[], None]) -> None:
        """Annotate every sample not yet done, ``workers`` requests at a time."""
        pending: list[tuple[EditSample, str]] = []
        for sample in samples:
            if sample is None:
                advance()
            elif sample.key in self.done:
                self.counts["cached"] += 1
                advance()
            else:
                try:
                    pending.append((sample, annotation_prompt(sample.instruction)))
                except ValueError:
                    self._failed(sample.key, "empty instruction", "the instruction is empty")
                    advance()
                if len(pending) == self.workers:
                    self._ask(pending, advance)
                    pending = []
        if pending:
            self._ask(pending, advance)

    def _ask(self, pending: list[tuple[EditSample, str]], advance: Callable[[], None]) -> None:
        replies = complete_many(self.client, [[s.source, prompt] for s, prompt in pending], max_workers=self.workers)
        for (sample, _), reply in zip(pending, replies):
            if isinstance(reply, ChatError):
                self._failed(sample.key, "chat error", str(reply))
            else:
                try:
                    rendered = parse(reply).render()
                except OptimizedInstructionError as error:
                    self._failed(sample.key, "unparsable reply", str(error))
                else:
                    self.out.write(json.dumps({"key": sample.key, "optimized_instruction": rendered}, ensure_ascii=False) + "\n")
                    self.out.flush()
                    self.done.add(sample.key)
                    self.counts["annotated"] += 1
            advance()

    def _failed(self, key: str, kind: str, message: str) -> None:
        self.counts[kind] += 1
        log.warning("not annotated %s (%s): %s", key, kind, message)

    def summary(self, out: str) -> str:
        """The one line that says what happened."""
        failures = {kind: n for kind, n in sorted(self.counts.items()) if kind not in ("annotated", "cached")}
        kinds = ", ".join(f"{kind} {n}" for kind, n in failures.items())
        failed = f"failed {sum(failures.values())}" + (f" ({kinds})" if kinds else "")
        return f"annotated {self.counts['annotated']}, already in {out} {self.counts['cached']}, {failed}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo data annotate", allow_abbrev=False, description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", default=None, help="a shard split folder (with index.json) or brace pattern")
    source.add_argument("--parquet", nargs="+", default=None, help="HumanEdit parquet files or folders (as zoo data convert reads them)")
    parser.add_argument("--split", choices=("train", "test", "all"), default="train", help="HumanEdit: which split (default: train)")
    parser.add_argument("--test-size", type=int, default=TEST_SIZE, help=f"HumanEdit: ids in the test split (default: {TEST_SIZE})")
    parser.add_argument("--out", required=True, help="annotations JSONL: appended to, and read first as the cache")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    parser.add_argument("--model", required=True, help="model name (Azure: the deployment)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help='variable holding the API key; "" for a server without authentication')
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    parser.add_argument("--max-retries", type=int, default=5, help="retries on rate limits, server errors and timeouts (default: 5)")
    parser.add_argument("--max-tokens", type=int, default=None, help="reply length limit (default: the server's)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent requests (default: 4)")
    return parser


def _setup(args: argparse.Namespace) -> tuple[ChatClient, Iterator[EditSample | None], int]:
    """The client and the samples; raises :class:`ArgumentError` for anything wrong, sending nothing."""
    if args.workers < 1:
        raise ArgumentError(f"--workers must be at least 1, got {args.workers}")
    api_key_env = args.api_key_env or None
    try:
        # The options are named as ChatConfig's fields, which check them.
        options = {name: getattr(args, name) for name in ("base_url", "model", "timeout", "max_retries", "max_tokens")}
        config = ChatConfig(api_key_env=api_key_env, **options)
    except ConfigError as error:
        raise ArgumentError(str(error)) from error
    if api_key_env is not None and not os.environ.get(api_key_env, "").strip():
        raise ArgumentError(f'environment variable {api_key_env} holding the API key is not set (--api-key-env "" for a server without one)')
    try:
        if args.shards is not None:
            samples, total = _shard_samples(args.shards)
        else:
            samples, total = _parquet_samples(args.parquet, cast(Split, args.split), args.test_size)
    except (OSError, ValueError) as error:
        raise ArgumentError(str(error)) from error
    return build_chat_client(config), samples, total


def _open_cache(path: Path) -> tuple[IO[str], set[str]]:
    """The annotations file opened for appending and the keys it already holds."""
    done: set[str] = set()
    if path.is_file():
        annotations, broken = read_annotations(str(path), strict=False)
        done = set(annotations)
        if broken:
            log.warning("%s: ignored %d malformed line(s) (an interrupted write?); their samples are asked again", path, broken)
        # An interrupted write can leave the last line unterminated: the next one must not join it.
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("a", encoding="utf-8") as handle:
                handle.write("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8"), done


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    args = _parser().parse_args(argv)
    try:
        client, samples, total = _setup(args)
    except ArgumentError as error:
        print(f"zoo: error: {error}", file=sys.stderr)
        return 2
    out, done = _open_cache(Path(args.out))
    annotator = Annotator(client, out, done, args.workers)
    with out, counting("annotating", total, unit="samples") as advance:
        annotator.run(samples, advance)
    print(annotator.summary(args.out))
    asked = sum(n for kind, n in annotator.counts.items() if kind != "cached")
    return 1 if asked and not annotator.counts["annotated"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
