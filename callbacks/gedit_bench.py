"""GEdit-Bench (Step1X-Edit paper §5; VIEScore-style scoring): judging, parsing and aggregation.

Facts from the official scorer (``stepfun-ai/Step1X-Edit@570eba6:GEdit-Bench/``:
``test_gedit_score.py``, ``viescore/__init__.py``, ``calculate_statistics.py``): per sample the
judge is asked twice. Semantic consistency (SC) gets the source and edited images and answers two
0-10 scores (editing success, over-editing); perceptual quality (PQ) gets the edited image only and
answers two (naturalness, artifacts). ``SC = min``, ``PQ = min``, ``O = sqrt(SC * PQ)`` per sample;
per group the means of the three, over all cases and over the "intersection" subset
(``Intersection_exist``); overall = unweighted mean over the 11 groups. Case ids are
``(task_type, key)``: two keys repeat across groups. An overall over fewer groups (some absent or
all failed) is marked ``partial: k of 11`` in every table and in ``summary.json``
(``overall_groups``), logged with the scalar ``overall/groups`` = k, and warned about; a task type
that is not a GEdit group gets its own column and stays out of the overall.

The official parser (``viescore/utils.py:154-187``, ``mllm_output_to_dict``) guesses
``random.randint(0, 10)`` for a score it cannot read (and for failed calls, whose reply is empty).
Here such a sample is recorded as a failure with its raw reply and left out of the means (counted
in ``failed``; a failed call is marked ``retry`` and asked again by the next run);
``official_random_guess=True`` restores the guess (seeded) to reproduce the official behaviour.
A reply whose JSON is broken is read from a bare ``[a, b]`` only when it holds exactly one number
list outside its ``reasoning`` (the official parser takes the first one anywhere, which can be a
pair quoted in the reasoning); otherwise it is a failure.

The SC/PQ prompts below follow VIEScore's structure (task context, rules, JSON answer
``{"score": [...], "reasoning": "..."}``) in our own words; they are not the official text.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import defaultdict
from typing import Any

from callbacks.judges import Judge, JudgeRequest
from callbacks.results import BenchmarkEvaluator, ResultsFolder, Table, coverage
from datamodules.formats.gedit import GROUPS
from zoo.blocks.chat import ChatError

log = logging.getLogger(__name__)

SC_PROMPT = """You evaluate an AI image edit. The first image is the original, the second is the edited result.
Editing instruction: <instruction>
Give two scores from 0 to 10:
- editing success: 0 = the instruction was not followed at all, 10 = it was followed perfectly;
- over-editing: 0 = the edited image no longer resembles the original, 10 = nothing beyond the instruction changed.
Reply with JSON only: {"score": [editing success, over-editing], "reasoning": "<one sentence>"}"""

PQ_PROMPT = """You evaluate the perceptual quality of an AI-generated image (shown below).
Give two scores from 0 to 10:
- naturalness: 0 = the scene looks impossible or unnatural, 10 = it looks like a real photograph or artwork;
- artifacts: 0 = heavy distortion, blur, broken parts or watermarks, 10 = no artifacts at all.
Reply with JSON only: {"score": [naturalness, artifacts], "reasoning": "<one sentence>"}"""

_DELIMITER = "||V^=^V||"
_LIST = re.compile(r"\[\s*(-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)*)\s*\]")
_REASONING_KEY = re.compile(r"""["']?reasoning["']?\s*:""", re.IGNORECASE)
_SCORE_KEY = re.compile(r"""["']?score["']?\s*:""", re.IGNORECASE)


def _outside_reasoning(body: str) -> str:
    """``body`` without the value of a ``reasoning`` key (up to a ``score`` key after it, else to the
    end), so a number pair quoted in the reasoning is not taken for the scores."""
    reasoning = _REASONING_KEY.search(body)
    if reasoning is None:
        return body
    score = _SCORE_KEY.search(body, reasoning.end())
    return body[: reasoning.start()] + (body[score.start() :] if score is not None else "")


def _bare_list(body: str) -> list[float] | str:
    """The one number list of a reply whose JSON is broken, or why there is not exactly one: with
    two candidates (say one in the scores, one in the text) which holds the scores is a guess."""
    candidates = _LIST.findall(_outside_reasoning(body))
    if not candidates:
        return "no score list in the reply"
    if len(candidates) > 1:
        return f"the reply's JSON is broken and it holds {len(candidates)} number lists; which are the scores is ambiguous"
    return [float(v) for v in candidates[0].split(",")]


def parse_vie(text: str, count: int = 2) -> list[float] | str:
    """The ``score`` list of a VIEScore reply (``||V^=^V||`` delimiters, JSON with single quotes or
    trailing commas, or a bare ``[a, b]``), each in [0, 10]; or the reason it cannot be read.

    The bare-list fallback (JSON broken) counts only when the reply holds exactly one number list
    outside its ``reasoning``; otherwise the reply is a failure rather than a guess."""
    body = text.split(_DELIMITER)[1] if text.count(_DELIMITER) >= 2 else text
    scores: list[Any] | None = None
    start, end = body.find("{"), body.rfind("}")
    if 0 <= start < end:
        chunk = body[start : end + 1]
        for candidate in (chunk, re.sub(r",\s*([}\]])", r"\1", chunk.replace("'", '"'))):
            try:
                data = json.loads(candidate)
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("score"), list):
                scores = data["score"]
                break
    if scores is None:
        bare = _bare_list(body)
        if isinstance(bare, str):
            return bare
        scores = bare
    if len(scores) != count or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        return f"expected {count} numeric scores, got {scores!r}"
    if not all(0 <= s <= 10 for s in scores):
        return f"scores {scores} are outside [0, 10]"
    return [float(s) for s in scores]


