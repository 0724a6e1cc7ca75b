"""Multi-turn editing dialogues: how a turn sees the earlier turns, and which version it edits.

ImgEdit (paper §3.1) names three multi-turn behaviours: *content memory* (a constraint stated in
turn 1 still holds later), *content understanding* (a later turn refers back, "make it blue"), and
*version backtracking* (a turn edits an earlier version, named by its turn). No released model code
shows how a model consumes a dialogue, so the zoo's choices are:

- **History as text.** A later turn's condition text is the numbered dialogue
  (:func:`render_dialogue`): every earlier instruction, then the current one, in one user turn with
  the image being edited. The condition span of :class:`~zoo.blocks.mllm.VLMEncoder` covers the
  whole user turn, so the earlier instructions (constraints, referents of pronouns) reach the
  denoiser as tokens, not only through attention.
- **Versions by turn number.** Version 0 is the original image, version ``k`` the result of turn
  ``k``. A turn edits the latest version unless its instruction names another
  (:func:`source_version`): "go back to the original image", "go back to the result of turn 2",
  "starting from the image after turn 1", "undo turn 2" (= edit version 1). Training data gives the
  version explicitly (ImgEdit's multi-turn parquet names each turn's input image); only inference
  reads it from the words, so the same rule serves the benchmark, the toy dialogues and users.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5}
_NUMBER = r"(\d+|" + "|".join(_NUMBER_WORDS) + r")"
_ORIGINAL = re.compile(r"\b(original|initial|first|starting|unedited|source)\s+(image|picture|photo|version)\b", re.IGNORECASE)
_AFTER_TURN = re.compile(
    r"\b(?:result|image|picture|photo|version|output|edit)\s+(?:of|from|after)\s+(?:turn|step|round)\s+" + _NUMBER + r"\b"
    r"|\b(?:turn|step|round)\s+" + _NUMBER + r"(?:'s)?\s+(?:result|image|picture|photo|version|output)\b"
    r"|\bversion\s+" + _NUMBER + r"\b"
    r"|\bafter\s+(?:turn|step|round)\s+" + _NUMBER + r"\b",
    re.IGNORECASE,
)
_UNDO_TURN = re.compile(r"\b(?:undo|revert|discard)\s+(?:the\s+(?:edit|change)\s+of\s+)?(?:turn|step|round)\s+" + _NUMBER + r"\b", re.IGNORECASE)


def _number(text: str) -> int:
    return int(text) if text.isdigit() else _NUMBER_WORDS[text.lower()]


def source_version(instruction: str, turn: int) -> int:
    """Which version turn ``turn`` (1-based) edits: ``turn - 1`` (the latest) unless the instruction
    names an earlier one. A named version must lie before this turn, else ``ValueError``."""
    if turn < 1:
        raise ValueError(f"turns are numbered from 1, got {turn}")
    version = turn - 1
    if (undo := _UNDO_TURN.search(instruction)) is not None:
        version = _number(undo.group(1)) - 1
    elif (named := _AFTER_TURN.search(instruction)) is not None:
        version = _number(next(group for group in named.groups() if group))
    elif _ORIGINAL.search(instruction) is not None:
        version = 0
    if not 0 <= version < turn:
        raise ValueError(
            f"turn {turn} ({instruction!r}) names version {version}, but only versions 0 (the original) to {turn - 1} exist"
        )
    return version


def render_dialogue(history: Sequence[str], instruction: str) -> str:
    """The condition text of a turn: the instruction alone for a first turn, else the numbered dialogue
    ``"Turn 1: …\\nTurn 2: …\\nTurn 3 (now): …"``."""
    if not history:
        return instruction
    lines = [f"Turn {k}: {text}" for k, text in enumerate(history, start=1)]
    return "\n".join([*lines, f"Turn {len(history) + 1} (now): {instruction}"])


def backtrack(version: int, instruction: str) -> str:
    """An instruction that edits ``version`` (0 = the original) instead of the latest result, in the
    phrasing :func:`source_version` reads: "Go back to the result of turn 1 and make ..."."""
    if version < 0:
        raise ValueError(f"versions are numbered from 0 (the original), got {version}")
    where = "the original image" if version == 0 else f"the result of turn {version}"
    return f"Go back to {where} and {instruction[:1].lower()}{instruction[1:]}"
