"""Inference latency of every module at tiny size on the CPU: steps, resolution, batched vs one by one.

The modules are the tiny ones of ``tests/modules/test_*.py`` (random weights; MIND-Edit's tiny
frozen side is pretrained once at build time). A trial is one ``edit_batch`` call (the VLM's own
text -- DIM's prompt, GoT's chain, MIND-Edit's optimized instruction -- then the sampler) under
``torch.inference_mode`` on toy edits. Per module, against its base setting (its tests' sampler
steps, the tests' resolution, a batch of 4) in the same run, interleaved repeats, medians:

* ``steps x2`` / ``steps x4``: latency ratio with 2x / 4x the sampler steps;
* ``res x2``: latency ratio at twice the side (4x the pixels);
* ``one by one``: 4 single-edit calls against one batch of 4 (> 1: batching pays).

``python -m benchmarks.inference [--repeats R --only DIM GoT ...]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import table, write
from datamodules.samples import EditBatch, collate
from datamodules.toy import edit_sample
from zoo.modules.base import EditingModule

BATCH = 4


def _dim() -> tuple[EditingModule, int]:
    from tests.modules.conftest import tiny_dim_kwargs
    from zoo.modules.dim import DIMModule

    torch.manual_seed(0)
    return DIMModule(**tiny_dim_kwargs()), 16


def _got() -> tuple[EditingModule, int]:
    from tests.modules.test_golden import build

    return build("got_edit"), 16


def _mind_edit() -> tuple[EditingModule, int]:
    from tests.modules.test_mind_edit import make

    return make(), 32


def _imgedit(stage: int) -> Callable[[], tuple[EditingModule, int]]:
    def build() -> tuple[EditingModule, int]:
        from tests.modules.test_imgedit_e1 import make

        return make(stage=stage), 16

    return build


MODULES: dict[str, Callable[[], tuple[EditingModule, int]]] = {
    "DIM": _dim, "GoT": _got, "MIND-Edit": _mind_edit, "ImgEdit-E1 stage 1": _imgedit(1), "ImgEdit-E1 stage 2": _imgedit(2),
}


def toy_batch(size: int, resolution: int) -> EditBatch:
    return collate([edit_sample(0, "test", i, resolution)[0] for i in range(size)], resolution, resolution)


def trial(model: EditingModule, batches: list[EditBatch], steps: int, loops: int = 1) -> float:
    """Seconds per loop to edit ``batches`` (one call each) with ``steps`` sampler steps, ``loops`` times."""
    model.num_inference_steps = steps
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(loops):
            for batch in batches:
                model.edit_batch(batch, torch.Generator().manual_seed(0))
    return (time.perf_counter() - start) / loops


def measure(model: EditingModule, resolution: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per case and repeat; the cases interleaved, rotating their order each repeat."""
    steps = model.num_inference_steps
    base, large = toy_batch(BATCH, resolution), toy_batch(BATCH, 2 * resolution)
    singles = [base.select([i]) for i in range(BATCH)]
    trial(model, [base], steps)  # warm-up
    loops = max(1, round(0.3 / trial(model, [base], steps)))  # trials of >= ~0.3 s: short ones are all noise
    cases: dict[str, Callable[[], float]] = {
        "base": lambda: trial(model, [base], steps, loops),
        "steps x2": lambda: trial(model, [base], 2 * steps, loops),
        "steps x4": lambda: trial(model, [base], 4 * steps, loops),
        "res x2": lambda: trial(model, [large], steps, loops),
        "one by one": lambda: trial(model, singles, steps, loops),
    }
    names, seconds = list(cases), {name: [] for name in cases}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds[name].append(cases[name]())
    model.num_inference_steps = steps
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="module names (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a shared machine a second one waits on a busy core)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results, rows = {}, []
    for name, build in MODULES.items():
        if args.only is not None and name not in args.only:
            continue
        model, resolution = build()
        model.eval()
        seconds = measure(model, resolution, args.repeats)
        ratio = {case: statistics.median(s / b for s, b in zip(values, seconds["base"])) for case, values in seconds.items()}
        latency = statistics.median(seconds["base"]) / BATCH
        results[name] = {"resolution": resolution, "steps": model.num_inference_steps, "seconds": seconds, "ratio_to_base": ratio,
                         "latency_per_edit_s": latency}
        rows.append([name, f"{resolution}²", model.num_inference_steps, latency * 1e3, 1 / latency, ratio["steps x2"], ratio["steps x4"],
                     ratio["res x2"], ratio["one by one"]])
    header = ["module", "side", "steps", "ms / edit (batch of 4)", "edits/s", "steps x2", "steps x4", "res x2", "one by one / batched"]
    markdown = (f"Tiny modules of tests/modules on the CPU, toy edits, batch of {BATCH}; latency ratios against each module's base "
                f"setting in the same run (median of {args.repeats} interleaved repeats).\n\n" + table(header, rows))
    write("inference", {"repeats": args.repeats, "batch": BATCH, "only": args.only, "threads": args.threads}, results, markdown, **({"out": args.out} if args.out else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
