"""DIM's external designer: a VLM that turns an edit instruction into a five-section blueprint.

Draw-In-Mind does not feed the raw instruction to its MLLM: DIM-Edit's training prompts are
chain-of-thought "imaginations" written by GPT-4o (paper §3.1.2), and at inference an external
designer (GPT-4o, or Qwen2.5-VL-3B/7B in §4.2) looks at the source image and writes a blueprint
"in the same format as DIM-Edit" (§3.2): five numbered sections whose text replaces the prompt.

- :data:`SECTIONS`: the five section names, in order (the official designer prompt,
  ``showlab/DIM@28e644f:models/modeling_dim.py:813-817``).
- :data:`BLUEPRINT_PROMPT`: our wording of the request; the image goes first, then this text.
- :func:`clean_reply`: drops ``<think>`` reasoning and keeps an ``<answer>`` block (the official
  code does this for InternVL/MiMo and GLM-4.1V respectively; we do it for every designer).
- :func:`parse_blueprint` / :func:`format_blueprint`: tolerant reading of the sections and the
  canonical ``"1. Edit Instruction: ..."`` text the toy data generator writes as well.
- :class:`Designer`: the above on top of any :class:`~zoo.blocks.chat.ChatClient`, built from a
  recipe through :class:`DesignerConfig` (a :class:`~zoo.blocks.chat.ChatConfig` plus the prompt).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from zoo.blocks.chat import ChatClient, ChatConfig, ChatError, ChatImage, ChatPart, build_chat_client
from zoo.blocks.config import ConfigError
from zoo.blocks.progress import summary_line

log = logging.getLogger(__name__)

SECTIONS = (
    "Edit Instruction",
    "Global Layout Perception",
    "Local Object Perception",
    "Edit Area Localization",
    "Edited Image Imagination",
)

BLUEPRINT_PROMPT = """\
You are the planner for an image-editing model. Study the image and the requested edit, then \
write a blueprint of the edit in exactly five numbered sections, in this order:

1. Edit Instruction: the requested edit restated as one precise, unambiguous sentence.
2. Global Layout Perception: the whole scene - setting, the main objects and where they sit in \
the frame, lighting, colours and style.
3. Local Object Perception: the objects the edit changes or depends on - their appearance, \
colour, material, size, pose and position.
4. Edit Area Localization: exactly which region of the image changes and what must stay as it is.
5. Edited Image Imagination: the complete image after the edit, described as it should look.

Write every section on its own line as "<number>. <section name>: <text>". Write nothing before \
the first section and nothing after the last.

