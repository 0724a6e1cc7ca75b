"""Loop overhead: steps/s of ``Trainer.fit`` on the tiny DIM recipe against a hand-written PyTorch loop.

The module and its optimiser settings come from ``recipes/dim_edit_stage1.yaml`` +
``recipes/tiny/dim.yaml`` (built by ``ZooCLI(run=False)``), the batches from that recipe's
``ShardDataModule`` over toy shards written to a temporary folder (``python -m zoo data toy``),
collected once as floats so that both loops do the same work on the same batches. Every trial starts
from the same weights and seed. Cases:

* ``hand_loop`` (baseline): ``training_loss`` -> ``backward`` -> ``clip_grad_norm_`` (the recipe's
  ``gradient_clip_val``) -> AdamW step -> LR-schedule step -> ``zero_grad``, the optimiser and
  schedule built as ``configure_optimizers`` builds them;
* ``fit_bare``: ``Trainer.fit`` with no logger, checkpointing, progress bar or model summary;
* ``fit_logged``: ``Trainer.fit`` with a TensorBoard logger at the recipe's ``log_every_n_steps``.

Both loops end with the same weights (tests/benchmarks checks it). Two figures per case: the whole call (``fit`` includes the trainer's set-up and teardown), and the
steady-state loop between the first and the last step (``on_train_batch_start`` of step 1 to
``on_train_batch_end`` of the last; the hand loop times the same span).
``python -m benchmarks.loop_overhead [--steps N --repeats R]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from benchmarks.common import table, write
from datamodules.toy import main as toy_main
from zoo.modules.base import EditingModule, build_optimizer, lr_factor
from zoo.trainer_cli import ZooCLI

RECIPES = ("recipes/dim_edit_stage1.yaml", "recipes/tiny/dim.yaml")
ROOT = Path(__file__).resolve().parents[1]


class _Span(L.Callback):
    """Times the steady-state loop: from the start of step 1 (the second) to the end of the last."""

    def __init__(self) -> None:
        self.start = self.stop = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.stop = time.perf_counter()


def build(data: Path, batch_size: int) -> tuple[EditingModule, list[Any], float]:
    """The recipe's module, a list of float batches from its DataModule, and its gradient clip value."""
    args = [a for recipe in RECIPES for a in ("--config", str(ROOT / recipe))]
    args += [f"--data.init_args.train_shards={data / 'train'}", f"--data.init_args.val_shards={data / 'val'}",
             f"--data.init_args.batch_size={batch_size}", "--data.init_args.num_workers=0"]
    cli = ZooCLI(args=args, run=False)
    cli.datamodule.setup("fit")
    batches = list(cli.datamodule.train_dataloader())
    return cli.model, batches, float(cli.trainer.gradient_clip_val)


def _loader(batches: list[Any]) -> DataLoader:
    return DataLoader(batches, batch_size=None, num_workers=0)  # type: ignore[arg-type]


def hand_loop(model: EditingModule, batches: list[Any], steps: int, clip: float) -> tuple[float, float]:
    """Train ``model`` in place with a plain PyTorch loop; returns the steady span (start of step 1, end of the last)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, model.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, model.optim, steps))
    start = 0.0
    for index, batch in zip(range(steps), _loader(batches)):
        if index == 1:
            start = time.perf_counter()
        loss = model.training_loss(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return start, time.perf_counter()


def fit(model: EditingModule, batches: list[Any], steps: int, clip: float, logged: Path | None = None) -> tuple[float, float]:
    """Train ``model`` in place with ``Trainer.fit``; returns the steady span as ``hand_loop`` does."""
    span = _Span()
    logger: Any = L.pytorch.loggers.TensorBoardLogger(str(logged), name="") if logged else False
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=clip, logger=logger, log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[span],
    )
    trainer.fit(model, train_dataloaders=_loader(batches))
    return span.start, span.stop


def timed(train: Callable[[EditingModule], tuple[float, float]], pristine: EditingModule) -> tuple[float, float]:
    """(whole call, steady span) seconds of one trial from a copy of ``pristine`` at seed 0."""
    begin = time.perf_counter()
    torch.manual_seed(0)
    start, stop = train(copy.deepcopy(pristine))
    return time.perf_counter() - begin, stop - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16, help="the tiny recipe's batch size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a shared machine a second one waits on a busy core)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "toy"
        toy_main(["--out", str(data), "--train", str(args.steps * args.batch_size), "--val", "16", "--test", "16"])
        model, batches, clip = build(data, args.batch_size)
        cases: dict[str, Callable[[], tuple[float, float]]] = {
            "hand_loop": lambda: timed(lambda m: hand_loop(m, batches, args.steps, clip), model),
            "fit_bare": lambda: timed(lambda m: fit(m, batches, args.steps, clip), model),
            "fit_logged": lambda: timed(lambda m: fit(m, batches, args.steps, clip, Path(tmp) / "logs"), model),
        }
        cases["hand_loop"]()  # warm-up (allocator, lazy imports)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        names = list(cases)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                times[name].append(cases[name]())
    base = times["hand_loop"]
    whole = {n: statistics.median(t[0] / b[0] for t, b in zip(v, base)) for n, v in times.items()}
    steady = {n: statistics.median(t[1] / b[1] for t, b in zip(v, base)) for n, v in times.items()}
    steps_per_s = {n: statistics.median((args.steps - 1) / t[1] for t in v) for n, v in times.items()}
    ms_over = {n: statistics.median((t[1] - b[1]) / (args.steps - 1) * 1e3 for t, b in zip(v, base)) for n, v in times.items()}
    rows = [[n, steps_per_s[n], steady[n], ms_over[n], whole[n]] for n in cases]
    header = ["case", "steps/s (steady)", "time / hand loop (steady)", "ms per step over hand loop", "time / hand loop (whole call)"]
    markdown = (
        f"Tiny DIM ({' + '.join(RECIPES)}), batch {args.batch_size} at 32², {args.steps} steps per trial, "
        f"median of {args.repeats} interleaved repeats; goal: steady ratio <= 1.03.\n\n" + table(header, rows)
    )
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"recipes": list(RECIPES), "gradient_clip_val": clip}
    results = {"seconds_whole_and_steady": times, "ratio_steady": steady, "ratio_whole": whole,
               "steps_per_s_steady": steps_per_s, "ms_per_step_over_hand_loop": ms_over}
    write("loop_overhead", settings, results, markdown, **({"out": args.out} if args.out else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
