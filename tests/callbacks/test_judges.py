"""Judges: the HTTP judge against a local OpenAI-protocol server (retries, failures, disk cache), the toy judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from callbacks.imgedit_bench import MULTITURN_CRITERIA, basic_record, multiturn_record
from callbacks.judges import HTTPJudge, JudgeRequest, ToyJudge
from tests.helpers.openai_server import OpenAIServer, Reply, completion, error
from zoo.blocks.chat import ChatError

FIELDS = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")
ANSWER = "Brief reasoning: ok\nPrompt Compliance: 4\nVisual Naturalness: 4\nPhysical & Detail Integrity: 3"


def _request(seed: int) -> JudgeRequest:
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return JudgeRequest("imgedit_basic", ["rate this edit", image, image.flip(-1)], FIELDS)


def _judge(server: OpenAIServer, cache: Path | None, **kwargs) -> HTTPJudge:
    options = {"api_key_env": None, "max_retries": 2, "backoff": 0.01, "timeout": 5.0} | kwargs
    return HTTPJudge(server.base_url, "gpt-4.1", cache_dir=str(cache) if cache else None, **options)


def test_success_sends_both_images_and_cache_prevents_a_second_call(tmp_path: Path) -> None:
    with OpenAIServer(completion(ANSWER)) as server:
        judge = _judge(server, tmp_path)
        assert judge.ask([_request(0)]) == [ANSWER]
        [sent] = server.requests
        parts = sent.body["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
        assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    with OpenAIServer() as server:  # answers 599 to anything: a cache miss would fail
        again = _judge(server, tmp_path)
        assert again.ask([_request(0)]) == [ANSWER] and server.requests == [] and again.calls == 0
        [failed] = again.ask([_request(1)])  # another image: a real miss
        assert isinstance(failed, ChatError)
    assert len(list(tmp_path.rglob("*.json"))) == 1, "failures must not be cached"


def test_429_then_success(tmp_path: Path) -> None:
    with OpenAIServer(error(429, "slow down", {"Retry-After": "0"}), completion(ANSWER)) as server:
        assert _judge(server, tmp_path).ask([_request(0)]) == [ANSWER]
        assert len(server.requests) == 2


@pytest.mark.parametrize(
    "replies, needle",
    [
        ([Reply(delay=1.0, body={})] * 3, "timeout"),
        ([Reply(raw=b"{not json")] * 3, "attempts"),
        ([completion(None)] * 3, "attempts"),
    ],
)
def test_timeouts_and_malformed_replies_become_failure_records(tmp_path: Path, replies: list[Reply], needle: str) -> None:
    with OpenAIServer(*replies) as server:
        [reply] = _judge(server, tmp_path, timeout=0.3).ask([_request(0)])
    assert isinstance(reply, ChatError) and needle in str(reply)
    record = basic_record("k", "add", reply, FIELDS)
    assert record["error"].startswith("judge call failed") and record["mean"] is None


def test_garbage_reply_is_recorded_with_its_text(tmp_path: Path) -> None:
    with OpenAIServer(completion("lorem ipsum dolor")) as server:
        [reply] = _judge(server, tmp_path).ask([_request(0)])
    record = basic_record("k", "add", reply, FIELDS)
    assert record["raw"] == "lorem ipsum dolor" and "no score for" in record["error"]


def test_concurrent_requests_keep_their_order(tmp_path: Path) -> None:
    def respond(request) -> Reply:
        text = request.body["messages"][0]["content"][0]["text"]
        return completion(f"Prompt Compliance: {text[-1]}\nVisual Naturalness: 1\nPhysical & Detail Integrity: 1")

    requests = [JudgeRequest("imgedit_basic", [f"case {i}", torch.zeros(3, 4, 4)], FIELDS) for i in range(1, 6)]
    with OpenAIServer(respond=respond) as server:
        replies = _judge(server, tmp_path, max_workers=4).ask(requests)
    assert [basic_record(str(i), "add", r, FIELDS)["scores"][0] for i, r in enumerate(replies)] == [1, 2, 3, 4, 5]


def test_toy_judge_answers_in_each_benchmark_format() -> None:
    truth = {"edit": 0.5, "preserve": 1.0, "score": 0.75}
    basic, uge, sc, pq = ToyJudge().ask([
        JudgeRequest("imgedit_basic", [], FIELDS, truth),
        JudgeRequest("imgedit_uge", [], (), truth),
        JudgeRequest("gedit_sc", [], (), truth),
        JudgeRequest("gedit_pq", [], (), truth),
    ])
    assert basic_record("k", "add", basic, FIELDS)["scores"] == [3, 5, 4]
    assert uge.endswith("Score: 4")
    assert json.loads(sc)["score"] == [5, 10] and json.loads(pq)["score"] == [8, 10]
    turns = ToyJudge().ask([JudgeRequest("imgedit_multiturn", [], MULTITURN_CRITERIA, t) for t in (truth, truth | {"edit": 0.4})])
    verdicts = [multiturn_record("k", 1, reply)["verdicts"] for reply in turns]
    assert verdicts == [{"Instruction Following": True, "Content Consistency": True}, {"Instruction Following": False, "Content Consistency": True}]
    with pytest.raises(ValueError, match="needs ground truth"):
        ToyJudge().ask([JudgeRequest("imgedit_uge", [])])
