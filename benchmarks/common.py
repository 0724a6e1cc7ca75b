"""What every benchmark shares: the machine description, interleaved timing with medians, result files.

A benchmark times several *cases* in one run: each repeat runs every case once, in an order that
rotates from repeat to repeat (so a slow phase of a loaded machine hits each case alike), and a
case's figure against the baseline is the median over repeats of the ratio of their rates *within*
the repeat. ``write`` stores ``benchmarks/results/<name>.json`` (machine, settings, raw rates,
ratios) and ``<name>.md`` (the table that benchmarks/README.md quotes).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str | int]:
    """What the numbers were measured on, and when."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def interleaved(
    cases: Mapping[str, Callable[[], float]], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Per case, ``repeats`` rates (work done / seconds); each case's callable does one trial and
    returns its amount of work (images, steps, edits). Repeat ``r`` starts at case ``r mod n``.
    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU seconds only,
    which other jobs on a shared machine disturb less (for single-process work)."""
    names = list(cases)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = clock()
            work = cases[name]()
            rates[name].append(work / (clock() - start))
    return rates


def ratios(rates: Mapping[str, list[float]], baseline: str) -> dict[str, float]:
    """Per case, the median over repeats of its rate / the baseline's rate in the same repeat."""
    base = rates[baseline]
    return {name: statistics.median(r / b for r, b in zip(values, base)) for name, values in rates.items()}


def medians(rates: Mapping[str, list[float]]) -> dict[str, float]:
    """Per case, the median rate."""
    return {name: statistics.median(values) for name, values in rates.items()}


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats get three significant digits."""

    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, settings: Mapping[str, Any], results: Mapping[str, Any], markdown: str, out: Path = RESULTS) -> Path:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``; returns the json path."""
    out.mkdir(parents=True, exist_ok=True)
    host = machine()
    record = {"benchmark": name, "machine": host, "settings": dict(settings), "results": dict(results)}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    stamp = f"{host['date']}, {host['cpus']} CPUs, {host['torch_threads']} torch threads, torch {host['torch']}, python {host['python']}"
    (out / f"{name}.md").write_text(f"# {name}\n\n{markdown}\n\nMeasured {stamp}; command `python -m benchmarks.{name}`.\n")
    print(markdown)
    return out / f"{name}.json"
