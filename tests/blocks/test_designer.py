"""DIM's designer: blueprint parsing/formatting and the designer over remote and local chat clients."""

from __future__ import annotations

import logging

import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser
from PIL import Image

from tests.helpers.openai_server import OpenAIServer, completion, error
from zoo.blocks.chat import ChatConfig, ChatError, LocalVLMChatClient, OpenAIChatClient
from zoo.blocks.config import ConfigError
from zoo.blocks.designer import (
    BLUEPRINT_PROMPT,
    SECTIONS,
    BlueprintError,
    Designer,
    DesignerConfig,
    clean_reply,
    format_blueprint,
    parse_blueprint,
)

BODIES = {
    "Edit Instruction": "Remove the three lemons from the wooden table.",
    "Global Layout Perception": "A kitchen scene lit from the left window; a table fills the lower half.",
    "Local Object Perception": "Three yellow lemons sit in a cluster near the front edge of the table.",
    "Edit Area Localization": "The front-centre of the table where the lemons are; everything else stays.",
    "Edited Image Imagination": "The same kitchen with a bare table surface showing the wood grain.",
}
CANONICAL = "\n".join(f"{i}. {name}: {BODIES[name]}" for i, name in enumerate(SECTIONS, start=1))

BOLD = "Here is the blueprint.\n\n" + "\n\n".join(
    f"**{i}. {name}:** {BODIES[name]}" for i, name in enumerate(SECTIONS, start=1)
)
HEADERS = "\n".join(f"### {i}) **{name}**\n{BODIES[name]}\n\n---" for i, name in enumerate(SECTIONS, start=1))
BULLETS = "\n".join(f"- **{name}**: {BODIES[name]}" for name in SECTIONS)


def test_format_then_parse_round_trip() -> None:
    assert format_blueprint(BODIES) == CANONICAL
    assert parse_blueprint(CANONICAL) == BODIES
    assert list(parse_blueprint(CANONICAL)) == list(SECTIONS)


@pytest.mark.parametrize("text", [BOLD, HEADERS, BULLETS], ids=["bold", "headers", "bullets"])
def test_markdown_variants_parse_to_the_same_sections(text: str) -> None:
    assert parse_blueprint(text) == BODIES


def test_parse_keeps_multiline_bodies_and_first_of_duplicate_sections() -> None:
    text = CANONICAL.replace(BODIES["Global Layout Perception"], "Line one.\nLine two.")
    text += "\nEdit instruction: remove the lemons"  # an echoed instruction must not replace section 1
    sections = parse_blueprint(text)
    assert sections["Global Layout Perception"] == "Line one.\nLine two."
    assert sections["Edit Instruction"] == BODIES["Edit Instruction"]
    assert sections["Edited Image Imagination"] == BODIES["Edited Image Imagination"]


def test_section_names_inside_sentences_are_not_headers() -> None:
    text = CANONICAL.replace(BODIES["Local Object Perception"], "Edit area localization matters here too.")
    assert parse_blueprint(text)["Local Object Perception"] == "Edit area localization matters here too."


def test_missing_and_empty_sections_are_named() -> None:
    lines = CANONICAL.splitlines()
    text = "\n".join([lines[0], lines[1], "4. Edit Area Localization:   ", lines[4]])
    with pytest.raises(BlueprintError, match="Local Object Perception, Edit Area Localization") as info:
        parse_blueprint(text)
    assert info.value.missing == ("Local Object Perception", "Edit Area Localization")
    with pytest.raises(BlueprintError) as info:
        parse_blueprint("I cannot help with that.")
    assert info.value.missing == SECTIONS


def test_format_rejects_unknown_or_missing_sections() -> None:
    with pytest.raises(ValueError, match="unknown blueprint section"):
        format_blueprint({**BODIES, "Mood": "calm"})
    with pytest.raises(BlueprintError, match="Edited Image Imagination"):
        format_blueprint({k: v for k, v in BODIES.items() if k != "Edited Image Imagination"})


def test_clean_reply_strips_thinking_and_extracts_answers() -> None:
    assert clean_reply(f"<think>The lemons are on the left.</think>\n{CANONICAL}") == CANONICAL
    assert clean_reply(f"<THINK>a\nb</THINK><answer>\n{CANONICAL}\n</answer> trailing") == CANONICAL
    assert clean_reply(f"reasoning the template opened</think>{CANONICAL}") == CANONICAL
    assert clean_reply(f"<answer>{CANONICAL}") == CANONICAL  # answer cut off before its closing tag
    assert clean_reply("<think>ran out of tokens while reasoning") == ""


def remote_designer(server: OpenAIServer) -> Designer:
    config = DesignerConfig(base_url=server.base_url, model="gpt-4o-2024-11-20", api_key_env=None)
    return Designer.from_config(config)


@pytest.mark.parametrize(
    "reply",
    [CANONICAL, BOLD, f"<think>Look at the table first.</think>\n{BOLD}", f"<answer>{HEADERS}</answer>"],
    ids=["canonical", "bold", "think", "answer"],
)
def test_designer_returns_the_canonical_blueprint(reply: str) -> None:
    image = Image.new("RGB", (40, 30), (200, 180, 20))
    with OpenAIServer(completion(reply)) as server:
        assert remote_designer(server).blueprint(image, "  remove the lemons ") == CANONICAL
    (request,) = server.requests
    assert (request.body["seed"], request.body["temperature"]) == (233, 0.0)  # DIM's GPT-4o settings
    (message,) = request.body["messages"]
    image_part, text_part = message["content"]
    assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert text_part["text"] == BLUEPRINT_PROMPT.replace("{instruction}", "remove the lemons")
    assert text_part["text"].endswith("The edit to plan: remove the lemons")


