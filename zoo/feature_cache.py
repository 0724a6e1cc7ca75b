"""``python -m zoo data cache-features``: run a recipe's frozen encoders once over its shards and
write shards that carry their outputs, so training skips those encoders.

``zoo data cache-features --config RECIPE [--config OVERLAY ...] --out DIR [--splits train val]
[--dtype bfloat16|float16|float32] [--compression auto|zlib|none] [--batch-size N] [--device cuda]
[--section.key=value ...]`` builds the recipe's module and ``ShardDataModule`` (overrides as in
``zoo fit``), reads each split in index order and writes ``DIR/<split>``: one output shard per input
shard with the same samples in the same order (so a fit over the cache draws the same batches as one
over the originals), every original member kept (images, masks, json: what evaluation and the image
logger read) plus each sample's ``features.safetensors`` — the module's
:meth:`~zoo.modules.base.EditingModule.features_to_cache` (frozen MLLM states with their ids, the VAE
latents of source and target (GoT: reference, box canvases, target), SigLIP / pooled CLIP features
where frozen; :mod:`datamodules.features`).
Floating tensors are stored in ``--dtype`` (default bfloat16); ``--compression auto`` keeps a
sample's member zlib-compressed only where that saves 10% or more. ``index.json`` records the
fingerprint of the frozen parts' configuration, which ``zoo fit/validate/test/predict`` check before
building the model (a cache of another recipe is one ``zoo: error:`` line). The encoders run under
the recipe's precision (``trainer.precision``), as in the online fit.

What a cache would freeze is refused before any model is built: a DIM designer (it would be asked
once per sample and its reply frozen; write blueprints into the shards instead), a KL codec that
samples its posterior (``autoencoder.sample``), a DataModule other than ``ShardDataModule`` (whose
batches have no random augmentation). Classifier-free-guidance dropout and the objective's noise and
timesteps are drawn after the cache, every step, as online.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from datamodules.features import COMPRESSIONS, DTYPES, MEMBER, ZLIB_MEMBER, cache_info, pack, sample_features
from datamodules.samples import DataConfigError, EditSample, T2ISample, collate
from datamodules.shard_format import INDEX_NAME, SHARD_PATTERN, check_shards, decode_sample, read_tar, resolve_shards
from datamodules.shards import ShardDataModule
from zoo.blocks.config import ConfigError
from zoo.blocks.progress import counting
from zoo.modules.base import EditingModule
from zoo.trainer_cli import ZooCLI, guarded

log = logging.getLogger(__name__)


class _CacheCLI(ZooCLI):
    """The recipe's classes, with what a cache would freeze refused before any model is built."""

    def __init__(self, args: list[str], splits: list[str]) -> None:
        self.splits = splits
        super().__init__(args=args, run=False)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        refuse_frozen_randomness(self.config, self.splits)


def refuse_frozen_randomness(config: Any, splits: list[str]) -> None:
    """Raise :class:`ConfigError` for a recipe whose cached features would freeze something that must
    vary or be asked anew (module docstring), or :class:`DataConfigError` for a split it lacks."""
    data_class = str(config.get("data.class_path"))
    if data_class != f"{ShardDataModule.__module__}.{ShardDataModule.__name__}":
        raise ConfigError(f"cache-features reads ShardDataModule splits; this recipe's data is {data_class}")
    if config.get("model.init_args.designer") is not None:
        raise ConfigError(
            "model.init_args.designer is set: cache-features never asks a designer (a paid call per sample whose reply "
            "the cache would freeze); write the blueprints into the shards (zoo data convert --cot-jsonl) and set "
            "--model.init_args.designer=null"
        )
    if config.get("model.init_args.autoencoder.sample") is True:
        raise ConfigError(
            "model.init_args.autoencoder.sample is true: a cache would freeze one draw of the VAE posterior per "
            "sample; cache its mode (sample: false) or train online"
        )
    for split in splits:
        spec = config.get(f"data.init_args.{split}_shards")
        if spec is None:
            raise DataConfigError(f"the recipe has no data.init_args.{split}_shards to cache")
        check_shards(spec)


def refuse_existing(out: Path) -> None:
    """Raise :class:`DataConfigError` when ``out`` already holds a split: a cache never overwrites one."""
    if (out / INDEX_NAME).exists():
        raise DataConfigError(f"{out} already holds a split ({INDEX_NAME}); choose another --out or remove it")


