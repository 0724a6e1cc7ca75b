"""``zoo data annotate`` against a scripted OpenAI server on a real socket: replies, failures, the cache, resume, arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.annotate import main as annotate_main
from datamodules.convert import main as convert_main
from datamodules.convert import read_annotations
from datamodules.shard_format import decode_sample, read_tar
from datamodules.toy import edit_sample
from datamodules.toy import main as toy_main
from tests.datamodules.test_humanedit_format import row, write_parquet
from tests.helpers.openai_server import OpenAIServer, Reply, Request, completion, error
from zoo.blocks.optimized_instruction import annotation_prompt, parse

GOOD = '<optimized_prompt: "a {n}" negative_prompt: "no {n}, blur">'


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    assert toy_main(["--out", str(root), "--train", "4", "--val", "0", "--test", "0", "--resolution", "16", "--seed", "2"]) == 0
    return root / "train"


INSTRUCTIONS = [edit_sample(2, "train", i, 16)[0].instruction for i in range(4)]


def prompt_of(request: Request) -> str:
    [text] = [p["text"] for p in request.body["messages"][-1]["content"] if p["type"] == "text"]
    return text


def index_of(request: Request) -> int:
    return [annotation_prompt(i) for i in INSTRUCTIONS].index(prompt_of(request))


def args(split: Path, out: Path, server: OpenAIServer, *extra: str) -> list[str]:
    return ["--shards", str(split), "--out", str(out), "--base-url", server.base_url, "--model", "m", "--api-key-env", "", "--max-retries", "0", *extra]


def answer_all(request: Request) -> Reply:
    return completion(GOOD.format(n=index_of(request)))


def test_replies_are_parsed_failures_counted_and_a_rerun_asks_only_for_what_is_missing(
    split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "ann.jsonl"
    scripted = {0: completion(GOOD.format(n=0)), 1: completion("make it nicer"), 2: error(400, "content policy"), 3: completion(GOOD.format(n=3))}
    with OpenAIServer(respond=lambda request: scripted[index_of(request)]) as server:
        assert annotate_main(args(split, out, server, "--workers", "2")) == 0
    assert sorted(index_of(r) for r in server.requests) == [0, 1, 2, 3]
    parts = server.requests[0].body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"] and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == f"annotated 2, already in {out} 0, failed 2 (chat error 1, unparsable reply 1)"
    assert "unparsable reply" in caplog.text and "content policy" in caplog.text
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["key"] for line in lines} == {"train_000000", "train_000003"}
    assert {line["key"]: line["optimized_instruction"] for line in lines}["train_000000"] == 'optimized_prompt: "a 0" negative_prompt: "no 0, blur"'

    with OpenAIServer(respond=answer_all) as server:
        assert annotate_main(args(split, out, server)) == 0
    assert sorted(index_of(r) for r in server.requests) == [1, 2], "cached keys are not asked again"
    assert capsys.readouterr().out.splitlines()[-1] == f"annotated 2, already in {out} 2, failed 0"
    with OpenAIServer(respond=answer_all) as server:
        assert annotate_main(args(split, out, server)) == 0
    assert server.requests == [] and len(read_annotations(str(out), strict=True)[0]) == 4


def test_resumes_after_an_interruption_that_cut_a_line_short(split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ann.jsonl"
    done = json.dumps({"key": "train_000002", "optimized_instruction": parse(GOOD.format(n=2)).render()})
    out.write_text(done + '\n{"key": "train_000001", "optimized_instr')
    with OpenAIServer(respond=answer_all) as server:
        assert annotate_main(args(split, out, server)) == 0
    assert sorted(index_of(r) for r in server.requests) == [0, 1, 3]
    annotations, broken = read_annotations(str(out), strict=False)
    assert broken == 1 and sorted(annotations) == [f"train_{i:06d}" for i in range(4)]
    assert annotations["train_000001"] == 'optimized_prompt: "a 1" negative_prompt: "no 1, blur"'
    assert "already in" in capsys.readouterr().out


def test_exit_1_only_when_everything_failed(split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with OpenAIServer(respond=lambda request: completion("negative_prompt: first")) as server:
        assert annotate_main(args(split, tmp_path / "ann.jsonl", server)) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("failed 4 (unparsable reply 4)")
    assert (tmp_path / "ann.jsonl").read_text() == ""


def test_bad_arguments_are_one_line_before_any_request_and_the_key_is_never_shown(
    split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-test-very-secret-0123456789"
    with OpenAIServer(respond=answer_all) as server:
        cases = [
            (["--shards", str(tmp_path / "missing")], "missing"),
            (["--shards", str(split), "--api-key-env", "ZOO_TEST_UNSET_KEY"], "ZOO_TEST_UNSET_KEY"),
            (["--shards", str(split), "--base-url", "localhost:1"], "base_url must start with http"),
            (["--shards", str(split), "--workers", "0"], "--workers must be at least 1"),
        ]
        for extra, expected in cases:
            base = ["--out", str(tmp_path / "a.jsonl"), "--base-url", server.base_url, "--model", "m", "--api-key-env", ""]
            assert annotate_main([*base, *extra]) == 2
            [line] = [line for line in capsys.readouterr().err.splitlines() if line]
            assert line.startswith("zoo: error:") and expected in line
        assert server.requests == []
    monkeypatch.setenv("ZOO_TEST_KEY", key)
    with OpenAIServer(respond=lambda request: error(401, f"invalid key {key}")) as server:
        assert annotate_main([*args(split, tmp_path / "b.jsonl", server)[:-4], "--api-key-env", "ZOO_TEST_KEY", "--max-retries", "0"]) == 1
    assert server.requests[0].headers["authorization"] == f"Bearer {key}"
    captured = capsys.readouterr()
    assert "failed 4 (chat error 4)" in captured.out
    assert key not in captured.out + captured.err + caplog.text and "invalid key" in caplog.text


def test_humanedit_annotations_join_into_the_converted_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_parquet(tmp_path / "h.parquet", [row(image_id, seed=n) for n, image_id in enumerate(["p.1", "q", "r"])])
    out = tmp_path / "ann.jsonl"
    instructions = [f"remove the thing {n}" for n in range(3)]
    reply = lambda request: completion(GOOD.format(n=[annotation_prompt(i) for i in instructions].index(prompt_of(request))))  # noqa: E731
    with OpenAIServer(respond=reply) as server:
        base = ["--parquet", str(tmp_path / "h.parquet"), "--split", "all", "--test-size", "1", "--out", str(out), "--base-url", server.base_url]
        assert annotate_main([*base, "--model", "m", "--api-key-env", ""]) == 0
    assert sorted(read_annotations(str(out), strict=True)[0]) == ["p_1", "q", "r"], "keyed as the converter writes them"
    shards = tmp_path / "shards"
    assert convert_main(["--format", "humanedit", "--parquet", str(tmp_path), "--test-size", "1", "--out", str(shards), "--annotations", str(out)]) == 0
    assert "0 edit sample(s) without an annotation" in capsys.readouterr().out
    joined = {}
    for split in ("train", "test"):
        for raw in read_tar(str(shards / split / "shard-000000.tar")):
            sample = decode_sample(raw)
            joined[sample.key] = sample.optimized_instruction
    assert joined["p_1"] == 'optimized_prompt: "a 0" negative_prompt: "no 0, blur"' and len(joined) == 3
