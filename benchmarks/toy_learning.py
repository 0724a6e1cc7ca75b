"""Collect the toy-learning demos' results into ``benchmarks/toy_learning.{json,md}``.

Run after ``make demo`` (and ``make demo MODEL=got``)::

    python benchmarks/toy_learning.py            # reads runs/demo*/metrics.json and their train configs

Per model: training steps, wall times (set-up apart), the toy edit score per edit type of every
evaluation (untrained, trained, ablations, copy-the-source) and the checks, plus the machine that
demo ran on (a demo kept from the last ``toy_learning.json`` keeps its own machine). The hand-written notes after the ``NOTES`` marker (the routes measured on the way) are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from zoo.demo import DEMOS  # noqa: E402


NOTES = "<!-- hand-written notes below are kept when the tables above are rewritten -->"


def collect(earlier: dict[str, dict], host: dict[str, str | int]) -> dict[str, dict]:
    """Every demo that has run: its metrics.json plus its steps, batch size and ``host`` (this
    machine), from ``runs/`` where it ran here, else ``earlier``'s (the last ``toy_learning.json``),
    so a rerun of one demo rewrites only its own section."""
    results = {}
    for name, demo in DEMOS.items():
        folder = ROOT / demo.folder
        if not (folder / "metrics.json").is_file():
            if name in earlier:
                results[name] = earlier[name]
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        config = yaml.safe_load((folder / "train" / "config.yaml").read_text())
        results[name] = {
            "recipes": list(demo.recipes),
            "steps": config["trainer"]["max_steps"],
            "batch_size": config["data"]["init_args"]["batch_size"],
            "bar": demo.bar,
            "machine": host,
            "metrics": metrics,
        }
    return results


def _table(metrics: dict, labels: list[str], groups: list[str], name: str) -> list[str]:
    """Markdown rows of ``name`` per edit type (rows) and evaluation (columns)."""
    rows = ["| edit type | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for group in groups:
        cells = [f"{metrics[label].get(group, {}).get(name, float('nan')):.3f}" for label in labels]
        rows.append(f"| {group} | " + " | ".join(cells) + " |")
    return rows


def markdown(results: dict[str, dict]) -> str:
    lines = ["# Toy learning: tiny models on the procedural toy edits", ""]
    lines += [
        "Written by `python benchmarks/toy_learning.py` from `make demo` (DIM), `make demo MODEL=got` (GoT), `make demo MODEL=mind_edit` (MIND-Edit) and `make demo MODEL=imgedit_e1` (ImgEdit-E1).",
        "Score = (agreement inside the edit region + agreement outside) / 2 on the 128-sample held-out split;",
        "copy_source = returning the source unchanged.",
        "",
    ]
    for name, result in results.items():
        metrics = result["metrics"]
        timings = metrics.get("timings_s", {})
        labels = [label for label in metrics if isinstance(metrics[label], dict) and "overall" in metrics[label]]
        groups = [g for g in metrics[labels[0]] if g != "overall"] + ["overall"]
        lines += [f"## {name}", ""]
        lines += [
            f"{result['steps']} steps at batch {result['batch_size']}; training {timings.get('fit', float('nan')):.0f} s, "
            f"training + evaluation {timings.get('train_and_evaluate', float('nan')):.0f} s, set-up (toy shards) "
            f"{timings.get('setup_data', float('nan')):.0f} s. Bar in zoo/demo.py now: {result['bar']:.2f}; "
            f"the checks below are those of this run. Learned: {metrics.get('learned')}.",
            "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in result.get("machine", {}).items()),
            "",
        ]
        lines += _table(metrics, labels, groups, "score")
        if all("kept" in metrics[label]["overall"] for label in labels):
            lines += ["", "Objects kept outside the edit region (`kept`: agreement over the target's non-background pixels there):", ""]
            lines += _table(metrics, labels, groups, "kept")
        for label in labels:
            overall = metrics[label]["overall"]
            if "chain_parses" in overall:
                lines.append("")
                lines.append(
                    f"{label}: {overall['chain_parses']:.1%} of generated chains parse into boxes, "
                    f"{overall['chain_exact']:.1%} are exactly the target's boxes and colours."
                )
        lines += ["", "Checks:", ""] + [f"- {'ok' if ok else 'FAILED'}: {check}" for check, ok in metrics.get("checks", {}).items()]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    saved = ROOT / "benchmarks" / "toy_learning.json"
    last = json.loads(saved.read_text()) if saved.is_file() else {}
    # a file written before results carried their machine has one machine line for all of them
    earlier = {name: {"machine": last.get("machine", {}), **result} for name, result in last.get("models", {}).items()}
    results = collect(earlier, machine())
    if not results:
        print("no demo results under runs/: run `make demo` (and `make demo MODEL=got`) first", file=sys.stderr)
        return 2
    out = saved.parent
    saved.write_text(json.dumps({"models": results}, indent=2) + "\n")
    page = out / "toy_learning.md"
    notes = page.read_text().split(NOTES, 1)[1] if page.is_file() and NOTES in page.read_text() else "\n"
    page.write_text(markdown(results) + "\n" + NOTES + notes)
    print(f"wrote {out / 'toy_learning.md'} and {out / 'toy_learning.json'} for {', '.join(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