def _kept(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample's members as they are, less webdataset's bookkeeping and any earlier cache."""
    return {k: v for k, v in raw.items() if (k == "__key__" or not k.startswith("__")) and k not in (MEMBER, ZLIB_MEMBER)}


def cache_split(
    module: EditingModule,
    data: ShardDataModule,
    spec: str,
    out: Path,
    *,
    dtype: str = "bfloat16",
    compression: str = "auto",
    batch_size: int | None = None,
    precision: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    progress: str | None = None,
) -> dict[str, Any]:
    """Write the cached copy of split ``spec`` to ``out`` (module docstring); returns its ``index.json``.
    ``precision``: the context the encoders run in (the trainer's ``precision_plugin.forward_context``)."""
    refuse_existing(out)
    module.resolution, module.mllm_resolution = int(data.resolution), int(data.mllm_resolution)
    fingerprint, config = module.feature_fingerprint()
    out.mkdir(parents=True, exist_ok=True)
    shards = resolve_shards(spec)
    size = batch_size or data.val_batch_size
    stats = {"samples": 0, "skipped": 0, "feature_bytes": 0, "original_bytes": 0, "compressed": 0}
    listed = []
    module.eval()
    with counting(progress, sum(n for _, n in shards), unit="samples") as advance:
        for index, (url, _) in enumerate(shards):
            name = SHARD_PATTERN % index
            with wds.TarWriter(str(out / name)) as writer:
                written = 0
                for raws, samples in _batches(url, size, data, stats):
                    batch = collate(samples, data.resolution, data.mllm_resolution).to(module.device)
                    with torch.no_grad(), precision():
                        features = module.features_to_cache(batch)
                    for row, raw in enumerate(raws):
                        member, packed = pack(sample_features(features, row, DTYPES[dtype]), compression)
                        record = _kept(raw)
                        stats["original_bytes"] += sum(len(v) for k, v in record.items() if k != "__key__")
                        stats["feature_bytes"] += len(packed)
                        stats["compressed"] += member == ZLIB_MEMBER
                        writer.write({**record, member: packed})
                        written += 1
                        advance()
            listed.append({"url": name, "samples": written})
    for entry in [entry for entry in listed if not entry["samples"]]:  # every sample of that shard was skipped
        (out / entry["url"]).unlink()
        listed.remove(entry)
    total = sum(entry["samples"] for entry in listed)
    module_path = f"{type(module).__module__}.{type(module).__qualname__}"
    index = {
        "shards": listed, "total": total,
        "features": cache_info(fingerprint, config, module_path, dtype, compression, data.resolution, data.mllm_resolution),
        "cache_stats": {**stats, "samples": total},
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return index


def _batches(url: str, size: int, data: ShardDataModule, stats: dict[str, int]) -> Iterator[tuple[list[dict[str, Any]], list[EditSample | T2ISample]]]:
    """``(raw samples, decoded records)`` of one shard in batches of ``size``; undecodable ones are
    counted in ``stats["skipped"]`` and logged (raised with ``data.strict``)."""
    raws: list[dict[str, Any]] = []
    samples: list[EditSample | T2ISample] = []
    for raw in read_tar(url):
        try:
            samples.append(decode_sample(raw, need_target=True, max_pixels=data.max_pixels, features=False))
        except Exception as error:
            if data.strict:
                raise RuntimeError(f"undecodable sample in shard {url}, key {raw.get('__key__')!r}: {error}") from error
            stats["skipped"] += 1
            log.warning("skipped a sample of shard %s, key %r: %s", url, raw.get("__key__"), error)
            continue
        raws.append(raw)
        if len(samples) == size:
            yield raws, samples
            raws, samples = [], []
    if samples:
        yield raws, samples


def _summary(split: str, out: Path, index: dict[str, Any]) -> str:
    stats, info, total = index["cache_stats"], index["features"], max(1, index["total"])
    return (
        f"cached {index['total']} {split} samples in {len(index['shards'])} shard(s) to {out}: features "
        f"{stats['feature_bytes'] / total / 1024:.1f} KiB/sample ({info['dtype']}, {stats['compressed']} of {index['total']} "
        f"zlib-compressed), originals {stats['original_bytes'] / total / 1024:.1f} KiB/sample; skipped {stats['skipped']}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zoo data cache-features``; returns the exit status (2: one ``zoo: error:`` line)."""
    parser = argparse.ArgumentParser(
        prog="zoo data cache-features", allow_abbrev=False,
        description="Run a recipe's frozen encoders once over its shards and write shards carrying their outputs.",
    )
    parser.add_argument("--config", action="append", required=True, help="recipe, then overlays (as zoo fit)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: one split folder per --splits entry")
    parser.add_argument("--splits", nargs="+", choices=("train", "val"), default=["train"], help="splits to cache (default: train)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="storage dtype of floating features (default: bfloat16)")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="auto", help="zlib per sample: auto = where it saves >= 10%% (default)")
    parser.add_argument("--batch-size", type=int, default=None, help="encoder batch size (default: the recipe's val_batch_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the encoders (default: cuda if present)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [word for word in overrides if word.startswith("-") and not word.startswith(("--model.", "--data.", "--trainer.", "--seed_everything"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    recipe = [word for path in args.config for word in ("--config", path)] + overrides
    for split in args.splits:  # before any model is built
        try:
            refuse_existing(args.out / split)
        except DataConfigError as error:
            print(f"zoo: error: {error}", file=sys.stderr)
            return 2
    return guarded(lambda: _cache(args, recipe))


def _cache(args: argparse.Namespace, recipe: list[str]) -> None:
    cli = _CacheCLI(recipe, args.splits)
    module, data = cli.model, cli.datamodule
    module.to(args.device)
    for split in args.splits:
        out = args.out / split
        index = cache_split(
            module, data, getattr(data, f"{split}_shards"), out, dtype=args.dtype, compression=args.compression,
            batch_size=args.batch_size, precision=cli.trainer.precision_plugin.forward_context, progress=f"caching {split}",
        )
        print(_summary(split, out, index))


if __name__ == "__main__":
    raise SystemExit(main())
