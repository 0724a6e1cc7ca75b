"""GEdit-Bench parsing (VIEScore reply forms), per-sample SC/PQ/O and group/intersection aggregation."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from callbacks.gedit_bench import (
    GEditEvaluator,
    aggregate_gedit,
    gedit_record,
    gedit_table,
    parse_vie,
)
from callbacks.judges import ToyJudge
from callbacks.results import ResultsFolder
from datamodules.formats.gedit import GROUPS
from tests.helpers.faults import FaultTable
from zoo.blocks.chat import ChatError


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"score": [8, 6], "reasoning": "good"}', [8.0, 6.0]),
        ('||V^=^V||\n{"score": [7, 9], "reasoning": "x"}\n||V^=^V||', [7.0, 9.0]),
        ("```json\n{'score': [5, 4,], 'reasoning': 'single quotes'}\n```", [5.0, 4.0]),
        ("The scores are [3, 10].", [3.0, 10.0]),
        ('{"score": [8], "reasoning": "one"}', None),
        ('{"score": [11, 3]}', None),
        ("I cannot evaluate this image.", None),
    ],
)
def test_parse_vie(reply: str, expected: list[float] | None) -> None:
    parsed = parse_vie(reply)
    assert parsed == expected if expected is not None else isinstance(parsed, str)


@pytest.mark.faults
@pytest.mark.parametrize(
    "reply, expected, error",
    [
        ('{"score": [7, 8], "reasoning": "the edit keeps the pair [3, 4] of cups"', [7.0, 8.0], None),  # reasoning unclosed
        ('{"reasoning": "it moved the boxes [1, 2] to [5, 6]", "score": [9, 7],}}', [9.0, 7.0], None),  # reasoning first
        ("Scores [7, 8]; at first I thought [3, 4].", None, "2 number lists"),  # no reasoning key to tell them apart
        ('{"score": [7, 8] "note": [2, 3], "reasoning": "fine"', None, "2 number lists"),
        ('{"score": "high", "reasoning": "it scored [6, 6] in my head"', None, "no score list"),  # only the reasoning has one
    ],
)
def test_bare_list_fallback_takes_only_an_unambiguous_pair(
    reply: str, expected: list[float] | None, error: str | None, fault: FaultTable
) -> None:
    fault.injected("judge: broken JSON, number pairs in the text")
    parsed = parse_vie(reply)
    if expected is not None:
        assert parsed == expected
    else:
        assert isinstance(parsed, str) and error in parsed
        record = gedit_record(CASE, reply, '{"score": [8, 9]}')
        assert record["sc"] is None and record["error"].startswith("SC: ") and not record.get("retry")
    fault.survived("judge: broken JSON, number pairs in the text")


CASE = {"id": "ps_human/k1", "task_type": "ps_human", "intersection": True, "language": "en"}


def test_record_min_and_geometric_mean() -> None:
    record = gedit_record(CASE, '{"score": [9, 4]}', '{"score": [8, 9]}')
    assert record["sc"] == 4 and record["pq"] == 8 and record["o"] == pytest.approx(math.sqrt(32))


def test_failures_are_recorded_not_guessed() -> None:
    record = gedit_record(CASE, "no json here", ChatError("content filter", status=400))
    assert record["o"] is None and "SC: no score list" in record["error"] and "PQ: judge call failed" in record["error"]
    assert record["raw_sc"] == "no json here" and not record["guessed"]


def test_official_random_guess_is_seeded_and_flagged() -> None:
    first = gedit_record(CASE, "garbage", '{"score": [8, 9]}', rng=random.Random(3))
    again = gedit_record(CASE, "garbage", '{"score": [8, 9]}', rng=random.Random(3))
    expected = random.Random(3)
    guess = [float(expected.randint(0, 10)) for _ in range(2)]
    assert first["guessed"] and first["sc_scores"] == guess == again["sc_scores"]
    assert first["error"] is None and first["sc"] == min(guess)


def _rec(task: str, key: str, sc: list[int], pq: list[int], inter: bool) -> dict:
    return gedit_record({"id": f"{task}/{key}", "task_type": task, "intersection": inter, "language": "en"},
                        f'{{"score": {sc}}}', f'{{"score": {pq}}}')


def test_group_means_intersection_and_overall() -> None:
    records = [
        _rec("background_change", "a", [8, 6], [9, 9], True),  # SC 6, PQ 9, O sqrt(54)
        _rec("background_change", "b", [4, 10], [4, 8], False),  # SC 4, PQ 4, O 4
        _rec("text_change", "a", [10, 10], [1, 2], True),  # same key, other group: SC 10, PQ 1, O sqrt(10)
        gedit_record({"id": "text_change/z", "task_type": "text_change", "intersection": True, "language": "en"}, "", ""),
    ]
    full = aggregate_gedit(records)
    assert full["background_change"]["sc"] == 5 and full["background_change"]["pq"] == 6.5
    assert full["background_change"]["o"] == pytest.approx((math.sqrt(54) + 4) / 2)
    assert full["text_change"] == {"sc": 10, "pq": 1, "o": pytest.approx(math.sqrt(10)), "count": 1.0, "failed": 1.0}
    assert full["overall"]["sc"] == pytest.approx((5 + 10) / 2)  # unweighted over groups, not over samples
    assert full["overall"]["o"] == pytest.approx(((math.sqrt(54) + 4) / 2 + math.sqrt(10)) / 2)
    inter = aggregate_gedit(records, intersection=True)
    assert inter["background_change"]["sc"] == 6 and inter["background_change"]["count"] == 1
    assert inter["overall"]["pq"] == pytest.approx((9 + 1) / 2)
    header, rows = gedit_table(records, "m")
    assert header == ["", "background_change", "text_change", "overall", "Overall groups"]
    assert rows[0][0] == "m full G_SC" and rows[0][1:] == [5, 10, 7.5, "partial: 2 of 11"]
    assert rows[4] == ["full failed", 0, 1, 1, ""]


@pytest.mark.parametrize("official", [False, True])
def test_table_and_summary_name_the_parser_and_judge(official: bool, tmp_path: Path) -> None:
    records = [_rec("background_change", "a", [8, 6], [9, 9], True)]
    evaluator = GEditEvaluator(ToyJudge(), official_random_guess=official, label="m")
    evaluator.summarize(records, ResultsFolder(tmp_path))
    title = (tmp_path / "gedit.md").read_text().splitlines()[0]
    parser = "official viescore parser" if official else "our parser"
    assert f"parser: {parser} (" in title and f"judge: {ToyJudge().name}" in title
    assert json.loads((tmp_path / "summary.json").read_text())["parser"].startswith(parser)


def _all_groups(failing: str | None, extra: str | None = None) -> list[dict]:
    """One record per GEdit group (SC 6, PQ 8 each); ``failing``'s judge call failed; ``extra``: one
    more record of a task type that is not a GEdit group."""
    records = [_rec(g, "k", [6, 9], [8, 8], True) for g in GROUPS if g != failing]
    if failing is not None:
        records.append(gedit_record({"id": f"{failing}/k", "task_type": failing, "intersection": True, "language": "en"}, "", ""))
    if extra is not None:
        records.append(_rec(extra, "k", [0, 0], [0, 0], True))
    return records


@pytest.mark.faults
@pytest.mark.parametrize(
    "failing, extra, expected",
    [(None, None, "11 of 11"), ("text_change", None, "partial: 10 of 11"), (None, "recolour", "11 of 11")],
    ids=["all groups", "one group unscored", "a task type outside GEdit"],
)
def test_partial_overall_is_marked_in_tables_summary_and_scalars(
    failing: str | None, extra: str | None, expected: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: FaultTable
) -> None:
    kind = "judge: GEdit overall over fewer groups" if failing else "judge: GEdit records outside its groups"
    if failing or extra:
        fault.injected(kind)
    scalars = GEditEvaluator(ToyJudge(), label="m").summarize(_all_groups(failing, extra), ResultsFolder(tmp_path))
    assert scalars["full/sc"] == 6.0 and scalars["full/pq"] == 8.0  # the extra type's zeros stay out of the overall
    assert scalars["overall/groups"] == (10.0 if failing else 11.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overall_groups"] == {"full": expected, "intersection": expected}
    with (tmp_path / "gedit.csv").open(newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0][-2:] == ["overall", "Overall groups"] and [row[-1] for row in table[1:4]] == [expected] * 3
    assert table[0][1:-2] == [*GROUPS, *([extra] if extra else [])]  # an unscored group keeps its column (nan)
    assert f"| {expected} |" in (tmp_path / "gedit.md").read_text()
    assert any("GEdit-Bench overall is partial: 10 of 11" in r.getMessage() for r in caplog.records) == bool(failing)
    if failing or extra:
        fault.survived(kind)
