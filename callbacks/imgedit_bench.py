"""ImgEdit-Bench (ImgEdit paper §5): rubric judging, answer parsing and aggregation of the basic, UGE
and multi-turn suites.

Basic suite (facts from the official scripts in ``PKU-YuanGroup/ImgEdit@547185d:Benchmark/Basic/``:
``basic_bench.py``, ``step1_get_avgscore.py``, ``step2_typescore.py``): the judge gets the per-type
rubric of ``prompts.json`` with ``<edit_prompt>`` replaced, then the original and the edited image
(always exactly two), and answers three 1-5 scores. A sample's score is the mean of
the three; a type's score the mean over its samples; **Overall = unweighted mean of the 9 type
scores** (how the leaderboard's Overall is computed). An Overall over fewer types (some absent
or all failed) is marked ``partial: k of 9`` in every table and ``summary.json``
(``overall_types``), and logged with the scalar ``overall/types`` = k.

Where this differs from the official scorer, the official behaviour is available behind flags:

- our parser accepts what judges really write (``**Prompt Compliance:** 4``, ``4/5``, ``4.``,
  bullets) and records an unparsable reply or a failed call as a failure with its raw text; the
  official step-1 parser (``official=True``) keeps only lines of the exact form ``Name: 4``, averages
  every such line, rounds to 2 decimals and silently drops samples without one (README example
  "1068" with scores 1, 4, 4 gives 3.0). Both numbers are in every record.
- the rubric says "the second and third score should no higher than first score", but no code
  enforces it: records keep the scores as judged and capped (``min(s, s1)``); ``apply_cap`` picks
  the capped ones for the headline.
- a reply naming the dimensions in its own words ("Instruction Compliance" for "Prompt
  Compliance") is read by position when it holds exactly three ``Name: n`` lines (``by_position``
  in the record), as the official parser would count it; any other count is a failure, and so is a
  dimension scored twice with different values (a reply rating each image: the official parser
  averages them all).
- legacy ``alter`` labels (before 2025-06-16) are read as ``adjust``.

UGE suite: one score per sample. The official prompt shows no score line and its parser then drops
every README example; our prompt asks for ``Score: <1-5>`` and our parser reads ``Score: 3 (Acceptable)``
and ``Score: 2.``; ``official=True`` applies the step-1 line parser instead.

Multi-turn suite (2-3 instructions on one image, ``Multiturn_readme.md``): turn k edits turn k-1's
result (the module's ``edit_outputs``; saved by :class:`callbacks.results.BenchmarkEvaluator`). The
paper rates each turn by hand and the repository ships no judge; here each turn is judged on the
image before it and the image after it with :data:`MULTITURN_PROMPT` (yes/no per criterion), or
the verdicts are imported from a human-ratings file (``human_ratings``). The table reports, per
turn, the share of "yes" of each criterion over the turns rated, with the count rated and failed.

A record of a failed judge call (or of a turn not rated yet) is marked ``retry``: the next run asks
again instead of keeping the failure.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callbacks.judges import Judge, JudgeRequest
from callbacks.results import BenchmarkEvaluator, ResultsFolder, Table, coverage
from datamodules.benchmarks import fetch
from datamodules.formats.imgedit import BASIC_TYPES, LEGACY_LABELS, SUITES
from zoo.blocks.chat import ChatError

log = logging.getLogger(__name__)

TOY_TYPES = {"recolour": "adjust", "move": "replace"}
"""Rubric used for the toy generator's edit types that ImgEdit does not name."""

MULTITURN_CRITERIA = ("Instruction Following", "Content Consistency")
"""Yes/no criteria of a multi-turn turn: the turn's instruction is done; earlier content is kept."""