The edit to plan: {instruction}"""


class BlueprintError(ValueError):
    """A designer reply lacks some of the five sections; the caller may fall back to the raw
    instruction (and should count how often it does).

    Attributes:
        missing: the section names that are absent or empty, in canonical order.
        reply: the designer's text that was parsed.
    """

    def __init__(self, missing: tuple[str, ...], reply: str) -> None:
        preview = reply.strip()[:200].replace("\n", " ")
        super().__init__(
            f"designer blueprint lacks section(s) {', '.join(missing)} (needs all of: {', '.join(SECTIONS)}); "
            f"reply starts: {preview!r}"
        )
        self.missing = missing
        self.reply = reply


def _name_pattern(name: str) -> str:
    words = [re.escape(word) for word in name.split()]
    return r"\s+".join(words).replace("Localization", "Locali[sz]ation")


_BOLD = r"(?:\*\*|__)?"
# One section header at the start of a line, in the variants designers produce: "1. Name:",
# "**1. Name:**", "**Name**:", "### 1) Name" (body on the next lines), "- Name - text", "Step 1: Name:".
_HEADER = re.compile(
    rf"^[ \t]*(?:\#{{1,6}}[ \t]*)?(?:[-*•][ \t]+)?{_BOLD}[ \t]*"
    rf"(?:(?:step[ \t]*)?\d+[ \t]*[.):][ \t]*)?{_BOLD}[ \t]*"
    rf"(?:{'|'.join(f'(?P<s{i}>{_name_pattern(name)})' for i, name in enumerate(SECTIONS))})"
    rf"[ \t]*{_BOLD}[ \t]*(?:[:：]|[-–—](?=[ \t])|$)[ \t]*{_BOLD}",
    re.IGNORECASE | re.MULTILINE,
)
_TRAILING_RULE = re.compile(r"(?:\n[ \t]*(?:-{3,}|\*{3,}|_{3,})[ \t]*)+$")
_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)


def clean_reply(text: str) -> str:
    """Strip ``<think>…</think>`` reasoning and return the ``<answer>…</answer>`` body if any."""
    text = _THINK.sub("", text)
    # Chat templates that open the think block themselves leave only its closing tag in the reply.
    if re.search(r"</think>", text, re.IGNORECASE):
        text = re.split(r"</think>", text, flags=re.IGNORECASE)[-1]
    # An unclosed <think> means the reply was cut off while reasoning: nothing after it is an answer.
    text = re.split(r"<think>", text, flags=re.IGNORECASE)[0]
    answer = _ANSWER.search(text)
    return (answer.group(1) if answer else text).strip()


def parse_blueprint(text: str) -> dict[str, str]:
    """Map each of the five section names to its text, in canonical order.

    Tolerates markdown headers, bold, bullets, ``1.``/``1)``/``Step 1:`` numbering, any numbers
    and a body starting on the next line; text before the first section is ignored. When a
    section name appears twice the first one wins (a later one, e.g. an echoed instruction,
    only ends the section before it).

    Raises:
        BlueprintError: naming the sections that are missing or empty.
    """
    headers = list(_HEADER.finditer(text))
    sections: dict[str, str] = {}
    for header, following in zip(headers, headers[1:] + [None]):
        index = next(i for i in range(len(SECTIONS)) if header.group(f"s{i}") is not None)
        body = text[header.end() : following.start() if following is not None else len(text)]
        body = _TRAILING_RULE.sub("", body.strip()).strip()
        if body and SECTIONS[index] not in sections:
            sections[SECTIONS[index]] = body
    missing = tuple(name for name in SECTIONS if name not in sections)
    if missing:
        raise BlueprintError(missing, text)
    return {name: sections[name] for name in SECTIONS}


def format_blueprint(sections: Mapping[str, str]) -> str:
    """The canonical blueprint text: ``"1. Edit Instruction: ...\\n2. Global Layout Perception: ..."``.

    Raises:
        ValueError: a key that is not a section name.
        BlueprintError: a section missing or empty.
    """
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown blueprint section(s) {unknown}; the sections are {list(SECTIONS)}")
    missing = tuple(name for name in SECTIONS if not sections.get(name, "").strip())
    if missing:
        raise BlueprintError(missing, "\n".join(f"{k}: {v}" for k, v in sections.items()))
    return "\n".join(f"{i}. {name}: {sections[name].strip()}" for i, name in enumerate(SECTIONS, start=1))


def _check_prompt(prompt: str) -> None:
    """Raise :class:`~zoo.blocks.config.ConfigError` unless ``prompt`` has the ``{instruction}`` slot."""
    if "{instruction}" not in prompt:
        raise ConfigError("the designer prompt must contain the placeholder {instruction}")


@dataclass
class DesignerConfig(ChatConfig):
    """The chat client of a :class:`Designer` and its prompt (``designer:`` in a DIM recipe).

    Defaults reproduce the paper's GPT-4o designer (``seed: 233``; ``temperature: 0``, ``timeout:
    60`` and JPEG images are :class:`~zoo.blocks.chat.ChatConfig`'s) once ``base_url`` and
    ``model`` (``gpt-4o-2024-11-20``) are given; ``kind: local`` runs an open VLM in-process.
    """

    seed: int | None = 233
    """Sampling seed; DIM's designer sends 233. Null sends none."""
    prompt: str = BLUEPRINT_PROMPT
    """Request text with an ``{instruction}`` placeholder (default :data:`BLUEPRINT_PROMPT`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_prompt(self.prompt)


class Designer:
    """DIM's designer over any chat client (a remote GPT-4o-style API or a local VLM).

    Args:
        client: the chat client that answers (see :func:`~zoo.blocks.chat.build_chat_client`).
        prompt: the request text; ``{instruction}`` is replaced by the edit instruction.

    Attributes:
        requests: blueprints asked for through :meth:`blueprint_or_instruction`.
        fallbacks: how many of those fell back to the raw instruction.
        seconds: time spent in those calls (:meth:`summary` reports the rate).
    """

    def __init__(self, client: ChatClient, prompt: str = BLUEPRINT_PROMPT) -> None:
        _check_prompt(prompt)
        self.client = client
        self.prompt = prompt
        self.requests = 0
        self.fallbacks = 0
        self.seconds = 0.0

    @classmethod
    def from_config(cls, config: DesignerConfig) -> Designer:
        """Build the client ``config`` describes and the designer on top of it."""
        return cls(build_chat_client(config), prompt=config.prompt)

    def blueprint(self, image: ChatImage | None, instruction: str) -> str:
        """The canonical five-section blueprint of editing ``image`` by ``instruction``.

        The image is sent before the text, as DIM does; ``None`` sends the text alone (a
        text-to-image prompt has no source to look at).

        Raises:
            BlueprintError: the reply lacks sections.
            zoo.blocks.chat.ChatError: the client call failed.
        """
        if not instruction.strip():
            raise ValueError("the edit instruction is empty; the designer needs something to plan")
        content: list[ChatPart] = [] if image is None else [image]
        content.append(self.prompt.replace("{instruction}", instruction.strip()))
        return format_blueprint(parse_blueprint(clean_reply(self.client.complete(content))))

    def blueprint_or_instruction(self, image: ChatImage | None, instruction: str) -> str:
        """:meth:`blueprint`, or ``instruction`` itself when the reply is incomplete or the call
        fails; each fallback is logged and counted in :attr:`fallbacks`.

        A rejected key, a forbidden call or an unknown model (HTTP 401/403/404) would fail every
        sample the same way, so those raise instead of degrading a whole run.
        """
        self.requests += 1
        start = time.perf_counter()
        try:
            return self.blueprint(image, instruction)
        except ChatError as err:
            if err.status in (401, 403, 404):
                raise
            reason = str(err)
        except BlueprintError as err:
            reason = str(err)
        finally:
            self.seconds += time.perf_counter() - start
        self.fallbacks += 1
        log.warning(
            "designer fell back to the raw instruction (%d of %d so far): %s", self.fallbacks, self.requests, reason
        )
        return instruction

    def summary(self) -> str:
        """``designer: 12 blueprints in 30.0 s (0.4/s), 1 fell back to the raw instruction``."""
        return summary_line("designer", self.requests, self.seconds, "blueprints") + f", {self.fallbacks} fell back to the raw instruction"
