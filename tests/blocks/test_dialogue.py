from __future__ import annotations

import pytest

from zoo.blocks.dialogue import backtrack, render_dialogue, source_version


@pytest.mark.parametrize(
    "instruction,turn,version",
    [
        ("Make it blue.", 2, 1),
        ("Make it blue.", 1, 0),
        ("Go back to the original image and add a red circle.", 3, 0),
        ("Go back to the result of turn 1 and remove the square.", 3, 1),
        ("Starting from the image after turn 2, add a cat.", 4, 2),
        ("Use turn one's result and make the sky red.", 3, 1),
        ("Undo turn 2 and paint the square green.", 3, 1),
        ("Take version 0 and add snow.", 2, 0),
    ],
)
def test_source_version_reads_backtracking(instruction: str, turn: int, version: int) -> None:
    assert source_version(instruction, turn) == version


def test_source_version_refuses_a_version_that_does_not_exist_yet() -> None:
    with pytest.raises(ValueError, match="only versions 0 .* to 1 exist"):
        source_version("Go back to the result of turn 3 and add a cat.", 2)
    with pytest.raises(ValueError, match="numbered from 1"):
        source_version("add a cat", 0)


def test_backtrack_round_trips_through_source_version() -> None:
    for version in range(3):
        text = backtrack(version, "Add a blue square at the top.")
        assert text.endswith("and add a blue square at the top.")
        assert source_version(text, 3) == version


def test_render_dialogue_numbers_the_turns() -> None:
    assert render_dialogue([], "Add a cat.") == "Add a cat."
    assert render_dialogue(["Add a cat.", "Make it black."], "Move it left.") == (
        "Turn 1: Add a cat.\nTurn 2: Make it black.\nTurn 3 (now): Move it left."
    )