UGE_PROMPT = """You rate an image edit made from a hard, open-ended instruction. You see the original image, then the edited one.
Judge four things together: adherence (the instruction is carried out fully and correctly), naturalness (the result looks real, without artifacts), editing scope (only what the instruction concerns is changed) and non-edited areas (everything else is unchanged; if other areas changed, the score cannot exceed 3).
Scale: 1 = failed or broken; 2 = partly done with clear flaws; 3 = acceptable with noticeable issues; 4 = good with minor issues; 5 = flawless.
Answer in exactly this format:
Brief reasoning: <at most 20 words>
Score: <a number from 1 to 5>
Editing Instruction: <edit_prompt>."""

MULTITURN_PROMPT = """You check one turn of a multi-turn image edit. You see the image before this turn, then the image after it.
Instruction of this turn: <edit_prompt>.
Answer each question with yes or no, in exactly this format:
Instruction Following: <yes or no> (is this turn's instruction carried out?)
Content Consistency: <yes or no> (is everything the instruction does not concern, including earlier edits, kept?)"""


# -- parsing -----------------------------------------------------------------------------------

_DECORATION = re.compile(r"[*_`#]")
_BULLET = re.compile(r"^\s*(?:[-•>]+|\d+[.)])\s+")
_NAME_VALUE = re.compile(r"^(?P<name>[^:：]+?)\s*[:：]\s*(?P<value>\d+(?:\.\d+)?)\s*(?:/\s*(?P<of>\d+))?(?=\W|$)")


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("&", " and ").split())


def _scored_lines(text: str) -> list[tuple[str, float, int | None]]:
    """``(name, value, denominator)`` of every ``Name: value[/n]`` line, markdown and bullets removed."""
    found = []
    for line in text.splitlines():
        line = _BULLET.sub("", _DECORATION.sub("", line)).strip()
        match = _NAME_VALUE.match(line)
        if match:
            found.append((_norm(match["name"]), float(match["value"]), int(match["of"]) if match["of"] else None))
    return found


@dataclass
class Parsed:
    """A parsed reply: ``scores`` in the rubric's order, or ``error`` saying why not; ``by_position``
    when the scores were read by their order, the reply naming the dimensions in its own words."""

    scores: list[float] | None
    error: str | None = None
    by_position: bool = False


def _checked(field: str, value: float, denominator: int | None, low: float, high: float) -> str | None:
    """Why ``value`` (``/denominator``) is not a score of ``field`` on [low, high], or None."""
    if denominator is not None and denominator != high:
        return f"{field} is given out of {denominator}, not {high:g}"
    if not low <= value <= high:
        return f"{field} = {value:g} is outside [{low:g}, {high:g}]"
    return None


def _by_name(lines: list[tuple[str, float, int | None]], fields: tuple[str, ...], low: float, high: float) -> Parsed:
    """The scores of the lines naming ``fields``; a field repeated with the same score counts once,
    with another score (a reply rating each image, or two answers) it is a failure, not a guess."""
    wanted = {_norm(f): i for i, f in enumerate(fields)}
    scores: list[float | None] = [None] * len(fields)
    for name, value, denominator in lines:
        if name not in wanted:
            continue
        earlier = scores[wanted[name]]
        if earlier is not None:
            if earlier != value:
                return Parsed(None, f"{fields[wanted[name]]} is scored both {earlier:g} and {value:g} (a reply for more than one edit?)")
            continue
        problem = _checked(fields[wanted[name]], value, denominator, low, high)
        if problem is not None:
            return Parsed(None, problem)
        scores[wanted[name]] = value
    missing = [f for f, s in zip(fields, scores) if s is None]
    if missing:
        return Parsed(None, f"no score for {', '.join(missing)}")
    return Parsed([s for s in scores if s is not None])


def _by_position(lines: list[tuple[str, float, int | None]], fields: tuple[str, ...], low: float, high: float) -> Parsed:
    """The scores of exactly ``len(fields)`` lines, read in the rubric's order whatever they are named."""
    for field, (_, value, denominator) in zip(fields, lines):
        problem = _checked(field, value, denominator, low, high)
        if problem is not None:
            return Parsed(None, f"{problem} (read by position)")
    return Parsed([value for _, value, _ in lines], by_position=True)


