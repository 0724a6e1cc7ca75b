"""The local judge end to end: a tiny random Qwen2.5-VL saved to a folder and loaded by path judges two real
ImgEdit-Bench basic cases (images made here) through ImgEditEvaluator.

A random model's replies are unreadable, so they must be recorded as failures with their raw text
(never dropped, never a number) and counted in the table; replies are cached on disk and reused by a
rerun without generating again; generation is bounded by ``max_new_tokens`` and deterministic.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from PIL import Image

from callbacks.imgedit_bench import ImgEditEvaluator
from callbacks.judges import ChatJudge, JudgeConfig
from datamodules.benchmarks import BenchmarkDataModule
from datamodules.formats.imgedit import read_cases
from tests.modules.conftest import tiny_dim_kwargs
from zoo.blocks.tiny import tiny_qwen2_5_vl
from zoo.modules.dim import DIMModule

IMGEDIT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "imgedit-bench"
MAX_NEW_TOKENS = 8
CASES = 2


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL (model + processor) written with ``save_pretrained``."""
    folder = tmp_path_factory.mktemp("tiny_judge")
    model, processor = tiny_qwen2_5_vl(seed=0, hidden_size=32, num_layers=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def benchmark(tmp_path: Path) -> Path:
    """The images of the first basic cases (``singleturn/<id>``); the definitions are the real files."""
    if not (IMGEDIT / "basic_edit.json").is_file():
        pytest.skip(f"ImgEdit reference files not found at {IMGEDIT} (workspace-only fixture, see shared/data/README.md)")
    for i, case in enumerate(read_cases(IMGEDIT / "basic_edit.json", "basic")[:CASES]):
        path = tmp_path / "Benchmark" / "singleturn" / case.image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((24, 20), 30 + 20 * i).convert("RGB").save(path)
    return tmp_path / "Benchmark"


def _spy_on_generate(judge: ChatJudge) -> list[int]:
    """New-token counts of every ``generate`` call of the judge's real transformers model."""
    counts: list[int] = []
    model = judge.client.vlm.model  # type: ignore[attr-defined]
    generate = model.generate

    def counting(**kwargs: Any) -> torch.Tensor:
        output = generate(**kwargs)
        counts.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    model.generate = counting
    return counts


def _evaluate(images: Path, out: Path, judge_folder: Path) -> list[int]:
    """``Trainer.test`` of a tiny DIM judged by a freshly loaded local judge; returns its generate calls."""
    judge = ChatJudge(JudgeConfig(kind="local", pretrained=str(judge_folder), max_new_tokens=MAX_NEW_TOKENS, torch_dtype="float32"))
    calls = _spy_on_generate(judge)
    data = BenchmarkDataModule("imgedit_basic", images_dir=str(images), definition=str(IMGEDIT / "basic_edit.json"),
                               results_dir=str(out), limit=CASES, batch_size=CASES, resolution=16, mllm_resolution=16)
    evaluator = ImgEditEvaluator(judge, rubrics=str(IMGEDIT / "prompts.json"), output_dir=str(out), label="tiny-dim")
    L.seed_everything(0)
    L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[evaluator], enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False).test(DIMModule(**tiny_dim_kwargs(num_inference_steps=1)), datamodule=data)
    return calls


def _records(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}


def test_local_judge_failures_are_recorded_cached_and_reproducible(benchmark: Path, judge_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    calls = _evaluate(benchmark, out, judge_folder)
    assert len(calls) == CASES and all(0 < n <= MAX_NEW_TOKENS for n in calls)

    records = _records(out)
    assert len(records) == CASES
    for record in records.values():
        assert record["error"].startswith("unparsable reply") and isinstance(record["raw"], str) and record["raw"]
        assert record["scores"] is None and record["mean"] is None and record["official"] is None and not record.get("retry")
    table = {row[0]: row[1:] for row in csv.reader((out / "basic.csv").open())}
    parser = "our parser, as judged"
    assert table[""] == ["Adjust", "Overall", "Overall types", "parser"] and table["samples"] == ["0", "0", "", parser]
    assert table["failed"] == [str(CASES), str(CASES), "", parser] and table["tiny-dim"] == ["nan", "nan", "partial: 0 of 9", parser]
    cache = {p: p.stat().st_mtime_ns for p in (out / "judge_cache").rglob("*.json")}
    assert len(cache) == CASES and {json.loads(p.read_text())["reply"] for p in cache} == {r["raw"] for r in records.values()}

    # Killed after judging, before the records were written: the rerun reads the replies from the cache.
    (out / "records.jsonl").unlink()
    assert _evaluate(benchmark, out, judge_folder) == []
    assert _records(out) == records
    assert {p: p.stat().st_mtime_ns for p in (out / "judge_cache").rglob("*.json")} == cache

    # Without the cache a fresh judge generates again, and greedy decoding gives the same replies.
    (out / "records.jsonl").unlink()
    for path in cache:
        path.unlink()
    assert len(_evaluate(benchmark, out, judge_folder)) == CASES
    assert {i: r["raw"] for i, r in _records(out).items()} == {i: r["raw"] for i, r in records.items()}
