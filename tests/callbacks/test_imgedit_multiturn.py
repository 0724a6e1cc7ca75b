"""ImgEdit-Bench multi-turn end to end: a tiny DIM edits every turn from the previous result, an HTTP judge
(the local OpenAI-protocol test server) rates each turn, the table gives hand-computed yes-rates, and
reruns resume, retry failed calls and otherwise generate and judge nothing again.

The toy data has no multi-turn ground truth, so the judge here is the real HTTP judge against a
scripted server whose verdict depends only on the turn's instruction.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from callbacks.imgedit_bench import ImgEditEvaluator
from callbacks.judges import PREFLIGHT_PROMPT, ChatJudge, JudgeConfig
from datamodules.benchmarks import BenchmarkDataModule
from datamodules.samples import EditBatch, EditOutputs
from tests.helpers.openai_server import OpenAIServer, Reply, Request, completion, error
from tests.modules.conftest import tiny_dim_kwargs
from zoo.modules.base import EditingModule
from zoo.modules.dim import DIMModule

RESOLUTION = 16
CASES = {
    "1": {"id": "a.jpg", "turn1": "add a red circle", "turn2": "remove the circle"},
    "2": {"id": "b.jpg", "turn1": "make the square blue", "turn2": "add a star", "turn3": "turn the star green"},
    "3": {"id": "c.jpg", "turn1": "replace the square", "turn2": "move the triangle"},
}
VERDICTS = {  # instruction -> (Instruction Following, Content Consistency), or None: an unreadable reply
    "add a red circle": ("yes", "yes"),
    "remove the circle": ("no", "yes"),
    "make the square blue": ("yes", "no"),
    "add a star": None,
    "turn the star green": ("yes", "yes"),
    "replace the square": ("no", "no"),
    "move the triangle": ("yes", "yes"),
}
TURNS = {case[f"turn{k}"]: (key, k) for key, case in CASES.items() for k in (1, 2, 3) if f"turn{k}" in case}
"""Instruction -> (case, turn): every instruction is unique, so it names its turn."""
FAILS_FIRST = "turn the star green"  # HTTP 400 in the first run: a failed call, asked again by the next run
# Hand-computed share of yes per turn: turn 1 rates cases 1-3, turn 2 cases 1 and 3 (case 2's reply is
# unreadable), turn 3 case 2 only (its call failed in the first run).
TABLE_FIRST_RUN = [["turn 1", 2 / 3, 1 / 3, 3, 0], ["turn 2", 1 / 2, 1.0, 2, 1], ["turn 3", None, None, 0, 1]]
TABLE_AFTER_RETRY = TABLE_FIRST_RUN[:2] + [["turn 3", 1.0, 1.0, 1, 0]]


def _is_preflight(request: Request) -> bool:
    return request.body["messages"][0]["content"][0]["text"] == PREFLIGHT_PROMPT


def _judged(server: OpenAIServer) -> list[Request]:
    """The judge requests of one run after its single pre-flight request, which comes first."""
    preflight, *judged = server.requests
    assert _is_preflight(preflight) and not any(map(_is_preflight, judged))
    return judged


def _instruction(request: Request) -> str:
    text = request.body["messages"][0]["content"][0]["text"]
    return re.search(r"Instruction of this turn: (.*)\.\n", text)[1]


def _judge_server(failing: set[str]) -> OpenAIServer:
    def respond(request: Request) -> Reply:
        if _is_preflight(request):
            return completion("OK")
        instruction = _instruction(request)
        if instruction in failing:
            return error(400, "content filter")
        verdict = VERDICTS[instruction]
        if verdict is None:
            return completion("I cannot tell which image came first.")
        return completion(f"**Instruction Following:** {verdict[0].capitalize()}.\nContent Consistency: {verdict[1]}")

    return OpenAIServer(respond=respond)


def _pixels(image: Image.Image | Path) -> np.ndarray:
    with Image.open(image) if isinstance(image, Path) else image as opened:
        return np.asarray(opened.convert("RGB"))


def _sent_images(request: Request) -> list[np.ndarray]:
    urls = [p["image_url"]["url"] for p in request.body["messages"][0]["content"] if p["type"] == "image_url"]
    return [_pixels(Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))) for url in urls]


def _record_edits(module: EditingModule) -> list[dict[str, Any]]:
    """Keep (key, instruction, source pixels in [0, 255], whether inside the module's test step) of
    every sample the module edits: every ``edit_batch`` call, whoever makes it."""
    seen: list[dict[str, Any]] = []
    edit_batch, test_step = module.edit_batch, module.test_step
    stepping = False

    def recording(batch: EditBatch, generator: torch.Generator | None = None, keep_given: bool = False) -> tuple[torch.Tensor, list[str]]:
        sources = ((batch.source.float().cpu() + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        seen.extend(
            {"key": k, "instruction": t, "source": s, "in_test_step": stepping, "history": h}
            for k, t, s, h in zip(batch.key, batch.instruction, sources, batch.history)
        )
        return edit_batch(batch, generator, keep_given)

    def recording_step(batch: EditBatch, batch_idx: int) -> EditOutputs:
        nonlocal stepping
        stepping = True
        try:
            return test_step(batch, batch_idx)
        finally:
            stepping = False

    module.edit_batch = recording  # type: ignore[method-assign]
    module.test_step = recording_step  # type: ignore[method-assign]
    return seen


@pytest.fixture
def benchmark(tmp_path: Path) -> tuple[Path, Path]:
    """A multi-turn definition in the readme's format and its source images (``images/multiturn/<id>``)."""
    images = tmp_path / "Benchmark" / "multiturn"
    images.mkdir(parents=True)
    for i, case in enumerate(CASES.values()):
        Image.new("RGB", (24, 20), (60 * i, 120, 200 - 60 * i)).save(images / case["id"])
    definition = tmp_path / "multiturn.json"
    definition.write_text(json.dumps(CASES))
    return definition, tmp_path / "Benchmark"


def _run(
    out: Path, benchmark: tuple[Path, Path], server: OpenAIServer, logs: Path, module: EditingModule | None = None
) -> list[dict[str, Any]]:
    """``Trainer.test`` of a tiny DIM (or ``module``) over the multi-turn suite; returns what the module edited."""
    L.seed_everything(0)
    module = module or DIMModule(**tiny_dim_kwargs(num_inference_steps=1))
    seen = _record_edits(module)
    definition, images = benchmark
    data = BenchmarkDataModule("imgedit_multiturn", images_dir=str(images), definition=str(definition), results_dir=str(out),
                               batch_size=2, resolution=RESOLUTION, mllm_resolution=RESOLUTION)
    judge = ChatJudge(JudgeConfig(base_url=server.base_url, model="judge", api_key_env=None, max_retries=0, timeout=10.0), max_workers=2)
    evaluator = ImgEditEvaluator(judge, suite="multiturn", output_dir=str(out), label="tiny-dim")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(logs, name="", version=0), callbacks=[evaluator],
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.test(module, datamodule=data)
    return seen


def _table(out: Path) -> list[list[Any]]:
    rows = list(csv.reader((out / "multiturn.csv").open()))
    assert rows[0] == ["", "Instruction Following", "Content Consistency", "samples", "failed"]
    return [[r[0], *(None if v == "nan" else pytest.approx(float(v)) for v in r[1:3]), int(r[3]), int(r[4])] for r in rows[1:]]


def test_multiturn_generates_every_turn_from_the_previous_result_and_judges_each(benchmark: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "results"
    # An interrupted earlier run left case 2 half done (turns 1-2, no turn 3): it must be redone from turn 1.
    (out / "images").mkdir(parents=True)
    for turn in (1, 2):
        Image.new("RGB", (RESOLUTION, RESOLUTION)).save(out / "images" / f"2_turn{turn}.png")

    with _judge_server({FAILS_FIRST}) as server:
        seen = _run(out, benchmark, server, tmp_path / "logs1")
        requests = _judged(server)

    # Every turn edited once, turn k's source being turn k-1's saved result (turn 1: the source).
    def before(key: str, k: int) -> np.ndarray:
        return _pixels(out / "images" / (f"{key}_SRCIMG.png" if k == 1 else f"{key}_turn{k - 1}.png"))

    assert sorted((s["key"], s["instruction"]) for s in seen) == sorted((key, text) for text, (key, _) in TURNS.items())
    assert all(s["in_test_step"] for s in seen), "every turn is edited by the module's test step, none by the evaluator"
    for sample in seen:
        assert np.array_equal(sample["source"], before(*TURNS[sample["instruction"]])), TURNS[sample["instruction"]]
    assert _pixels(out / "images" / "2_turn1.png").any(), "the stale half-done turn 1 was not redone"

    # The judge got each turn once, with the image before the turn and the image after it.
    assert sorted(_instruction(r) for r in requests) == sorted(TURNS)
    for request in requests:
        key, k = TURNS[_instruction(request)]
        sent_before, sent_after = _sent_images(request)
        assert np.array_equal(sent_before, before(key, k)) and np.array_equal(sent_after, _pixels(out / "images" / f"{key}_turn{k}.png"))

    assert _table(out) == TABLE_FIRST_RUN
    records = {r["id"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    unreadable = records["2"]["turns"][1]
    assert unreadable["verdicts"] is None and unreadable["raw"] == "I cannot tell which image came first." and "unparsable" in unreadable["error"]
    assert records["2"]["retry"] and not records["1"]["retry"] and not records["3"]["retry"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["turns"]["1"]["Instruction Following"] == pytest.approx(2 / 3) and summary["rated_by"].startswith('{"model": "judge"')
    metrics = list(csv.DictReader((tmp_path / "logs1" / "version_0" / "metrics.csv").open()))
    assert float(metrics[-1]["imgedit_multiturn/turn1/content_consistency"]) == pytest.approx(1 / 3)

    # Rerun: nothing is generated; only the failed call is asked again (the rest comes from the judge cache).
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    with _judge_server(set()) as server:
        assert _run(out, benchmark, server, tmp_path / "logs2") == []
        assert [_instruction(r) for r in _judged(server)] == [FAILS_FIRST]
    assert _table(out) == TABLE_AFTER_RETRY
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == finished

    # And again: nothing generated, nothing judged.
    with _judge_server(set()) as server:
        assert _run(out, benchmark, server, tmp_path / "logs3") == [] and _judged(server) == []
    assert _table(out) == TABLE_AFTER_RETRY and len((out / "records.jsonl").read_text().splitlines()) == 4


def test_human_ratings_replace_the_judge_and_late_ratings_are_imported(benchmark: tuple[Path, Path], tmp_path: Path) -> None:
    out, ratings = tmp_path / "results", tmp_path / "ratings.csv"
    definition, images = benchmark

    def run() -> None:
        data = BenchmarkDataModule("imgedit_multiturn", images_dir=str(images), definition=str(definition), results_dir=str(out),
                                   batch_size=3, resolution=RESOLUTION, mllm_resolution=RESOLUTION)
        evaluator = ImgEditEvaluator(suite="multiturn", human_ratings=str(ratings), output_dir=str(out))
        L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[evaluator], enable_progress_bar=False,
                  enable_checkpointing=False, enable_model_summary=False).test(DIMModule(**tiny_dim_kwargs(num_inference_steps=1)), datamodule=data)

    run()  # no ratings yet: every turn generated, none rated
    assert _table(out) == [["turn 1", None, None, 0, 3], ["turn 2", None, None, 0, 3], ["turn 3", None, None, 0, 1]]
    header = "id,turn,Instruction Following,Content Consistency\n"
    ratings.write_text(header + "1,1,yes,no\n1,2,no,no\n2,1,yes,yes\n3,1,no,yes\n3,2,1,1\n")
    run()  # case 2 still lacks turns 2 and 3
    assert _table(out) == [["turn 1", 2 / 3, 2 / 3, 3, 0], ["turn 2", 1 / 2, 1 / 2, 2, 1], ["turn 3", None, None, 0, 1]]
    ratings.write_text(ratings.read_text() + "2,2,yes,no\n2,3,no,no\n")
    run()
    assert _table(out) == [["turn 1", 2 / 3, 2 / 3, 3, 0], ["turn 2", 2 / 3, 1 / 3, 3, 0], ["turn 3", 0.0, 0.0, 1, 0]]
    assert len(list((out / "images").glob("*_turn*.png"))) == 7 and not (out / "judge_cache").exists()


def test_imgedit_e1_runs_the_multiturn_suite_reading_each_turns_dialogue(benchmark: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.modules.test_imgedit_e1 import make

    out = tmp_path / "results"
    with _judge_server(set()) as server:
        seen = _run(out, benchmark, server, tmp_path / "logs", module=make(stage=2, output_size=RESOLUTION))
    assert sorted((s["key"], s["instruction"]) for s in seen) == sorted((key, text) for text, (key, _) in TURNS.items())
    for sample in seen:
        key, k = TURNS[sample["instruction"]]
        assert sample["history"] == [CASES[key][f"turn{j}"] for j in range(1, k)], "earlier instructions, oldest first"
    assert [row[0] for row in _table(out)] == ["turn 1", "turn 2", "turn 3"]
    assert all((out / "images" / f"{key}_turn{k}.png").is_file() for key, k in TURNS.values())
