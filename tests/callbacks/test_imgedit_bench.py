"""ImgEdit-Bench parsing and aggregation on real-looking judge replies, against hand-computed numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from callbacks.imgedit_bench import (
    PARSERS,
    ImgEditEvaluator,
    aggregate_basic,
    aggregate_uge,
    basic_record,
    basic_table,
    multiturn_case,
    multiturn_record,
    multiturn_table,
    parse_scores,
    read_human_ratings,
    rubric_fields,
    rubric_type,
    uge_record,
)
from callbacks.judges import ToyJudge
from callbacks.results import ResultsFolder
from datamodules.formats.imgedit import BASIC_TYPES
from tests.helpers.faults import FaultTable
from zoo.blocks.chat import ChatError

FIELDS = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")
PROMPTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "imgedit-bench" / "prompts.json"

WELL_FORMED = "Brief reasoning: The lemon is removed cleanly.\nPrompt Compliance: 4\nVisual Naturalness: 3\nPhysical & Detail Integrity: 5"
README_1068 = "Brief reasoning: fur colour unchanged, image intact.\nPrompt Compliance: 1\nVisual Naturalness: 4\nPhysical & Detail Integrity: 4"
BOLD = "**Brief reasoning:** fine.\n**Prompt Compliance:** 4\n**Visual Naturalness**: 4\n- **Physical and Detail Integrity:** 3"
FRACTIONS = "Brief reasoning: ok\n1. Prompt Compliance: 5/5\n2. Visual Naturalness: 4/5.\n3. Physical & Detail Integrity: 4."
MISSING = "Brief reasoning: ok\nPrompt Compliance: 5\nVisual Naturalness: 4"
REFUSAL = "I'm sorry, but I can't help with evaluating these images."
OUT_OF_TEN = "Prompt Compliance: 8/10\nVisual Naturalness: 4\nPhysical & Detail Integrity: 4"


@pytest.mark.parametrize(
    "reply, scores, official",
    [
        (WELL_FORMED, [4, 3, 5], 4.0),
        (README_1068, [1, 4, 4], 3.0),  # the official README prints 3.333; its own code gives 3.0
        (BOLD, [4, 4, 3], 4.0),  # the official parser reads only "**Visual Naturalness**: 4"
        (FRACTIONS, [5, 4, 4], None),
        (MISSING, None, 4.5),  # the official parser averages the two lines it finds
        (REFUSAL, None, None),
        (OUT_OF_TEN, None, 4.0),
    ],
)
def test_basic_parser_and_official_step1(reply: str, scores: list[float] | None, official: float | None) -> None:
    record = basic_record("k", "remove", reply, FIELDS)
    assert record["scores"] == scores
    assert record["official"] == official
    assert record["raw"] == reply
    assert (record["error"] is None) == (scores is not None)


def test_failure_reasons_are_specific() -> None:
    assert "Physical & Detail Integrity" in parse_scores(MISSING, FIELDS).error
    assert "out of 10" in parse_scores(OUT_OF_TEN, FIELDS).error
    assert "outside" in parse_scores("Prompt Compliance: 7\nVisual Naturalness: 4\nPhysical & Detail Integrity: 4", FIELDS).error
    failed = basic_record("k", "add", ChatError("HTTP 500 after 3 attempts", status=500), FIELDS)
    assert failed["error"].startswith("judge call failed") and failed["raw"] is None and failed["official"] is None


ADD_FIELDS = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Coherence")
"""The dimensions of the official `add` rubric."""
PARAPHRASED = "Brief reasoning: the cup is added.\nInstruction Compliance: 4\nVisual Quality: 3\nDetail Preservation: 4"


@pytest.mark.faults
@pytest.mark.parametrize(
    "reply, scores, error",
    [
        (PARAPHRASED, [4, 3, 4], None),  # read by position, as the official step-1 parser counts it
        ("Instruction Compliance: 4\nVisual Quality: 3", None, "no score for"),  # two lines for three dimensions
        (PARAPHRASED + "\nOverall: 4", None, "no score for"),  # four lines: which three is ambiguous
        ("Instruction Compliance: 4\nVisual Quality: 6\nDetail Preservation: 4", None, "Visual Naturalness = 6 is outside"),
        ("Compliance: 4\nVisual Naturalness: 2\nPhysical & Detail Coherence: 5", [4, 2, 5], None),  # one paraphrase
        ("Visual Naturalness: 2\nPrompt Compliance: 4\nPhysical & Detail Coherence: 5", [4, 2, 5], None),  # names beat order
    ],
)
def test_paraphrased_dimension_names_are_read_by_position_only_when_the_count_matches(
    reply: str, scores: list[float] | None, error: str | None, fault: FaultTable
) -> None:
    fault.injected("judge: paraphrased rubric names")
    record = basic_record("k", "add", reply, ADD_FIELDS)
    assert record["scores"] == scores
    assert record["by_position"] == (scores is not None and "Prompt Compliance" not in reply)
    assert (record["error"] is None) == (error is None) and (error is None or error in record["error"])
    if scores is not None:
        assert record["mean"] == pytest.approx(sum(scores) / 3) and record["official"] == round(sum(scores) / 3, 2)
    fault.survived("judge: paraphrased rubric names")


def test_cap_is_recorded_both_ways() -> None:
    record = basic_record("1068", "adjust", README_1068, FIELDS)
    assert record["mean"] == pytest.approx(3.0)
    assert record["capped"] == [1, 1, 1] and record["mean_capped"] == pytest.approx(1.0)


def _records() -> list[dict]:
    replies = {
        ("a1", "add"): "Prompt Compliance: 5\nVisual Naturalness: 4\nPhysical & Detail Integrity: 3",  # 4.0, capped 4.0
        ("a2", "add"): "Prompt Compliance: 2\nVisual Naturalness: 4\nPhysical & Detail Integrity: 3",  # 3.0, capped 2.0
        ("r1", "remove"): "**Prompt Compliance:** 5\n**Visual Naturalness:** 5\n**Physical & Detail Integrity:** 5",  # 5.0, official drops
        ("r2", "remove"): REFUSAL,
        ("s1", "style"): "Prompt Compliance: 1\nVisual Naturalness: 2\nPhysical & Detail Integrity: 2",  # 5/3, capped 1
    }
    return [basic_record(i, t, text, FIELDS) for (i, t), text in replies.items()]


def test_basic_aggregation_hand_computed() -> None:
    records = _records()
    ours = aggregate_basic(records)
    assert ours["add"]["score"] == pytest.approx(3.5)
    assert ours["remove"] == {"score": 5.0, "count": 1.0, "failed": 1.0}
    assert ours["style"]["score"] == pytest.approx(5 / 3)
    # Overall = unweighted mean of the types (not of the 5 samples: that would be 3.4167).
    assert ours["overall"]["score"] == pytest.approx((3.5 + 5.0 + 5 / 3) / 3)
    assert ours["overall"]["failed"] == 1
    capped = aggregate_basic(records, apply_cap=True)
    assert capped["add"]["score"] == pytest.approx(3.0) and capped["style"]["score"] == pytest.approx(1.0)
    official = aggregate_basic(records, official=True)
    # Step 1 rounds 5/3 to 1.67 per sample; step 2 rounds per type; the bold 'remove' reply is dropped.
    assert official["add"]["score"] == 3.5 and official["style"]["score"] == 1.67
    assert math.isnan(official["remove"]["score"]) and official["remove"]["failed"] == 2
    assert official["overall"]["score"] == pytest.approx((3.5 + 1.67) / 2)


def test_basic_table_layout() -> None:
    header, rows = basic_table(_records(), "ours", apply_cap=False)
    assert header == ["", "Add", "Remove", "Style", "Overall", "Overall types", "parser"]
    assert [r[0] for r in rows] == ["ours", "ours (our parser, capped)", "ours (official step-1/2 parser)", "samples", "failed"]
    # The official parser drops the bold 'remove' reply, so its overall covers one type fewer.
    assert [r[-2] for r in rows] == ["partial: 3 of 9", "partial: 3 of 9", "partial: 2 of 9", "", ""]
    assert rows[3][:-1] == ["samples", 2, 1, 1, 4, ""] and rows[4][:-1] == ["failed", 0, 1, 0, 1, ""]
    assert [r[-1] for r in rows] == [*PARSERS.values(), PARSERS["ours"], PARSERS["ours"]]


def test_official_headline_row_and_counts_come_from_the_official_parser(tmp_path: Path) -> None:
    _, rows = basic_table(_records(), "m", apply_cap=False, official=True)
    assert [r[0] for r in rows] == ["m", "m (our parser, as judged)", "m (our parser, capped)", "samples", "failed"]
    assert rows[0][1:4] == [3.5, pytest.approx(float("nan"), nan_ok=True), 1.67] and rows[0][-1] == PARSERS["official"]
    # The official parser keeps 3 of the 5 replies (it drops the bold one and the refusal).
    assert rows[3][:-1] == ["samples", 2, 0, 1, 3, ""] and rows[4][:-1] == ["failed", 0, 2, 0, 2, ""]
    ImgEditEvaluator(ToyJudge(), official=True, label="m").summarize(_records(), ResultsFolder(tmp_path))
    markdown = (tmp_path / "basic.md").read_text()
    assert "headline: official step-1/2 parser" in markdown.splitlines()[0]
    assert json.loads((tmp_path / "summary.json").read_text())["headline_parser"] == PARSERS["official"]


def test_uge_table_names_its_parser(tmp_path: Path) -> None:
    records = [uge_record("x", "Score: 5"), uge_record("y", "Brief reasoning: fine\nScore: 3 (Acceptable)")]
    for official, top in ((False, ["m", 4.0, 2, 0, "our parser (Score: line)"]), (True, ["m", 5.0, 1, 1, "official step-1 parser"])):
        ImgEditEvaluator(ToyJudge(), suite="uge", official=official, label="m").summarize(records, ResultsFolder(tmp_path))
        with (tmp_path / "uge.csv").open(newline="") as handle:
            table = list(csv.reader(handle))
        assert table[0][-1] == "parser" and table[1] == [str(v) for v in top]
        assert f"headline: {top[-1]}" in (tmp_path / "uge.md").read_text().splitlines()[0]


def _all_types(failing: str | None = None) -> list[dict]:
    """One record per basic type scoring 4, 4, 4; ``failing``'s reply is a refusal."""
    reply = "Prompt Compliance: 4\nVisual Naturalness: 4\nPhysical & Detail Integrity: 4"
    return [basic_record(t, t, REFUSAL if t == failing else reply, FIELDS) for t in BASIC_TYPES]