def parse_scores(text: str, fields: tuple[str, ...], low: float = 1.0, high: float = 5.0) -> Parsed:
    """The scores named ``fields`` (case, markdown and ``&``/``and`` ignored), each in [low, high].

    A ``/n`` fraction must have ``n == high``. A field scored twice differently is a failure. When the names
    do not all appear but the reply holds exactly ``len(fields)`` ``Name: n`` lines (a judge that
    paraphrases the dimensions: "Instruction Compliance" for "Prompt Compliance"), they are read by
    position, as the official step-1 parser counts them; any other count is a failure.
    """
    lines = _scored_lines(text)
    all_named = {_norm(f) for f in fields} <= {name for name, _, _ in lines}
    if len(lines) == len(fields) and not all_named:
        return _by_position(lines, fields, low, high)
    return _by_name(lines, fields, low, high)


def official_step1(text: str) -> float | None:
    """The official ``step1_get_avgscore.py`` rule: mean of lines splitting on ``': '`` into exactly two
    parts whose second is all digits, rounded to 2 decimals; None (the sample dropped) when none."""
    values = []
    for line in text.splitlines():
        parts = line.strip().split(": ")
        if len(parts) == 2 and parts[1].isdigit():
            values.append(int(parts[1]))
    return round(sum(values) / len(values), 2) if values else None


def parse_yes_no(text: str, fields: tuple[str, ...] = MULTITURN_CRITERIA) -> dict[str, bool] | str:
    """``field -> yes?`` for every field, or the reason the reply cannot be read."""
    wanted = {_norm(f): f for f in fields}
    verdicts: dict[str, bool] = {}
    for line in text.splitlines():
        line = _BULLET.sub("", _DECORATION.sub("", line)).strip()
        name, sep, rest = line.partition(":")
        word = rest.strip().split(" ")[0].strip(".,;!()").lower() if sep else ""
        if _norm(name) in wanted and word in ("yes", "no") and wanted[_norm(name)] not in verdicts:
            verdicts[wanted[_norm(name)]] = word == "yes"
    missing = [f for f in fields if f not in verdicts]
    return f"no yes/no for {', '.join(missing)}" if missing else verdicts


# -- rubrics -----------------------------------------------------------------------------------

TOY_RUBRIC_FIELDS = ("Instruction Compliance", "Preservation", "Integrity")
"""The three dimensions the toy judge rates when no rubric is read (ImgEdit's order: compliance,
then the type's second and third dimensions)."""

_FIELD_LINE = re.compile(r"^(?P<name>[^:]+): A number from 1 to 5\.?\s*$")


def rubric_fields(template: str) -> tuple[str, str, str]:
    """The three dimension names a rubric's "Example Response Format" asks for."""
    _, _, tail = template.partition("Example Response Format:")
    names = tuple(m["name"].strip() for line in tail.splitlines() if (m := _FIELD_LINE.match(line.strip())))
    if len(names) != 3:
        raise ValueError(f"an ImgEdit rubric must ask for 3 scores, found {names}")
    return names  # type: ignore[return-value]


def load_rubrics(local_path: str | None = None, cache_dir: str | None = None) -> dict[str, str]:
    """The official per-type rubrics (``prompts.json``, pinned and checksummed)."""
    rubrics = json.loads(fetch("imgedit/prompts.json", cache_dir, local_path).read_text(encoding="utf-8"))
    missing = set(BASIC_TYPES) - set(rubrics)
    if missing:
        raise ValueError(f"prompts.json lacks rubrics for {sorted(missing)}")
    return rubrics


def rubric_type(edit_type: str) -> str:
    """The rubric key of an edit type: ImgEdit's own, legacy ``alter``, or a toy type."""
    label = LEGACY_LABELS.get(edit_type, TOY_TYPES.get(edit_type, edit_type))
    if label not in BASIC_TYPES:
        raise ValueError(f"edit type {edit_type!r} has no ImgEdit rubric; known: {BASIC_TYPES} (+ 'alter', {sorted(TOY_TYPES)})")
    return label


# -- records and aggregation --------------------------------------------------------------------