def gedit_record(
    case: dict[str, Any],
    sc_reply: str | ChatError,
    pq_reply: str | ChatError,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """One sample: SC/PQ score lists, SC, PQ, O; ``error`` when a part failed. With ``rng`` (the
    official compatibility mode) an unreadable part gets ``rng.randint(0, 10)`` per score, flagged."""
    record: dict[str, Any] = {**case, "sc_scores": None, "pq_scores": None, "sc": None, "pq": None, "o": None, "error": None, "guessed": False}
    errors = []
    for part, reply in (("sc", sc_reply), ("pq", pq_reply)):
        record[f"raw_{part}"] = reply if isinstance(reply, str) else None
        parsed = parse_vie(reply) if isinstance(reply, str) else f"judge call failed: {reply}"
        if isinstance(parsed, str) and rng is not None:
            parsed, record["guessed"] = [float(rng.randint(0, 10)) for _ in range(2)], True
        if isinstance(parsed, str):
            errors.append(f"{part.upper()}: {parsed}")
        else:
            record[f"{part}_scores"] = parsed
    if errors:
        # A failed call (not an unreadable reply) is asked again by the next run.
        return record | {"error": "; ".join(errors), "retry": any(isinstance(r, ChatError) for r in (sc_reply, pq_reply))}
    record["sc"], record["pq"] = min(record["sc_scores"]), min(record["pq_scores"])
    record["o"] = math.sqrt(record["sc"] * record["pq"])
    return record


def aggregate_gedit(records: list[dict[str, Any]], intersection: bool = False) -> dict[str, dict[str, float]]:
    """Per-group means of SC, PQ, O with ``count``/``failed``; ``overall`` = unweighted mean over the
    GEdit groups with a score, ``groups`` of them out of the suite's ``of`` (11); see :func:`overall_coverage`.
    Task types outside :data:`GROUPS` come after them, out of the overall."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if not intersection or record["intersection"]:
            groups[record["task_type"]].append(record)
    table: dict[str, dict[str, float]] = {}
    for group in [g for g in GROUPS if g in groups] + sorted(set(groups) - set(GROUPS)):
        scored = [r for r in groups[group] if r["error"] is None]
        table[group] = {m: (sum(r[m] for r in scored) / len(scored) if scored else math.nan) for m in ("sc", "pq", "o")}
        table[group] |= {"count": float(len(scored)), "failed": float(len(groups[group]) - len(scored))}
    present = [v for g, v in table.items() if g in GROUPS and v["count"]]
    overall = {m: (sum(v[m] for v in present) / len(present) if present else math.nan) for m in ("sc", "pq", "o")}
    overall |= {"count": sum(v["count"] for v in table.values()), "failed": sum(v["failed"] for v in table.values())}
    table["overall"] = overall | {"groups": float(len(present)), "of": float(len(GROUPS))}
    return table


def overall_coverage(aggregate: dict[str, dict[str, float]]) -> str:
    """``11 of 11``, or ``partial: k of 11`` when the overall of ``aggregate`` misses groups."""
    return coverage(int(aggregate["overall"]["groups"]), int(aggregate["overall"]["of"]))


def gedit_table(records: list[dict[str, Any]], label: str) -> Table:
    """Step1X-Edit layout: rows per subset and metric (G_SC, G_PQ, G_O), columns = groups + overall
    + the groups the overall averages (``partial: k of 11`` when some have no score)."""
    rows: list[list[Any]] = []
    columns: list[str] = []
    for subset, flag in (("full", False), ("intersection", True)):
        agg = aggregate_gedit(records, flag)
        columns = columns or [g for g in agg if g != "overall"] + ["overall"]
        for metric in ("sc", "pq", "o"):
            row = [f"{label} {subset} G_{metric.upper()}", *(agg.get(c, {}).get(metric, math.nan) for c in columns)]
            rows.append([*row, overall_coverage(agg)])
        rows.append([f"{subset} samples", *(int(agg.get(c, {}).get("count", 0)) for c in columns), ""])
        rows.append([f"{subset} failed", *(int(agg.get(c, {}).get("failed", 0)) for c in columns), ""])
    return ["", *columns, "Overall groups"], rows


class GEditEvaluator(BenchmarkEvaluator):
    """Judges edits with the GEdit-Bench protocol (SC with both images, PQ with the edit) and writes the results folder.

    Args:
        judge: HTTP/local judge (GEdit's scorer uses GPT-4.1 or Qwen2.5-VL-72B) or the toy judge.
        official_random_guess: replace unreadable scores by a seeded random 0-10 guess, as the official scorer.
        seed: seed of those guesses.
        label: the model's name in the tables.
        output_dir: results folder (default ``<log_dir>/gedit``).
        on_validation: also evaluate during fit's validation runs.
    """

    name = "gedit"

    def __init__(
        self,
        judge: Judge,
        official_random_guess: bool = False,
        seed: int = 0,
        label: str = "model",
        output_dir: str | None = None,
        on_validation: bool = False,
    ) -> None:
        super().__init__(output_dir, on_validation)
        self.judge, self.official_random_guess, self.seed, self.label = judge, official_random_guess, seed, label

    @property
    def needs_truth(self) -> bool:
        return self.judge.needs_truth

    def preflight(self) -> None:
        self.judge.preflight()

    def score(self, entries: list[dict[str, Any]], folder: ResultsFolder) -> list[dict[str, Any]]:
        self.judge.set_default_cache(folder.root / "judge_cache")
        requests = []
        for entry in entries:
            source, edited = folder.load_image(folder.companion(entry["id"], "SRCIMG")), folder.load_image(folder.edited(entry["id"]))
            if edited is not None and source is not None and edited.size != source.size:
                edited = edited.resize(source.size)  # the official scorer judges the edit at the source's size
            truth = entry.get("truth")
            requests.append(JudgeRequest("gedit_sc", [SC_PROMPT.replace("<instruction>", entry["instruction"]), source, edited], truth=truth))
            requests.append(JudgeRequest("gedit_pq", [PQ_PROMPT, edited], truth=truth))
        replies = self.judge.ask(requests)
        rng = random.Random(self.seed) if self.official_random_guess else None
        records = []
        for i, entry in enumerate(entries):
            case = entry.get("case") or {"task_type": entry["edit_type"], "intersection": False, "language": "en"}
            meta = {"id": entry["id"], "task_type": case["task_type"], "intersection": bool(case["intersection"]),
                    "language": case.get("language", "en"), "instruction": entry["instruction"]}
            records.append(gedit_record(meta, replies[2 * i], replies[2 * i + 1], rng))
        return records

    @property
    def parser(self) -> str:
        """Which reading of the replies the table holds (its title and ``summary.json`` say so)."""
        if self.official_random_guess:
            return "official viescore parser (an unreadable score is a seeded random guess)"
        return "our parser (an unreadable score is a counted failure)"

    def summarize(self, records: list[dict[str, Any]], folder: ResultsFolder) -> dict[str, float]:
        title = f"GEdit-Bench (0-10, higher is better; parser: {self.parser}; judge: {self.judge.name})"
        folder.write_table("gedit", gedit_table(records, self.label), title=title)
        full, inter = aggregate_gedit(records), aggregate_gedit(records, intersection=True)
        groups = {"full": overall_coverage(full), "intersection": overall_coverage(inter)}
        flags = {"official_random_guess": self.official_random_guess}
        folder.write_json("summary", {"full": full, "intersection": inter, "overall_groups": groups, "flags": flags, "parser": self.parser})
        if full["overall"]["groups"] < full["overall"]["of"]:
            log.warning("GEdit-Bench overall is %s groups: the others have no score", groups["full"])
        scalars = {f"full/{m}": full["overall"][m] for m in ("sc", "pq", "o")} | {f"intersection/{m}": inter["overall"][m] for m in ("sc", "pq", "o")}
        return scalars | {"overall/groups": full["overall"]["groups"], "failed": full["overall"]["failed"]}
