"""MIND-Edit's optimized instruction: the reply format, its parser and the annotation prompt.

MIND-Edit (paper §3.2 and appendix C) fine-tunes its MLLM to rewrite a user's instruction into a
fixed two-part reply, ``optimized_prompt`` (5-10 concise phrases about the edit and its context)
and ``negative_prompt`` (what must not appear, plus common artefacts); the training targets were
written by GPT-4o from the appendix-C prompt. The diffusion model then takes the first part as its
prompt and the second as its negative prompt.

:func:`render` writes the reply the MLLM is trained to produce; :func:`parse` reads one back
(the model's own, or an annotator's) and raises :class:`OptimizedInstructionError` on a broken
reply, so callers count it instead of silently conditioning on garbage. No parser of this format
is published (MIND-Edit released no code), hence this one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPTIMIZED_LABEL = "optimized_prompt"
NEGATIVE_LABEL = "negative_prompt"

_LABEL = re.compile(rf"(?P<label>{OPTIMIZED_LABEL}|{NEGATIVE_LABEL})\s*[:=]", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_EDGE = _QUOTES + "<>[]{}();,. \t\r\n"

ANNOTATION_PROMPT = """You rewrite image-editing instructions into prompts that a diffusion model can follow exactly.
You are given the original image and the user's editing instruction.

Rules:
1. Edit details: read the instruction together with the image to work out what the user wants, then
   state it concretely: what is added, removed or changed, and its key visual attributes (position,
   pose, colour, size, material, expression, clothing, surroundings), and how the edited region must
   look afterwards so that it blends with the rest of the image.
2. Grounding: tie the description to what this image shows (lighting direction, ground, layout).
3. Brevity: keep the nouns and verbs that matter; drop filler words. Keep it short.

Reply with exactly two fields and nothing else:
optimized_prompt: "<5 to 10 short English phrases describing the edit and how it fits the scene>"
negative_prompt: "<3 to 6 short English terms for what must not appear (the replaced content, conflicting
things), then 3 to 6 terms for common artefacts such as malformed hands or mismatched shadows>"

Do not add details the user did not ask for; check everything against the image.

The editing instruction is: {instruction}"""
"""The annotator's prompt (appendix C's structure, in our own words); ``{instruction}`` is the raw instruction."""


REWRITE_REQUEST = "Optimize this image-editing instruction for the diffusion model: {instruction}"
"""What MIND-Edit's MLLM reads beside the source image, in training and inference alike (the paper
gives its inputs, I_src and T_raw, not a template); its reply is the optimized instruction."""


def rewrite_request(instruction: str) -> str:
    """The MLLM's user text for one raw ``instruction``."""
    return REWRITE_REQUEST.format(instruction=instruction.strip())


class OptimizedInstructionError(ValueError):
    """A reply that is not in the ``optimized_prompt: ... negative_prompt: ...`` format."""


@dataclass(frozen=True)
class OptimizedInstruction:
    """The two parts of an optimized instruction."""

    optimized_prompt: str
    """The diffusion model's prompt."""
    negative_prompt: str
    """The diffusion model's negative prompt."""

    def render(self) -> str:
        """The reply text the MLLM is trained to write (and :func:`parse` reads back)."""
        return f'{OPTIMIZED_LABEL}: "{self.optimized_prompt}" {NEGATIVE_LABEL}: "{self.negative_prompt}"'


def annotation_prompt(instruction: str) -> str:
    """The annotator's prompt for one raw ``instruction``."""
    if not instruction.strip():
        raise ValueError("the instruction to optimise is empty")
    return ANNOTATION_PROMPT.format(instruction=instruction.strip())


def _clean(value: str) -> str:
    return " ".join(value.strip(_EDGE).split())


def parse(reply: str) -> OptimizedInstruction:
    """The two parts of ``reply``: each label once, ``optimized_prompt`` first, both non-empty.

    Quotes, angle brackets and the separators of the paper's example (``<optimized_prompt:""
    negative_prompt:"">``) are stripped; whitespace inside a part is collapsed.

    Raises:
        OptimizedInstructionError: naming what is wrong (a label missing, repeated or out of
            order, or an empty part).
    """
    labels = list(_LABEL.finditer(reply))
    names = [m.group("label").lower() for m in labels]
    if names != [OPTIMIZED_LABEL, NEGATIVE_LABEL]:
        found = ", ".join(names) or "no labels"
        raise OptimizedInstructionError(
            f"expected '{OPTIMIZED_LABEL}:' then '{NEGATIVE_LABEL}:' once each, found {found} in {reply[:120]!r}"
        )
    optimized = _clean(reply[labels[0].end() : labels[1].start()])
    negative = _clean(reply[labels[1].end() :])
    if not optimized:
        raise OptimizedInstructionError(f"the {OPTIMIZED_LABEL} of {reply[:120]!r} is empty")
    if not negative:
        raise OptimizedInstructionError(f"the {NEGATIVE_LABEL} of {reply[:120]!r} is empty")
    return OptimizedInstruction(optimized, negative)