def test_designer_raises_on_an_incomplete_blueprint() -> None:
    partial = "\n".join(CANONICAL.splitlines()[:3])
    with OpenAIServer(completion(partial)) as server:
        with pytest.raises(BlueprintError, match="Edit Area Localization, Edited Image Imagination"):
            remote_designer(server).blueprint(Image.new("RGB", (8, 8)), "remove the lemons")


def test_blueprint_or_instruction_counts_fallbacks() -> None:
    image = torch.rand(3, 16, 16)
    replies = [completion(CANONICAL), completion("Sure! The lemons."), *[error(503, "overloaded", {"Retry-After": "0.01"})] * 6]
    with OpenAIServer(*replies) as server:
        designer = remote_designer(server)
        assert designer.blueprint_or_instruction(image, "remove the lemons") == CANONICAL
        assert designer.blueprint_or_instruction(image, "remove the lemons") == "remove the lemons"
        assert designer.blueprint_or_instruction(image, "add a cat") == "add a cat"
    assert (designer.requests, designer.fallbacks) == (3, 2)
    assert len(server.requests) == 2 + 6  # the 503s were retried max_retries times
    summary = designer.summary()
    assert summary.startswith("designer: 3 blueprints in ") and summary.endswith(", 2 fell back to the raw instruction")
    assert designer.seconds > 0 and f"({3 / designer.seconds:.1f}/s)" in summary


def test_configuration_errors_are_raised_not_counted() -> None:
    with OpenAIServer(error(401, "invalid key")) as server:
        designer = remote_designer(server)
        with pytest.raises(ChatError, match="HTTP 401"):
            designer.blueprint_or_instruction(Image.new("RGB", (8, 8)), "remove the lemons")
    assert designer.fallbacks == 0
    with pytest.raises(ConfigError, match="needs base_url and model"):
        Designer.from_config(DesignerConfig(kind="openai", model="gpt-4o"))
    with pytest.raises(ConfigError, match="placeholder"):
        Designer(OpenAIChatClient(ChatConfig(base_url="http://localhost/v1", model="m")), prompt="no placeholder")
    with pytest.raises(ConfigError, match="placeholder"):
        DesignerConfig(kind="local", tiny={}, prompt="no placeholder")


def test_config_parses_from_recipe_yaml_and_command_line() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--designer", type=DesignerConfig | None, default=None)
    yaml = "designer:\n  kind: openai\n  base_url: https://api.openai.com/v1\n  model: gpt-4o-2024-11-20\n"
    config = parser.instantiate(parser.parse_string(yaml)).designer
    assert isinstance(config, DesignerConfig)
    designer = Designer.from_config(config)
    assert isinstance(designer.client, OpenAIChatClient)
    assert designer.client.url == "https://api.openai.com/v1/chat/completions"
    assert (designer.client.config.seed, designer.client.config.api_key_env) == (233, "OPENAI_API_KEY")
    assert (config.temperature, config.timeout, config.image_format) == (0.0, 60.0, "jpeg")  # DIM's GPT-4o settings

    flag = "--designer={kind: local, tiny: {seed: 1}, max_new_tokens: 8}"
    config = parser.instantiate(parser.parse_args([flag])).designer
    assert (config.kind, config.tiny, config.max_new_tokens) == ("local", {"seed": 1}, 8)
    with pytest.raises(ArgumentError, match="kind"):
        parser.parse_string("designer:\n  kind: anthropic\n")
    with pytest.raises(ValueError, match="timeout must be > 0, got -1") as info:
        parser.instantiate(parser.parse_string(yaml + "  timeout: -1\n"))
    assert isinstance(info.value.__cause__, ConfigError)  # what the CLI prints as one line


def test_local_client_and_designer_on_a_tiny_random_vlm() -> None:
    client = LocalVLMChatClient(ChatConfig(kind="local", tiny={"seed": 0}, max_new_tokens=12))
    image = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(0))
    reply = client.complete([image, "describe the image"])
    assert isinstance(reply, str) and reply == client.complete([image, "describe the image"])  # greedy
    assert isinstance(client.complete(["text only"]), str)
    assert isinstance(client.complete(["compare", image, image], system="be brief"), str)  # a judge's turn
    with pytest.raises(ValueError, match="non-empty"):
        client.complete([])

    designer = Designer.from_config(DesignerConfig(kind="local", tiny={"seed": 0}, max_new_tokens=12))
    # A random model writes no blueprint: the designer falls back and counts it.
    assert designer.blueprint_or_instruction(image, "remove the lemons") == "remove the lemons"
    assert (designer.requests, designer.fallbacks) == (1, 1)


def test_a_key_echoed_in_a_reply_never_reaches_the_fallback_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-test-4f9a2c81e7d3"
    monkeypatch.setenv("ZOO_TEST_KEY", key)
    with OpenAIServer(completion("x" * 190 + key)) as server:  # the warning's preview is 200 characters
        config = DesignerConfig(base_url=server.base_url, model="gpt-4o", api_key_env="ZOO_TEST_KEY")
        designer = Designer.from_config(config)
        with caplog.at_level(logging.DEBUG):
            assert designer.blueprint_or_instruction(None, "add a cat") == "add a cat"
    assert "lacks section" in caplog.text and designer.fallbacks == 1
    assert key[:8] not in caplog.text
