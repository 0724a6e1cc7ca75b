"""Feature cache: training steps/s from cached frozen-encoder features against online encoding, on the
tiny DIM, ImgEdit-E1 stage-1 and GoT pretraining recipes; cache bytes per sample by storage dtype and
compression.

Per recipe (``recipes/dim_edit_stage1.yaml`` + ``recipes/tiny/dim.yaml``; ``recipes/imgedit_e1_stage1.yaml``
+ ``recipes/tiny/imgedit_e1_stage1.yaml``; ``recipes/got_pretrain.yaml`` + ``recipes/tiny/got.yaml``, its
LoRA VLM online, T2I and edit samples mixed; built by ``ZooCLI(run=False)``), toy shards are written to a
temporary folder and cached with :func:`zoo.feature_cache.cache_split` (the code of ``zoo data
cache-features``) in bf16. Cases, each a trial of ``--steps`` steps of ``training_loss`` -> ``backward``
-> optimiser step from the same weights and seed, batches read by the recipe's ``ShardDataModule``
(0 workers, so decoding is inside the timed span for both):

* ``online`` (baseline): the original shards, the frozen encoders run every step;
* ``cached``: the cached shards, the module reads their features and skips the encoders.

The ratio cached / online steps/s is the median of within-repeat ratios over interleaved repeats,
timed by default in this process's CPU seconds (``--clock process``): with 0 loader workers all of a
trial's work is in this process, and on a shared machine wall time mostly measures the other jobs.
The same trials give the drift of bf16 storage: max |Δw| between the two cases' final trainable
weights, beside max |w_T - w_0| (the size of the update itself). Cache bytes per sample are measured
on the first batch's features for float32 / bfloat16 storage, raw and zlib level 1.
``python -m benchmarks.feature_cache [--steps N --repeats R --batch-size B]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import interleaved, ratios, table, write
from datamodules.features import pack, sample_features
from datamodules.shards import ShardDataModule
from datamodules.toy import main as toy_main
from zoo.feature_cache import cache_split
from zoo.modules.base import EditingModule, build_optimizer
from zoo.trainer_cli import ZooCLI

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "DIM (tiny, stage 1)": (("recipes/dim_edit_stage1.yaml", "recipes/tiny/dim.yaml"), "edit"),
    "ImgEdit-E1 stage 1 (tiny)": (("recipes/imgedit_e1_stage1.yaml", "recipes/tiny/imgedit_e1_stage1.yaml"), "imgedit"),
    "GoT pretrain (tiny)": (("recipes/got_pretrain.yaml", "recipes/tiny/got.yaml"), "mixed"),
}
"""Benchmarked recipe -> (recipe + overlay, toy task)."""
CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
"""What a trial is timed by: CPU seconds of this process (0 loader workers: all the work is here), or wall time."""


def build(recipes: tuple[str, ...], data: Path, batch_size: int) -> tuple[EditingModule, ShardDataModule]:
    """The recipe's module and DataModule over toy shards in ``data`` (0 workers)."""
    args = [a for recipe in recipes for a in ("--config", str(ROOT / recipe))]
    args += [f"--data.init_args.train_shards={data / 'train'}", "--data.init_args.val_shards=null", "--data.init_args.test_shards=null",
             f"--data.init_args.batch_size={batch_size}", f"--data.init_args.val_batch_size={batch_size}", "--data.init_args.num_workers=0"]
    cli = ZooCLI(args=args, run=False)
    return cli.model, cli.datamodule


def loader(like: ShardDataModule, spec: Path) -> ShardDataModule:
    """A DataModule like ``like`` over ``spec``."""
    data = ShardDataModule(
        train_shards=str(spec), batch_size=like.batch_size, resolution=like.resolution, mllm_resolution=like.mllm_resolution,
        num_workers=0, seed=like.seed,
    )
    data.setup("fit")
    return data