@pytest.mark.faults
@pytest.mark.parametrize("failing, expected", [(None, "9 of 9"), ("compose", "partial: 8 of 9")])
def test_partial_overall_is_marked_in_tables_summary_and_scalars(failing: str | None, expected: str, tmp_path: Path, fault: FaultTable) -> None:
    if failing:
        fault.injected("judge: ImgEdit overall over fewer types")
    records = _all_types(failing)
    scalars = ImgEditEvaluator(ToyJudge(), label="m").summarize(records, ResultsFolder(tmp_path))
    assert scalars["overall/score"] == 4.0 and scalars["overall/types"] == (9.0 if failing is None else 8.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overall_types"] == expected and summary["official"]["overall"]["types"] == scalars["overall/types"]
    with (tmp_path / "basic.csv").open(newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0][-3:] == ["Overall", "Overall types", "parser"] and [row[-2] for row in table[1:4]] == [expected] * 3
    assert f"| {expected} |" in (tmp_path / "basic.md").read_text()
    if failing:
        fault.survived("judge: ImgEdit overall over fewer types")


def test_legacy_alter_and_unknown_types() -> None:
    assert rubric_type("alter") == "adjust" and rubric_type("recolour") == "adjust"
    with pytest.raises(ValueError, match="no ImgEdit rubric"):
        rubric_type("teleport")


def test_rubric_fields_of_the_official_prompts() -> None:
    if not PROMPTS.is_file():
        pytest.skip(f"ImgEdit reference prompts not found at {PROMPTS} (workspace-only fixture, see shared/data/README.md)")
    rubrics = json.loads(PROMPTS.read_text())
    assert set(rubrics) == set(BASIC_TYPES)
    assert rubric_fields(rubrics["replace"]) == FIELDS
    assert rubric_fields(rubrics["style"]) == ("Style Fidelity", "Content Preservation", "Rendering Quality")
    for template in rubrics.values():
        assert "<edit_prompt>" in template and len(rubric_fields(template)) == 3


def test_uge_parser_reads_the_readme_examples_the_official_one_drops() -> None:
    examples = ["Brief reasoning: partly done.\nScore: 2.", "Brief reasoning: acceptable.\nScore: 3 (Acceptable)", "**Score:** 4/5"]
    records = [uge_record(str(i), text) for i, text in enumerate(examples)]
    assert [r["score"] for r in records] == [2, 3, 4]
    assert [r["official"] for r in records] == [None, None, None]
    records.append(uge_record("x", "Score: 5"))
    records.append(uge_record("y", "no idea"))
    assert aggregate_uge(records) == {"score": 3.5, "count": 4.0, "failed": 1.0}
    assert aggregate_uge(records, official=True) == {"score": 5.0, "count": 1.0, "failed": 4.0}


def test_multiturn_judge_and_human_ratings(tmp_path: Path) -> None:
    judged = [
        multiturn_record("1", 1, "Instruction Following: yes\nContent Consistency: no"),
        multiturn_record("2", 1, "**Instruction Following:** Yes.\n**Content Consistency:** yes"),
        multiturn_record("1", 2, "Instruction Following: maybe"),
    ]
    assert judged[2]["error"].startswith("unparsable") and judged[2]["raw"] == "Instruction Following: maybe"
    header, rows = multiturn_table(judged)
    assert header == ["", "Instruction Following", "Content Consistency", "samples", "failed"]
    assert rows[0] == ["turn 1", 1.0, 0.5, 2, 0]
    assert rows[1][0] == "turn 2" and math.isnan(rows[1][1]) and rows[1][3:] == [0, 1]
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("id,turn,Instruction Following,Content Consistency\n1,1,yes,no\n1,2,1,1\n2,1,no,true\n")
    human = read_human_ratings(str(ratings))
    _, rows = multiturn_table(human)
    assert rows == [["turn 1", 0.5, 0.5, 2, 0], ["turn 2", 1.0, 1.0, 1, 0]]
    ratings.write_text("id,turn,Instruction Following,Content Consistency\n1,1,perhaps,no\n")
    with pytest.raises(ValueError, match="row 1: Instruction Following = 'perhaps'"):
        read_human_ratings(str(ratings))


def test_failed_calls_are_marked_for_retry_unreadable_replies_are_final() -> None:
    failed = ChatError("HTTP 500 after 3 attempts", status=500)
    assert basic_record("k", "add", failed, FIELDS)["retry"] and uge_record("k", failed)["retry"]
    assert not basic_record("k", "add", REFUSAL, FIELDS).get("retry") and not uge_record("k", REFUSAL).get("retry")
    turns = [multiturn_record("k", 1, "Instruction Following: yes\nContent Consistency: yes"), multiturn_record("k", 2, "no idea")]
    assert not multiturn_case("k", turns)["retry"]
    assert multiturn_case("k", [*turns, multiturn_record("k", 3, failed)])["retry"]


def test_evaluator_suites_and_raters() -> None:
    assert ImgEditEvaluator(ToyJudge(), suite="multiturn").name == "imgedit_multiturn"
    rated = ImgEditEvaluator(suite="multiturn", human_ratings="ratings.csv")
    assert rated.multi_turn and rated.rater == "human ratings (ratings.csv)" and not rated.needs_truth
    with pytest.raises(ValueError, match="needs a judge"):
        ImgEditEvaluator(suite="multiturn")
    with pytest.raises(ValueError, match="multi-turn runs only"):
        ImgEditEvaluator(ToyJudge(), human_ratings="ratings.csv")
    with pytest.raises(ValueError, match="suite must be one of"):
        ImgEditEvaluator(ToyJudge(), suite="hard")
