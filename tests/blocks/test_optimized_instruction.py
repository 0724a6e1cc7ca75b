"""MIND-Edit's optimized-instruction format: render/parse round trip, the paper's example, broken replies."""

from __future__ import annotations

import pytest

from zoo.blocks.optimized_instruction import OptimizedInstruction, OptimizedInstructionError, annotation_prompt, parse


def test_render_parse_round_trip() -> None:
    value = OptimizedInstruction("blue circle at the top left, grass background", "red square, blurry, extra objects")
    assert parse(value.render()) == value


def test_parses_the_papers_example_layout() -> None:
    reply = (
        'optimized_prompt:\n\n"Man\'s right arm raised sideways at 45°, wrist bent, palm open." '
        'negative_prompt: "lowered arms, static posture, extra limbs, blurry"'
    )
    parsed = parse(reply)
    assert parsed.optimized_prompt == "Man's right arm raised sideways at 45°, wrist bent, palm open"
    assert parsed.negative_prompt == "lowered arms, static posture, extra limbs, blurry"
    bracketed = parse('<optimized_prompt:"a red hat" negative_prompt:"blue hat, artefacts">')
    assert bracketed == OptimizedInstruction("a red hat", "blue hat, artefacts")
    assert parse('Optimized_Prompt = “a red hat”; Negative_Prompt = “no hat”') == OptimizedInstruction("a red hat", "no hat")


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("Sure! Here is a better prompt: a red hat", "found no labels"),
        ('optimized_prompt: "a red hat"', "found optimized_prompt in"),
        ('negative_prompt: "x" optimized_prompt: "a red hat"', "found negative_prompt, optimized_prompt"),
        ('optimized_prompt: "a" optimized_prompt: "b" negative_prompt: "c"', "optimized_prompt, optimized_prompt"),
        ('optimized_prompt: "" negative_prompt: "c"', "optimized_prompt of"),
        ('optimized_prompt: "a red hat" negative_prompt: ""', "negative_prompt of"),
    ],
)
def test_broken_replies_raise_with_the_reason(reply: str, reason: str) -> None:
    with pytest.raises(OptimizedInstructionError, match=reason):
        parse(reply)


def test_annotation_prompt_holds_the_instruction_and_both_labels() -> None:
    prompt = annotation_prompt("  make the man wave  ")
    assert prompt.endswith("The editing instruction is: make the man wave")
    assert "optimized_prompt:" in prompt and "negative_prompt:" in prompt
    with pytest.raises(ValueError, match="empty"):
        annotation_prompt("   ")
