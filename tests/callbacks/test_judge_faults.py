"""Judge faults against a local OpenAI-protocol server (:mod:`tests.helpers.openai_server`): every
fault is scored after a retry, or recorded as a failure with its reason (asked again by the next run
when the call failed), never a wrong score; a rerun asks only what the cache lacks; the API key,
echoed by the server in every faulty answer, is never in logs, records, cache or exceptions. Load:
64 requests at once keep the judge's concurrency limit and every reply on its own request."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from callbacks.gedit_bench import gedit_record
from callbacks.imgedit_bench import basic_record
from callbacks.judges import ChatJudge, JudgeConfig, JudgeRequest
from tests.helpers.faults import FaultTable
from tests.helpers.openai_server import OpenAIServer, Reply, Request, completion, error

KEY = "sk-judge-7c31d09e55b2"
FIELDS = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")
CASES = 4
FAULTY = 1
"""The case whose judge call meets the fault; the others are answered normally."""


def answer(case: int) -> str:
    """The well-formed basic-suite reply for ``case``: scores 1 + case % 5, 4, 3."""
    return f"Brief reasoning: ok.\nPrompt Compliance: {1 + case % 5}\nVisual Naturalness: 4\nPhysical & Detail Integrity: 3"


def torn(case: int) -> Reply:
    body = json.dumps(completion(answer(case) + f" {KEY}").body)
    return Reply(raw=body[: len(body) // 2].encode())


@dataclass
class Fault:
    """What the server does with the faulty case's requests: ``first`` answers its first request
    (then a normal answer follows), ``every`` answers all of them. ``outcome``: ``scored`` (the
    normal scores), ``by_position`` (scored from paraphrased names), ``retry`` (a failed call, asked
    again by the next run) or ``final`` (an unreadable reply, kept with its text)."""

    first: Reply | None = None
    every: Reply | None = None
    outcome: str = "scored"
    reason: str = ""


FAULTS = {
    "timeout": Fault(first=Reply(body={}, delay=3.0)),
    "429 with Retry-After": Fault(first=error(429, f"rate limited for {KEY}", {"Retry-After": "0.3"})),
    "500 then success": Fault(first=error(500, f"upstream failed with key {KEY}", {"Retry-After": "0"})),
    "500 on every attempt": Fault(every=error(500, f"upstream failed with key {KEY}", {"Retry-After": "0"}), outcome="retry", reason="HTTP 500"),
    "truncated body": Fault(first=torn(FAULTY)),
    "non-JSON body": Fault(first=Reply(raw=f"<html>502 bad gateway {KEY}</html>".encode())),
    "content-filter refusal": Fault(every=completion(None, finish_reason="content_filter"), outcome="retry", reason="content_filter"),
    "refusal in words": Fault(every=completion(f"I'm sorry, I can't evaluate these images. ({KEY})"), outcome="final", reason="no score for"),
    "paraphrased rubric names": Fault(
        every=completion("Instruction Compliance: 2\nVisual Quality: 4\nDetail Preservation: 3"), outcome="by_position"
    ),
    "reply for the wrong number of images": Fault(
        every=completion("Original image:\n" + answer(4) + "\nEdited image:\n" + answer(FAULTY)), outcome="final", reason="scored both"
    ),
}


def _case(request: Request) -> int:
    return int(request.body["messages"][0]["content"][0]["text"].split()[-1])


def _request(case: int) -> JudgeRequest:
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(case))
    return JudgeRequest("imgedit_basic", [f"rate the edit of case {case}", image, image.flip(-1)], FIELDS)


def _judge(server: OpenAIServer, cache: Path) -> ChatJudge:
    # 1.5 s: a loaded machine's local reply comes well within it, the timeout fault's 3 s reply does not.
    config = JudgeConfig(base_url=server.base_url, model="gpt-4.1", api_key_env="ZOO_JUDGE_KEY", max_retries=2, timeout=1.5)
    return ChatJudge(config, cache_dir=str(cache), max_workers=4)


def _texts(value: object) -> list[str]:
    if isinstance(value, BaseException):
        return [str(value), repr(value), "".join(traceback.format_exception(value))]
    return [json.dumps(value) if not isinstance(value, str) else value]


@pytest.mark.faults
@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_judge_fault_is_scored_after_a_retry_or_recorded_and_the_rerun_asks_only_what_failed(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fault: FaultTable
) -> None:
    fault.injected(f"judge: {kind}")
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("ZOO_JUDGE_KEY", KEY)
    spec, seen = FAULTS[kind], Counter[int]()
    times: list[float] = []

    def respond(request: Request) -> Reply:
        case = _case(request)
        seen[case] += 1
        if case == FAULTY:
            times.append(time.monotonic())
            if spec.every is not None or (spec.first is not None and seen[case] == 1):
                return spec.every or spec.first  # type: ignore[return-value]
        return completion(answer(case))

    requests = [_request(case) for case in range(CASES)]
    with OpenAIServer(respond=respond) as server:
        replies = _judge(server, tmp_path / "cache").ask(requests)
    records = [basic_record(str(case), "add", reply, FIELDS) for case, reply in enumerate(replies)]
    assert len(records) == CASES  # none lost
    for case, record in enumerate(records):
        if case != FAULTY or spec.outcome == "scored":
            assert record["scores"] == [1 + case % 5, 4, 3] and record["error"] is None, record
    record = records[FAULTY]
    if spec.outcome == "by_position":
        assert record["scores"] == [2, 4, 3] and record["by_position"]
    elif spec.outcome in ("retry", "final"):
        assert record["scores"] is None and record["mean"] is None and spec.reason in record["error"], record
        assert record.get("retry", False) == (spec.outcome == "retry")
    # Asked again after a transient fault and after each failed attempt (2 retries); a readable reply is final.
    assert seen[FAULTY] == (2 if spec.first is not None else 3 if spec.outcome == "retry" else 1)
    if kind in ("429 with Retry-After", "timeout"):
        assert times[1] - times[0] >= (0.3 if kind.startswith("429") else 1.5), "the retry came before Retry-After / the timeout"

    # The rerun (a healthy server now) asks again only for the failed call; every other reply is cached.
    with OpenAIServer(respond=lambda request: completion(answer(_case(request)))) as server:
        rerun = _judge(server, tmp_path / "cache").ask(requests)
        asked = [_case(r) for r in server.requests]
    assert asked == ([FAULTY] if spec.outcome == "retry" else [])
    again = [basic_record(str(case), "add", reply, FIELDS) for case, reply in enumerate(rerun)]
    assert again[FAULTY]["scores"] == (None if spec.outcome == "final" else record["scores"] or [1 + FAULTY % 5, 4, 3])

    cache = [path.read_text() for path in (tmp_path / "cache").rglob("*.json")]
    shown = [caplog.text, *(r.getMessage() for r in caplog.records), *cache, *(t for r in [*replies, *records] for t in _texts(r))]
    assert all(KEY not in text for text in shown), "the key leaked"
    fault.survived(f"judge: {kind}", lost=CASES - len(records))


@pytest.mark.faults
@pytest.mark.parametrize(
    "reply, reason",
    [
        ('{"score": [7], "reasoning": "one image only"}', "expected 2 numeric scores"),
        ('{"score": [7, 8, 2, 9], "reasoning": "two per image"}', "expected 2 numeric scores"),
        ('{"score": [7, 8], "reasoning": "original"} {"score": [3, 9], "reasoning": "edited"}', "ambiguous"),
    ],
    ids=["one score", "scores for two images", "one answer per image"],
)
def test_gedit_reply_for_the_wrong_number_of_images_is_a_failure(reply: str, reason: str, fault: FaultTable) -> None:
    fault.injected("judge: GEdit reply for the wrong number of images")
    case = {"id": "background_change/k", "task_type": "background_change", "intersection": False, "language": "en"}
    record = gedit_record(case, reply, '{"score": [8, 8], "reasoning": "fine"}')
    assert record["sc"] is None and record["o"] is None and reason in record["error"] and not record["retry"]
    assert record["raw_sc"] == reply
    fault.survived("judge: GEdit reply for the wrong number of images")


LOAD, LIMIT = 64, 8


@pytest.mark.faults
def test_64_requests_at_once_keep_the_concurrency_limit_and_every_reply(tmp_path: Path, fault: FaultTable) -> None:
    fault.injected("judge: 64 concurrent requests", LOAD)
    full, active, peak, first_tries = threading.Condition(), [0], [0], set()

    def respond(request: Request) -> Reply:
        case = _case(request)
        with full:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            throttled = case % 8 == 0 and case not in first_tries
            first_tries.add(case)
            full.notify_all()
            # Held until the limit's worth of requests is in flight (or 1 s): a client that sends
            # more shows a higher peak, one that sends fewer than it may is seen too (a loaded
            # machine's slow client threads cannot hide either).
            full.wait_for(lambda: active[0] >= LIMIT, timeout=1.0)
        with full:
            active[0] -= 1
        return error(429, "slow down", {"Retry-After": "0"}) if throttled else completion(answer(case))

    with OpenAIServer(respond=respond) as server:
        config = JudgeConfig(base_url=server.base_url, model="gpt-4.1", api_key_env=None, max_retries=2, timeout=10.0)
        judge = ChatJudge(config, cache_dir=str(tmp_path), max_workers=LIMIT)
        replies = judge.ask([_request(case) for case in range(LOAD)])
    assert peak[0] == LIMIT, f"{peak[0]} requests in flight at once, the limit is {LIMIT}"
    assert len(server.requests) == LOAD + LOAD // 8  # each throttled case asked once more, nothing else
    records = [basic_record(str(case), "add", reply, FIELDS) for case, reply in enumerate(replies)]
    assert [r["scores"] for r in records] == [[1 + case % 5, 4, 3] for case in range(LOAD)]  # each on its own request
    assert len(list(tmp_path.rglob("*.json"))) == LOAD
    fault.survived("judge: 64 concurrent requests", LOAD, lost=LOAD - sum(r["error"] is None for r in records))
