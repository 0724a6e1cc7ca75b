"""Every evaluation overlay parses over a paper recipe (and the toy one over the tiny overlay)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zoo.trainer_cli import ZooCLI

ROOT = Path(__file__).resolve().parents[2]
EVAL_RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / "eval").glob("*.yaml"))
JUDGED = ("callbacks.imgedit_bench.ImgEditEvaluator", "callbacks.gedit_bench.GEditEvaluator")
"""Evaluators of the judged benchmarks: their overlays also bring the benchmark's data and judge."""


class _ParseOnly(ZooCLI):
    def instantiate_classes(self) -> None:
        return None


@pytest.mark.parametrize("recipe", EVAL_RECIPES)
def test_eval_overlay_parses(recipe: str) -> None:
    files = ["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml", recipe]
    args = [a for f in files for a in ("--config", str(ROOT / f))]
    config = _ParseOnly(args=args, run=False).config
    [evaluator] = config.trainer.callbacks
    assert evaluator.class_path.startswith("callbacks.")
    if evaluator.class_path not in JUDGED:
        return
    if "toy" in recipe:
        assert evaluator.init_args.judge.class_path == "callbacks.judges.ToyJudge"
    else:
        assert config.data.class_path == "datamodules.benchmarks.BenchmarkDataModule"
        assert evaluator.init_args.judge.init_args.client.model == "gpt-4.1"