def basic_record(sample_id: str, edit_type: str, reply: str | ChatError, fields: tuple[str, ...]) -> dict[str, Any]:
    """One basic-suite record: scores as judged and capped, their means, the official step-1 score."""
    record: dict[str, Any] = {"id": sample_id, "edit_type": edit_type, "raw": None, "error": None, "scores": None,
                              "capped": None, "mean": None, "mean_capped": None, "official": None, "by_position": False}
    if isinstance(reply, ChatError):
        return record | {"error": f"judge call failed: {reply}", "retry": True}
    record["raw"] = reply
    record["official"] = official_step1(reply)
    parsed = parse_scores(reply, fields)
    if parsed.scores is None:
        record["error"] = f"unparsable reply: {parsed.error}"
        return record
    first = parsed.scores[0]
    capped = [first] + [min(s, first) for s in parsed.scores[1:]]
    record |= {"scores": parsed.scores, "capped": capped, "mean": sum(parsed.scores) / 3, "mean_capped": sum(capped) / 3,
               "by_position": parsed.by_position}
    return record


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def aggregate_basic(records: list[dict[str, Any]], apply_cap: bool = False, official: bool = False) -> dict[str, dict[str, float]]:
    """Per-type ``score``/``count``/``failed`` and ``overall``: the unweighted mean of the types with
    a score, ``types`` of them out of the suite's ``of`` (9); see :func:`overall_coverage`.

    ``official``: per-sample step-1 scores, per-type ``round(mean, 2)`` as ``step2_typescore.py``;
    failures are still counted (the official script drops them without a word).
    """
    column = "official" if official else ("mean_capped" if apply_cap else "mean")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["edit_type"]].append(record)
    table: dict[str, dict[str, float]] = {}
    for edit_type in [t for t in BASIC_TYPES if t in groups]:
        values = [r[column] for r in groups[edit_type] if r[column] is not None]
        score = _mean(values)
        table[edit_type] = {
            "score": round(score, 2) if official and values else score,
            "count": float(len(values)),
            "failed": float(len(groups[edit_type]) - len(values)),
        }
    scores = [v["score"] for v in table.values() if not math.isnan(v["score"])]
    table["overall"] = {
        "score": _mean(scores),
        "count": sum(v["count"] for v in table.values()),
        "failed": sum(v["failed"] for v in table.values()),
        "types": float(len(scores)),
        "of": float(len(BASIC_TYPES)),
    }
    return table


def overall_coverage(aggregate: dict[str, dict[str, float]]) -> str:
    """``9 of 9``, or ``partial: k of 9`` when the overall of ``aggregate`` misses types."""
    return coverage(int(aggregate["overall"]["types"]), int(aggregate["overall"]["of"]))


PARSERS = {"ours": "our parser, as judged", "capped": "our parser, capped", "official": "official step-1/2 parser"}
"""The three readings of the basic suite's replies, by the name tables and ``summary.json`` use."""


def basic_parser(apply_cap: bool, official: bool) -> str:
    """The :data:`PARSERS` key the headline uses: ``official`` wins over ``apply_cap``."""
    return "official" if official else ("capped" if apply_cap else "ours")


def basic_table(records: list[dict[str, Any]], label: str, apply_cap: bool, official: bool = False) -> Table:
    """Paper layout (ImgEdit Table 3): one column per type + Overall + the types Overall averages
    (``partial: k of 9`` when some have no score) + the parser of the row. Rows: the headline (the
    parser asked for: ``official`` or ``apply_cap``), the two other readings, then the headline's
    samples scored and failures (each parser drops different replies, so its counts differ)."""
    headline = basic_parser(apply_cap, official)
    readings = {
        "ours": aggregate_basic(records),
        "capped": aggregate_basic(records, apply_cap=True),
        "official": aggregate_basic(records, official=True),
    }
    order = [headline, *(name for name in PARSERS if name != headline)]
    columns = [t for t in BASIC_TYPES if t in readings["ours"]] + ["overall"]
    names = {name: label if name == headline else f"{label} ({PARSERS[name]})" for name in order}
    rows: list[list[Any]] = [
        [names[n], *(readings[n][c]["score"] for c in columns), overall_coverage(readings[n]), PARSERS[n]] for n in order
    ]
    top = readings[headline]
    rows.append(["samples", *(int(top[c]["count"]) for c in columns), "", PARSERS[headline]])
    rows.append(["failed", *(int(top[c]["failed"]) for c in columns), "", PARSERS[headline]])
    return ["", *(c.capitalize() for c in columns), "Overall types", "parser"], rows


