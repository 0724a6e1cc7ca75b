"""Progress of long work outside the trainer's loop: a Rich bar and a final summary line.

Data conversion, toy shards, annotation, judging and designer calls count their items with
:func:`counting`; the bar looks like the trainer's (Lightning's ``RichProgressBar`` is Rich too):
description, bar, ``done/total``, items per second, time elapsed and time left. When the work ends
(or fails) one plain line says how many items took how long, so a log file without the live bar
still records it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    """Items per second."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:.1f}/s")


def summary_line(label: str, done: int, seconds: float, unit: str = "items", total: int | None = None) -> str:
    """``label: 12 of 20 items in 3.0 s (4.0/s)``; ``of total`` only when it differs from ``done``."""
    counted = f"{done} of {total}" if total is not None and total != done else f"{done}"
    rate = f"{done / seconds:.1f}/s" if seconds > 0 else "-"
    return f"{label}: {counted} {unit} in {seconds:.1f} s ({rate})"


@contextmanager
def counting(label: str | None, total: int | None = None, unit: str = "items") -> Iterator[Callable[[int], None]]:
    """A Rich progress bar over ``total`` items (unknown: no time left) that ends in :func:`summary_line`,
    both on stdout as the trainer's bar; yields ``advance(n=1)``, which counts ``n`` finished items.
    ``label`` None: silent."""
    if label is None:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate())
    start, done = time.perf_counter(), [0]
    try:
        with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn()) as bar:
            task = bar.add_task(label, total=total)

            def advance(n: int = 1) -> None:
                done[0] += n
                bar.advance(task, n)

            yield advance
    finally:
        print(summary_line(label, done[0], time.perf_counter() - start, unit, total))
