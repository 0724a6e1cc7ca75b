"""Results folder (records, tables, resume) and an end-to-end toy evaluation of a tiny DIM module."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.imgedit_bench import ImgEditEvaluator
from callbacks.judges import ChatJudge, JudgeConfig, JudgeUnavailableError, ToyJudge
from callbacks.results import ResultsFolder
from datamodules.benchmarks import MissingBenchmarkFileError
from datamodules.shards import ShardDataModule
from datamodules.toy import main as toy_main
from tests.helpers.openai_server import OpenAIServer, error
from tests.modules.conftest import tiny_dim_kwargs
from zoo.blocks.config import ConfigError
from zoo.modules.dim import DIMModule

PROMPTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "imgedit-bench" / "prompts.json"


def test_tables_and_records(tmp_path: Path) -> None:
    folder = ResultsFolder(tmp_path)
    folder.write_table("t", (["", "Add", "Overall"], [["m", 3.14159, float("nan")], ["samples", 2, 2]]), title="T")
    assert (tmp_path / "t.md").read_text().splitlines()[2:] == ["|  | Add | Overall |", "|---|---|---|", "| m | 3.142 | nan |", "| samples | 2 | 2 |"]
    assert list(csv.reader((tmp_path / "t.csv").open()))[1] == ["m", "3.14159", "nan"]
    folder.append_records([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    folder.append_records([{"id": "a", "v": 3}])
    with (tmp_path / "records.jsonl").open("a") as handle:
        handle.write('{"id": "c", "v"')  # a run killed mid-write
    assert folder.records() == {"a": {"id": "a", "v": 3}, "b": {"id": "b", "v": 2}}
    # Appended after the torn line, still read; a failed judge call is marked for the next run to ask again.
    folder.append_records([{"id": "b", "v": None, "retry": True}])
    assert folder.settled() == {"a"}


@pytest.fixture(scope="module")
def toy_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    assert toy_main(["--out", str(root), "--train", "2", "--val", "2", "--test", "6", "--resolution", "16", "--seed", "0"]) == 0
    return root / "test"


def _trainer(tmp_path: Path, evaluator: ImgEditEvaluator) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path / "tb", name=""),
                     callbacks=[evaluator], enable_progress_bar=False, enable_checkpointing=False)


def test_toy_imgedit_evaluation_end_to_end_and_resume(toy_test: Path, tmp_path: Path) -> None:
    if not PROMPTS.is_file():
        pytest.skip(f"ImgEdit rubrics not found at {PROMPTS} (workspace-only fixture, see shared/data/README.md)")
    L.seed_everything(0)
    module = DIMModule(**tiny_dim_kwargs(num_inference_steps=2))
    data = ShardDataModule(test_shards=str(toy_test), val_batch_size=4, resolution=16, mllm_resolution=16)
    out = tmp_path / "imgedit"
    evaluator = ImgEditEvaluator(ToyJudge(), rubrics=str(PROMPTS), output_dir=str(out), label="tiny-dim")
    _trainer(tmp_path, evaluator).test(module, datamodule=data)

    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["error"] is None for r in records)
    generated = {json.loads(line)["id"]: json.loads(line) for line in (out / "generated.rank0.jsonl").read_text().splitlines()}
    for record in records:  # the toy judge's scores are the exact ground truth on the 1-5 scale
        truth = generated[record["id"]]["truth"]
        assert record["scores"] == [1 + round(4 * truth[k]) for k in ("edit", "preserve", "score")]
        assert (out / "images" / f"{record['id']}.png").is_file() and (out / "images" / f"{record['id']}_SRCIMG.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    types = sorted({r["edit_type"] for r in records})
    expected = sum(sum(r["mean"] for r in records if r["edit_type"] == t) / sum(r["edit_type"] == t for r in records) for t in types) / len(types)
    assert summary["headline"]["overall"]["score"] == pytest.approx(expected)
    partial = f"partial: {len(types)} of 9"  # toy data covers only some of ImgEdit's 9 types
    assert summary["overall_types"] == partial
    table = (out / "basic.md").read_text()
    assert "| tiny-dim |" in table and "Overall" in table and f"| {partial} |" in table and (out / "basic.csv").is_file()
    [events] = list((tmp_path / "tb").rglob("events.out.tfevents*"))
    logged = EventAccumulator(str(events)).Reload()
    assert [e.value for e in logged.Scalars("imgedit_basic/overall/types")] == [len(types)]

    # Rerun into the same folder: nothing is scored again, the tables are rewritten from all records.
    rerun = ImgEditEvaluator(ToyJudge(), rubrics=str(PROMPTS), output_dir=str(out), label="tiny-dim")
    _trainer(tmp_path, rerun).test(module, datamodule=data)
    assert len((out / "records.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "summary.json").read_text())["headline"] == summary["headline"]


def test_unscored_edits_of_an_interrupted_run_are_scored_next_time(toy_test: Path, tmp_path: Path) -> None:
    if not PROMPTS.is_file():
        pytest.skip(f"ImgEdit rubrics not found at {PROMPTS}")
    module = DIMModule(**tiny_dim_kwargs(num_inference_steps=1))
    data = ShardDataModule(test_shards=str(toy_test), val_batch_size=4, resolution=16, mllm_resolution=16)
    out = tmp_path / "imgedit"
    evaluator = ImgEditEvaluator(ToyJudge(), rubrics=str(PROMPTS), output_dir=str(out))
    _trainer(tmp_path, evaluator).test(module, datamodule=data)
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:2]) + "\n")  # killed after scoring 2 of 6
    evaluator.folder = ResultsFolder(out)
    trainer = _trainer(tmp_path, evaluator)
    evaluator._start(trainer, "test")
    assert len(evaluator._orphans) == 4
    evaluator._finish(trainer, "test")
    assert len(ResultsFolder(out).records()) == 6


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every outgoing connection fails, as on a machine without network."""

    def refuse(self: socket.socket, address: object) -> None:
        raise OSError(f"network blocked in this test (connect to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_toy_evaluation_runs_offline_without_any_benchmark_file(
    toy_test: Path, tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The toy judge answers from the ground truth: no rubric file is read, none is downloaded.
    monkeypatch.setenv("ZOO_BENCHMARK_CACHE", str(tmp_path / "empty_cache"))
    module = DIMModule(**tiny_dim_kwargs(num_inference_steps=1))
    data = ShardDataModule(test_shards=str(toy_test), val_batch_size=4, resolution=16, mllm_resolution=16)
    out = tmp_path / "imgedit"
    _trainer(tmp_path, ImgEditEvaluator(ToyJudge(), output_dir=str(out))).test(module, datamodule=data)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["error"] is None and len(r["scores"]) == 3 for r in records)
    assert not (tmp_path / "empty_cache").exists()


