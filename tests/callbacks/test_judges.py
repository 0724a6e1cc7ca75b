"""Judges: the chat judge against a local OpenAI-protocol server (retries, failures, disk cache, the
key kept out of replies and cache), its config in the recipes, the toy judge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from callbacks.imgedit_bench import MULTITURN_CRITERIA, basic_record, multiturn_record
from callbacks.judges import ChatJudge, Judge, JudgeConfig, JudgeRequest, ToyJudge
from tests.helpers.openai_server import OpenAIServer, Reply, completion, error
from zoo.blocks.chat import ChatError, LocalVLMChatClient, OpenAIChatClient
from zoo.blocks.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]

FIELDS = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")
ANSWER = "Brief reasoning: ok\nPrompt Compliance: 4\nVisual Naturalness: 4\nPhysical & Detail Integrity: 3"


def _request(seed: int) -> JudgeRequest:
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return JudgeRequest("imgedit_basic", ["rate this edit", image, image.flip(-1)], FIELDS)


def _judge(server: OpenAIServer, cache: Path | None, max_workers: int = 8, **kwargs) -> ChatJudge:
    options = {"api_key_env": None, "max_retries": 2, "timeout": 5.0} | kwargs
    client = JudgeConfig(base_url=server.base_url, model="gpt-4.1", **options)
    return ChatJudge(client, cache_dir=str(cache) if cache else None, max_workers=max_workers)


def test_success_sends_both_images_and_cache_prevents_a_second_call(tmp_path: Path) -> None:
    with OpenAIServer(completion(ANSWER)) as server:
        judge = _judge(server, tmp_path)
        assert judge.ask([_request(0)]) == [ANSWER]
        [sent] = server.requests
        parts = sent.body["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
        assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    with OpenAIServer() as server:  # answers 599 to anything: a cache miss would fail
        again = _judge(server, tmp_path, max_retries=0)
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


def test_concurrent_requests_keep_their_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def respond(request) -> Reply:
        text = request.body["messages"][0]["content"][0]["text"]
        return completion(f"Prompt Compliance: {text[-1]}\nVisual Naturalness: 1\nPhysical & Detail Integrity: 1")

    requests = [JudgeRequest("imgedit_basic", [f"case {i}", torch.zeros(3, 4, 4)], FIELDS) for i in range(1, 6)]
    with OpenAIServer(respond=respond) as server:
        replies = _judge(server, tmp_path, max_workers=4).ask(requests)
    assert [basic_record(str(i), "add", r, FIELDS)["scores"][0] for i, r in enumerate(replies)] == [1, 2, 3, 4, 5]
    # Judging shows its progress and ends in one summary line of the calls made.
    assert re.search(r"^judging \(gpt-4\.1; 0 cached\): 5 calls in \d+\.\d s \(\d+\.\d/s\)$", capsys.readouterr().out, re.M)


def test_judge_defaults_follow_the_official_scorers_and_keep_the_cache_identity(tmp_path: Path) -> None:
    with OpenAIServer(completion(ANSWER)) as server:
        judge = ChatJudge(JudgeConfig(base_url=server.base_url, model="gpt-4.1", api_key_env=None))
        judge.ask([_request(0)])
    assert "temperature" not in server.requests[0].body  # the server default, as both official scorers
    config = judge.config
    assert (config.timeout, config.max_retries, config.image_format, config.torch_dtype) == (120.0, 8, "png", "bfloat16")
    # The identity the HTTP judge had before the shared config: existing reply caches stay valid.
    assert judge.name == json.dumps({"model": "gpt-4.1", "temperature": None, "max_tokens": None, "image_format": "png"})
    seeded = ChatJudge(JudgeConfig(base_url="http://localhost/v1", model="gpt-4.1", seed=1))
    assert json.loads(seeded.name)["seed"] == 1 and seeded.cache_key(_request(0)) != judge.cache_key(_request(0))
    with pytest.raises(ConfigError, match="max_workers must be in \\[1, inf\\], got 0"):
        ChatJudge(config, max_workers=0)


def test_a_key_echoed_in_a_reply_is_neither_returned_nor_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-test-4f9a2c81e7d3"
    monkeypatch.setenv("ZOO_TEST_KEY", key)
    with OpenAIServer(completion(f"{ANSWER}\nkey: {key}")) as server:
        [reply] = _judge(server, tmp_path, api_key_env="ZOO_TEST_KEY").ask([_request(0)])
    assert key not in reply and reply.endswith("key: [redacted]")
    [entry] = tmp_path.rglob("*.json")
    assert key not in entry.read_text()


def test_local_judge_runs_one_generation_at_a_time_and_caches(tmp_path: Path) -> None:
    config = JudgeConfig(kind="local", tiny={"seed": 0}, max_new_tokens=4, torch_dtype="float32")
    judge = ChatJudge(config, cache_dir=str(tmp_path), max_workers=4)
    assert isinstance(judge.client, LocalVLMChatClient) and judge.max_workers == 1
    assert judge.name == json.dumps({"local": 'tiny:{"seed": 0}', "max_new_tokens": 4})
    first = judge.ask([_request(0), _request(1)])
    assert all(isinstance(reply, str) for reply in first) and judge.calls == 2
    assert judge.ask([_request(0), _request(1)]) == first and judge.calls == 2


def _judges_of_recipes() -> list[tuple[str, dict]]:
    """``(recipe, judge)`` of every evaluation overlay whose evaluator asks a judge."""
    found = []
    for path in sorted((ROOT / "recipes" / "eval").glob("*.yaml")):
        for callback in yaml.safe_load(path.read_text()).get("trainer", {}).get("callbacks", []):
            if "judge" in callback.get("init_args", {}):
                found.append((path.name, callback["init_args"]["judge"]))
    return found


@pytest.mark.parametrize("recipe, judge", _judges_of_recipes(), ids=[name for name, _ in _judges_of_recipes()])
def test_recipe_judges_parse_and_build(recipe: str, judge: dict) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--judge", type=Judge)
    built = parser.instantiate_classes(parser.parse_object({"judge": judge})).judge
    if "toy" in recipe:
        assert isinstance(built, ToyJudge)
        return
    assert isinstance(built, ChatJudge) and isinstance(built.client, OpenAIChatClient)
    assert built.config.model == "gpt-4.1" and built.config.api_key_env == "OPENAI_API_KEY"
    assert built.config.image_format == ("jpeg" if recipe == "gedit_bench.yaml" else "png")


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