def uge_record(sample_id: str, reply: str | ChatError) -> dict[str, Any]:
    """One UGE record: our ``Score:`` reading and the official step-1 reading."""
    record: dict[str, Any] = {"id": sample_id, "raw": None, "error": None, "score": None, "official": None}
    if isinstance(reply, ChatError):
        return record | {"error": f"judge call failed: {reply}", "retry": True}
    record["raw"], record["official"] = reply, official_step1(reply)
    scores = [(v, d) for name, v, d in _scored_lines(reply) if name == "score"]
    if not scores:
        record["error"] = "unparsable reply: no 'Score: <1-5>' line"
    elif not 1 <= scores[-1][0] <= 5 or scores[-1][1] not in (None, 5):
        record["error"] = f"unparsable reply: score {scores[-1][0]:g} is not on the 1-5 scale"
    else:
        record["score"] = scores[-1][0]
    return record


def aggregate_uge(records: list[dict[str, Any]], official: bool = False) -> dict[str, float]:
    """Mean over samples (official: of the step-1 scores, rounded to 2 decimals), with counts."""
    column = "official" if official else "score"
    values = [r[column] for r in records if r[column] is not None]
    score = _mean(values)
    return {"score": round(score, 2) if official and values else score, "count": float(len(values)), "failed": float(len(records) - len(values))}


# -- multi-turn --------------------------------------------------------------------------------


def read_human_ratings(path: str, criteria: tuple[str, ...] = MULTITURN_CRITERIA) -> list[dict[str, Any]]:
    """Human multi-turn ratings from a CSV or JSONL with columns ``id``, ``turn`` and one column per
    criterion holding yes/no (also 1/0, true/false); returns records like judged ones.

    Raises:
        ValueError: a missing column or an unreadable verdict, naming the row.
    """
    file = Path(path)
    if file.suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    truthy = {"yes": True, "y": True, "1": True, "true": True, "no": False, "n": False, "0": False, "false": False}
    records = []
    for number, row in enumerate(rows, start=1):
        verdicts = {}
        for criterion in (*criteria, "id", "turn"):
            if criterion not in row:
                raise ValueError(f"{path} row {number}: missing column {criterion!r} (need id, turn, {', '.join(criteria)})")
        for criterion in criteria:
            word = str(row[criterion]).strip().lower()
            if word not in truthy:
                raise ValueError(f"{path} row {number}: {criterion} = {row[criterion]!r} is not yes/no")
            verdicts[criterion] = truthy[word]
        records.append({"id": str(row["id"]), "turn": int(row["turn"]), "verdicts": verdicts, "error": None})
    return records


def multiturn_record(sample_id: str, turn: int, reply: str | ChatError, criteria: tuple[str, ...] = MULTITURN_CRITERIA) -> dict[str, Any]:
    """One judged turn: ``verdicts`` or ``error`` with the raw reply kept."""
    if isinstance(reply, ChatError):
        return {"id": sample_id, "turn": turn, "verdicts": None, "error": f"judge call failed: {reply}", "raw": None, "retry": True}
    verdicts = parse_yes_no(reply, criteria)
    if isinstance(verdicts, str):
        return {"id": sample_id, "turn": turn, "verdicts": None, "error": f"unparsable reply: {verdicts}", "raw": reply}
    return {"id": sample_id, "turn": turn, "verdicts": verdicts, "error": None, "raw": reply}