def trial(pristine: EditingModule, data: ShardDataModule, steps: int, weights: list[dict[str, torch.Tensor]]) -> float:
    """``steps`` training steps of a copy of ``pristine`` at seed 0; appends its final trainable weights."""
    model = copy.deepcopy(pristine).train()
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, model.optim)
    for batch in islice(data.train_dataloader(), steps):
        model.training_loss(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return float(steps)


def _max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def storage_bytes(model: EditingModule, data: ShardDataModule) -> dict[str, float]:
    """Mean bytes per sample of one batch's cached features, per ``dtype/compression``."""
    batch = next(iter(data.train_dataloader())).to(model.device)
    features = model.features_to_cache(batch)
    out: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for compression in ("none", "zlib"):
            sizes = [len(pack(sample_features(features, row, dtype), compression)[1]) for row in range(len(batch))]
            out[f"{str(dtype).removeprefix('torch.')}/{compression}"] = statistics.mean(sizes)
    return out


def measure(name: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    recipes, task = RECIPES[name]
    toy = tmp / task
    toy_main(["--out", str(toy), "--train", str(args.steps * args.batch_size), "--val", "4", "--test", "4", "--task", task])
    model, data = build(recipes, toy, args.batch_size)
    online = loader(data, toy / "train")
    index = cache_split(model, online, str(toy / "train"), tmp / f"{task}_cache", dtype="bfloat16")
    cached = loader(data, tmp / f"{task}_cache")
    weights: dict[str, list[dict[str, torch.Tensor]]] = {"online": [], "cached": []}
    cases = {case: (lambda case=case, data=source: trial(model, data, args.steps, weights[case])) for case, source in (("online", online), ("cached", cached))}
    rates = interleaved(cases, args.repeats, CLOCKS[args.clock])
    start = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    stats = index["cache_stats"]
    return {
        "recipes": list(recipes), "steps_per_s": {c: statistics.median(r) for c, r in rates.items()}, "rates": rates,
        "ratio_cached_to_online": ratios(rates, "online")["cached"],
        "bf16_max_abs_dw": _max_delta(weights["online"][0], weights["cached"][0]),
        "max_abs_update": _max_delta(weights["online"][0], start),
        "cache_bytes_per_sample": {"features (bf16, auto)": stats["feature_bytes"] / index["total"],
                                   "originals": stats["original_bytes"] / index["total"]} | storage_bytes(model, online),
        "compressed_share_auto": stats["compressed"] / index["total"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="the tiny recipes' batch size")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="process", help="process: this process's CPU seconds (default; 0 loader workers); wall")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a shared machine a second one waits on a busy core)")
    parser.add_argument("--only", nargs="*", default=None, help=f"recipes to run (default: all of {list(RECIPES)})")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: measure(name, Path(tmp), args) for name in RECIPES if args.only is None or name in args.only}
    rows = [[name, r["steps_per_s"]["online"], r["steps_per_s"]["cached"], r["ratio_cached_to_online"],
             f"{r['bf16_max_abs_dw']:.1e} / {r['max_abs_update']:.1e}"] for name, r in results.items()]
    sizes = [[name, *(f"{b / 1024:.1f}" for b in r["cache_bytes_per_sample"].values())] for name, r in results.items()]
    size_header = ["recipe", *(f"KiB/sample {k}" for k in next(iter(results.values()))["cache_bytes_per_sample"])]
    markdown = (
        f"Batch {args.batch_size} at 32², {args.steps} steps per trial, median of {args.repeats} interleaved repeats, "
        f"{args.threads} torch thread(s), {args.clock} clock; cache in bf16.\n\n"
        + table(["recipe", "steps/s online", "steps/s cached", "cached / online", "bf16 max |Δw| / max |w_T - w_0|"], rows)
        + "\n\nCache bytes per sample (first batch's features; `auto` keeps zlib where it saves >= 10%):\n\n" + table(size_header, sizes)
    )
    write("feature_cache", {k: v for k, v in vars(args).items() if k != "out"}, results, markdown, **({"out": args.out} if args.out else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