def test_a_missing_rubric_file_fails_before_any_edit_is_generated(
    toy_test: Path, tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOO_BENCHMARK_CACHE", str(tmp_path / "empty_cache"))
    judge = ChatJudge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="judge", api_key_env=None))
    module = DIMModule(**tiny_dim_kwargs(num_inference_steps=1))
    generated: list[int] = []
    module.test_step = lambda batch, batch_idx: generated.append(batch_idx)  # type: ignore[method-assign]
    data = ShardDataModule(test_shards=str(toy_test), val_batch_size=4, resolution=16, mllm_resolution=16)
    with pytest.raises(MissingBenchmarkFileError, match=r"imgedit/prompts.json is missing .* put that file at .*empty_cache"):
        _trainer(tmp_path, ImgEditEvaluator(judge, output_dir=str(tmp_path / "imgedit"))).test(module, datamodule=data)
    assert generated == [], "the rubric check must come before the generation pass"


def test_a_judge_that_refuses_the_key_fails_before_any_edit_is_generated(toy_test: Path, tmp_path: Path) -> None:
    module = DIMModule(**tiny_dim_kwargs(num_inference_steps=1))
    generated: list[int] = []
    module.test_step = lambda batch, batch_idx: generated.append(batch_idx)  # type: ignore[method-assign]
    data = ShardDataModule(test_shards=str(toy_test), val_batch_size=4, resolution=16, mllm_resolution=16)
    with OpenAIServer(error(401, "Incorrect API key provided")) as server:
        judge = ChatJudge(JudgeConfig(base_url=server.base_url, model="gpt-4.1", api_key_env=None, max_retries=0))
        evaluator = ImgEditEvaluator(judge, suite="uge", output_dir=str(tmp_path / "uge"))
        with pytest.raises(JudgeUnavailableError, match=r"cannot answer .*HTTP 401: Incorrect API key provided.*nothing was generated"):
            _trainer(tmp_path, evaluator).test(module, datamodule=data)
    assert generated == [] and len(server.requests) == 1, "one pre-flight request, then nothing"
    assert isinstance(JudgeUnavailableError("x"), ConfigError), "the CLI prints it as one zoo: error: line"


def test_an_output_folder_of_something_else_is_refused_before_any_edit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from callbacks.similarity import SimilarityEvaluator
    from tests.helpers.editors import OracleEditor, edit_batches, run_test

    def evaluate(out: Path) -> None:
        evaluator = SimilarityEvaluator(clip=None, dino=None, lpips=None, output_dir=str(out))
        run_test(evaluator, OracleEditor("target"), edit_batches(num=1), tmp_path / "logs")

    occupied = tmp_path / "my_dataset"
    occupied.mkdir()
    (occupied / "train.parquet").write_bytes(b"data")
    with pytest.raises(ConfigError, match=r"holds files of no evaluator \(train\.parquet\); choose an empty folder"):
        evaluate(occupied)
    assert sorted(p.name for p in occupied.iterdir()) == ["train.parquet"], "nothing may be generated into it"

    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=f"cannot write the output folder {a_file / 'x'} \\({a_file} is not a folder\\)"):
        evaluate(a_file / "x")

    out = tmp_path / "similarity"
    with caplog.at_level("INFO"):
        evaluate(out)
    # The evaluation ends by printing its table and its folder.
    assert f"{out / 'similarity'}.md:\n# Similarity to the reference" in caplog.text
    assert f"similarity: 1 samples scored now, 1 in total -> {out}" in caplog.text
    evaluate(out)  # an earlier run of the same evaluator resumes
    assert json.loads((out / "evaluator.json").read_text()) == {"evaluator": "similarity"}
    with pytest.raises(ConfigError, match=f"output folder {out} holds the results of similarity; give each evaluator its own"):
        ResultsFolder(out).claim("fid")