def aggregate_multiturn(records: list[dict[str, Any]], criteria: tuple[str, ...] = MULTITURN_CRITERIA) -> dict[int, dict[str, float]]:
    """Per turn (in order): the yes-rate of each criterion over the rated turns, ``count`` rated, ``failed``."""
    turns: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        turns[record["turn"]].append(record)
    table = {}
    for turn in sorted(turns):
        rated = [r["verdicts"] for r in turns[turn] if r["verdicts"] is not None]
        table[turn] = {c: _mean([float(v[c]) for v in rated]) for c in criteria}
        table[turn] |= {"count": float(len(rated)), "failed": float(len(turns[turn]) - len(rated))}
    return table


def multiturn_table(records: list[dict[str, Any]], criteria: tuple[str, ...] = MULTITURN_CRITERIA) -> Table:
    """Rows per turn: the yes-rate of each criterion, samples rated and failures."""
    rows = [
        [f"turn {turn}", *(values[c] for c in criteria), int(values["count"]), int(values["failed"])]
        for turn, values in aggregate_multiturn(records, criteria).items()
    ]
    return ["", *criteria, "samples", "failed"], rows


def multiturn_case(sample_id: str, turns: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of one multi-turn case: its turn records, ``retry`` when any turn is to be asked again."""
    return {"id": sample_id, "turns": turns, "retry": any(t.get("retry", False) for t in turns)}


def turn_requests(entry: dict[str, Any], folder: ResultsFolder) -> list[JudgeRequest]:
    """One request per turn of a generated multi-turn case: the turn's instruction, the image before
    the turn (the source, then the previous result) and the image after it."""
    images = [folder.load_image(folder.companion(entry["id"], "SRCIMG"))]
    images += [folder.load_image(folder.edited(entry["id"], turn)) for turn in range(1, len(entry["turns"]) + 1)]
    return [
        JudgeRequest("imgedit_multiturn", [MULTITURN_PROMPT.replace("<edit_prompt>", t["instruction"]), images[k], images[k + 1]], MULTITURN_CRITERIA)
        for k, t in enumerate(entry["turns"])
    ]


# -- the evaluator -----------------------------------------------------------------------------


class ImgEditEvaluator(BenchmarkEvaluator):
    """Judges edits with the ImgEdit-Bench protocol and writes the results folder.

    Args:
        judge: a :class:`~callbacks.judges.ChatJudge` (remote API or local VLM) or,
            on toy data, :class:`~callbacks.judges.ToyJudge`; may be left out only when
            ``human_ratings`` rates a multi-turn run.
        suite: ``basic`` (per-type rubrics), ``uge`` (one score) or ``multiturn`` (every turn
            generated, yes/no per turn; data: ``BenchmarkDataModule(benchmark="imgedit_multiturn")``).
        apply_cap: headline uses scores capped by the first ("2nd and 3rd <= 1st").
        official: headline uses the official step-1/2 parser (reproduces published numbers).
        rubrics: a local copy of ``prompts.json`` (default: downloaded, pinned).
        cache_dir: benchmark file cache (see :func:`datamodules.benchmarks.fetch`).
        human_ratings: multi-turn only: take the verdicts from this CSV/JSONL (see
            :func:`read_human_ratings`) instead of a judge, as the paper rates multi-turn edits; a
            turn not in the file yet is counted as failed and imported by the next run.
        label: the model's name in the tables.
        output_dir: results folder (default ``<log_dir>/imgedit_<suite>``).
        on_validation: also evaluate during fit's validation runs.
    """

    def __init__(
        self,
        judge: Judge | None = None,
        suite: str = "basic",
        apply_cap: bool = False,
        official: bool = False,
        rubrics: str | None = None,
        cache_dir: str | None = None,
        human_ratings: str | None = None,
        label: str = "model",
        output_dir: str | None = None,
        on_validation: bool = False,
    ) -> None:
        super().__init__(output_dir, on_validation)
        if suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
        if human_ratings is not None and suite != "multiturn":
            raise ValueError(f"human_ratings rates multi-turn runs only (suite='multiturn'), got suite={suite!r}")
        if judge is None and human_ratings is None:
            raise ValueError("ImgEditEvaluator needs a judge (or, for suite='multiturn', a human_ratings file)")
        self.judge, self.suite, self.apply_cap, self.official, self.label = judge, suite, apply_cap, official, label
        self.rubrics_path, self.cache_dir, self.human_ratings = rubrics, cache_dir, human_ratings
        self.name = f"imgedit_{suite}"
        self.multi_turn = suite == "multiturn"
        self._rubrics: dict[str, str] | None = None

    @property
    def needs_truth(self) -> bool:
        return self.judge is not None and self.judge.needs_truth

    @property
    def rater(self) -> str:
        """Who gives the verdicts: the judge (its name) or the human-ratings file."""
        if self.human_ratings is not None or self.judge is None:
            return f"human ratings ({self.human_ratings})"
        return self.judge.name

    @property
    def reads_rubrics(self) -> bool:
        """The basic suite's judge reads the official rubric; the toy judge answers from the ground
        truth alone, so a toy run needs no ``prompts.json`` (and no network)."""
        return self.suite == "basic" and not self.needs_truth

    def rubrics(self) -> dict[str, str]:
        if self._rubrics is None:
            self._rubrics = load_rubrics(self.rubrics_path, self.cache_dir)
        return self._rubrics

    def preflight(self) -> None:
        if self.reads_rubrics:
            self.rubrics()  # fetched (or refused, in one line) before any edit is generated
        if self.judge is not None:
            self.judge.preflight()

    # -- scoring --

    def score(self, entries: list[dict[str, Any]], folder: ResultsFolder) -> list[dict[str, Any]]:
        if self.suite == "multiturn" and self.human_ratings is not None:
            return [multiturn_case(e["id"], turns) for e, turns in zip(entries, self._rated_turns(entries))]
        assert self.judge is not None
        self.judge.set_default_cache(folder.root / "judge_cache")
        if self.suite == "multiturn":
            return self._judge_turns(entries, folder)
        requests = [self._request(entry, folder) for entry in entries]
        replies = self.judge.ask(requests)
        if self.suite == "uge":
            return [uge_record(e["id"], reply) | {"instruction": e["instruction"]} for e, reply in zip(entries, replies)]
        return [
            basic_record(e["id"], rubric_type(e["edit_type"]), reply, req.fields) | {"instruction": e["instruction"], "source_type": e["edit_type"]}
            for e, req, reply in zip(entries, requests, replies)
        ]

    def _request(self, entry: dict[str, Any], folder: ResultsFolder) -> JudgeRequest:
        """The basic (rubric of the edit type) or UGE question about one edit: text, original, edit."""
        images = [folder.load_image(folder.companion(entry["id"], "SRCIMG")), folder.load_image(folder.edited(entry["id"]))]
        if self.suite == "uge":
            return JudgeRequest("imgedit_uge", [UGE_PROMPT.replace("<edit_prompt>", entry["instruction"]), *images], ("Score",), entry.get("truth"))
        if not self.reads_rubrics:
            return JudgeRequest("imgedit_basic", [entry["instruction"], *images], TOY_RUBRIC_FIELDS, entry.get("truth"))
        template = self.rubrics()[rubric_type(entry["edit_type"])]
        text = template.replace("<edit_prompt>", entry["instruction"])
        return JudgeRequest("imgedit_basic", [text, *images], rubric_fields(template), entry.get("truth"))

    def _judge_turns(self, entries: list[dict[str, Any]], folder: ResultsFolder) -> list[dict[str, Any]]:
        """Every turn of every case asked in one batch (the judge runs them concurrently)."""
        assert self.judge is not None
        requests = [turn_requests(entry, folder) for entry in entries]
        replies = iter(self.judge.ask([r for case in requests for r in case]))
        return [
            multiturn_case(e["id"], [multiturn_record(e["id"], turn, next(replies)) for turn in range(1, len(case) + 1)])
            for e, case in zip(entries, requests)
        ]

    def _rated_turns(self, entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Each case's turn records from the human-ratings file; a turn it lacks is marked ``retry``."""
        assert self.human_ratings is not None
        if Path(self.human_ratings).is_file():
            ratings = {(r["id"], r["turn"]): r for r in read_human_ratings(self.human_ratings)}
        else:
            log.warning("human ratings file %s does not exist yet: every turn is counted as not rated", self.human_ratings)
            ratings = {}
        unrated = {"verdicts": None, "error": f"not rated in {self.human_ratings} yet", "raw": None, "retry": True}
        return [
            [ratings.get((e["id"], turn)) or {"id": e["id"], "turn": turn, **unrated} for turn in range(1, len(e["turns"]) + 1)]
            for e in entries
        ]

    # -- tables --

    def summarize(self, records: list[dict[str, Any]], folder: ResultsFolder) -> dict[str, float]:
        if self.suite == "multiturn":
            return self._summarize_multiturn(records, folder)
        if self.suite == "uge":
            return self._summarize_uge(records, folder)
        headline = aggregate_basic(records, self.apply_cap, self.official)
        parser = PARSERS[basic_parser(self.apply_cap, self.official)]
        title = f"ImgEdit-Bench basic (1-5, higher is better; headline: {parser}; judge: {self.rater})"
        folder.write_table("basic", basic_table(records, self.label, self.apply_cap, self.official), title=title)
        folder.write_json("summary", {
            "headline": headline,
            "as_judged": aggregate_basic(records),
            "capped": aggregate_basic(records, apply_cap=True),
            "official": aggregate_basic(records, official=True),
            "flags": {"apply_cap": self.apply_cap, "official": self.official},
            "headline_parser": parser,
            "overall_types": overall_coverage(headline),
        })
        if headline["overall"]["types"] < headline["overall"]["of"]:
            log.warning("ImgEdit-Bench overall is %s types: the others have no score", overall_coverage(headline))
        scalars = {f"{group}/score": values["score"] for group, values in headline.items()}
        return scalars | {"overall/types": headline["overall"]["types"], "failed": headline["overall"]["failed"]}

    def _summarize_uge(self, records: list[dict[str, Any]], folder: ResultsFolder) -> dict[str, float]:
        readings = {"ours": aggregate_uge(records), "official": aggregate_uge(records, official=True)}
        parsers = {"ours": "our parser (Score: line)", "official": PARSERS["official"].replace("step-1/2", "step-1")}
        order = ["official", "ours"] if self.official else ["ours", "official"]
        rows = [
            [self.label if n == order[0] else f"{self.label} ({parsers[n]})", readings[n]["score"],
             int(readings[n]["count"]), int(readings[n]["failed"]), parsers[n]]
            for n in order
        ]
        title = f"ImgEdit-Bench UGE (1-5; headline: {parsers[order[0]]}; judge: {self.rater})"
        folder.write_table("uge", (["", "UGE score", "samples", "failed", "parser"], rows), title=title)
        headline = readings[order[0]]
        folder.write_json("summary", {"headline": headline, **readings, "headline_parser": parsers[order[0]]})
        return {"score": headline["score"], "failed": headline["failed"]}

    def _summarize_multiturn(self, records: list[dict[str, Any]], folder: ResultsFolder) -> dict[str, float]:
        turns = [turn for record in records for turn in record["turns"]]
        per_turn = aggregate_multiturn(turns)
        title = f"ImgEdit-Bench multi-turn, {self.label}: share of yes per turn ({self.rater})"
        folder.write_table("multiturn", multiturn_table(turns), title=title)
        folder.write_json("summary", {"turns": {str(t): v for t, v in per_turn.items()}, "rated_by": self.rater})
        scalars = {f"turn{t}/{c.lower().replace(' ', '_')}": v[c] for t, v in per_turn.items() for c in MULTITURN_CRITERIA}
        return scalars | {"failed": sum(v["failed"] for v in per_turn.values())}
