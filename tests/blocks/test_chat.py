"""The chat client on the openai SDK against a real local HTTP server speaking the chat-completions
protocol: requests, retries and Retry-After, timeouts, Azure, config checks, and the API key kept out
of every error, log record and returned text."""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import pickle
import time
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.faults import FaultTable
from tests.helpers.openai_server import OpenAIServer, Reply, Request, completion, error
from zoo.blocks.chat import (
    JPEG_QUALITIES,
    ChatConfig,
    ChatError,
    NO_KEY,
    MissingAPIKeyError,
    OpenAIChatClient,
    build_chat_client,
    complete_many,
    encode_image,
    to_pil,
)
from zoo.blocks.config import ConfigError
from zoo.blocks.redact import REDACTED

KEY = "sk-test-4f9a2c81e7d3"
SOON = {"Retry-After": "0.01"}
"""Headers of a retryable error that keep the SDK's retry short (its own backoff starts at 0.5 s)."""


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ZOO_TEST_KEY", KEY)
    return KEY


def make_client(server: OpenAIServer, **kwargs: object) -> OpenAIChatClient:
    options: dict[str, object] = {"api_key_env": "ZOO_TEST_KEY", "max_retries": 2, "timeout": 5.0}
    options.update(kwargs)
    return OpenAIChatClient(ChatConfig(base_url=server.base_url, model="gpt-4o-2024-11-20", **options))  # type: ignore[arg-type]


def gradient_image(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1))


def decode_data_url(url: str) -> tuple[str, bytes]:
    header, payload = url.split(",", 1)
    assert header.endswith(";base64")
    return header[len("data:") : -len(";base64")], base64.b64decode(payload)


def test_success_sends_the_openai_request(api_key: str) -> None:
    image = gradient_image()
    with OpenAIServer(completion("a blueprint")) as server:
        client = make_client(server, seed=233, max_tokens=512)
        reply = client.complete([image, "remove the lemons"], system="You are careful.")
    assert reply == "a blueprint"
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "gpt-4o-2024-11-20"
    assert (body["temperature"], body["seed"], body["max_tokens"]) == (0.0, 233, 512)
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You are careful."}
    assert user["role"] == "user"
    image_part, text_part = user["content"]  # image first, then text, as DIM sends it
    assert text_part == {"type": "text", "text": "remove the lemons"}
    assert image_part["type"] == "image_url"
    mime, data = decode_data_url(image_part["image_url"]["url"])
    assert mime == "image/jpeg"
    sent = Image.open(io.BytesIO(data))
    assert sent.format == "JPEG" and sent.size == image.size
    assert np.abs(np.asarray(sent, dtype=float) - np.asarray(image, dtype=float)).mean() < 3.0


def test_optional_fields_are_left_out_and_no_key_is_sent_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the SDK's own variable must not be picked up either
    with OpenAIServer(completion("ok")) as server:
        client = make_client(server, api_key_env=None, temperature=None, extra_headers={"HTTP-Referer": "https://zoo"})
        assert client.complete(["hello"]) == "ok"
    (request,) = server.requests
    assert request.headers["authorization"] == f"Bearer {NO_KEY}" and KEY not in json.dumps(request.headers)
    assert request.headers["http-referer"] == "https://zoo"
    assert set(request.body) == {"model", "messages"}
    assert request.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]


def test_tensor_image_is_sent_losslessly_as_png() -> None:
    pixels = torch.randint(0, 256, (3, 10, 14), generator=torch.Generator().manual_seed(0))
    with OpenAIServer(completion("ok")) as server:
        make_client(server, api_key_env=None, image_format="png").complete([pixels.float() / 255, "describe"])
    mime, data = decode_data_url(server.requests[0].body["messages"][0]["content"][0]["image_url"]["url"])
    assert mime == "image/png"
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1)
    assert torch.equal(decoded, pixels.to(torch.uint8))


def test_429_is_retried_and_retry_after_is_honoured(api_key: str) -> None:
    # 1.5 s is three times the SDK's first backoff (at most 0.5 s): only an honoured header waits this long.
    with OpenAIServer(error(429, "rate limited", {"Retry-After": "1.5"}), completion("done")) as server:
        client = make_client(server)
        start = time.monotonic()
        assert client.complete(["hi"]) == "done"
        elapsed = time.monotonic() - start
    assert len(server.requests) == 2
    assert [r.headers["x-stainless-retry-count"] for r in server.requests] == ["0", "1"]
    assert elapsed >= 1.5


def test_retry_after_beyond_two_minutes_fails_at_once(api_key: str) -> None:
    with OpenAIServer(error(503, "busy", {"Retry-After": "3600"}), completion("done")) as server:
        start = time.monotonic()
        with pytest.raises(ChatError, match="rejected with HTTP 503: busy") as info:
            make_client(server).complete(["hi"])
    assert time.monotonic() - start < 60  # neither the hour asked for nor the SDK's two-minute cap
    assert len(server.requests) == 1 and (info.value.status, info.value.attempts) == (503, 1)


def test_persistent_5xx_fails_after_max_retries(api_key: str) -> None:
    with OpenAIServer(*[error(500, "upstream exploded", SOON)] * 3, completion("too late")) as server:
        client = make_client(server, max_retries=2)
        with pytest.raises(ChatError, match="failed after 3 attempts.*HTTP 500: upstream exploded") as info:
            client.complete(["hi"])
    assert len(server.requests) == 3
    assert (info.value.status, info.value.attempts) == (500, 3)


def test_timeout_is_retried(api_key: str) -> None:
    slow = completion("slow")
    slow.delay = 3.0
    with OpenAIServer(slow, completion("fast")) as server:  # 1.5 s leaves a loaded machine time for "fast"
        assert make_client(server, timeout=1.5).complete(["hi"]) == "fast"
    assert len(server.requests) == 2


def test_timeouts_fail_after_max_retries(api_key: str) -> None:
    with OpenAIServer(*[Reply(delay=1.0, body={})] * 2) as server:
        with pytest.raises(ChatError, match=r"failed after 2 attempts; last error: no reply within timeout=0.3s") as info:
            make_client(server, timeout=0.3, max_retries=1).complete(["hi"])
    assert len(server.requests) == 2
    assert (info.value.status, info.value.attempts) == (None, 2)


def test_connection_refused_is_retried_then_reported(api_key: str) -> None:
    with OpenAIServer() as server:
        pass
    client = make_client(server, max_retries=1)
    with pytest.raises(ChatError, match="failed after 2 attempts; last error: connection failed") as info:
        client.complete(["hi"])
    assert (info.value.status, info.value.attempts) == (None, 2)


def test_malformed_json_is_retried(api_key: str) -> None:
    with OpenAIServer(Reply(raw=b"<html>gateway</html>"), completion("fine")) as server:
        assert make_client(server).complete(["hi"]) == "fine"
    assert len(server.requests) == 2


def test_reply_without_content_is_an_error_after_retries(api_key: str) -> None:
    replies = [completion(None, finish_reason="content_filter"), Reply(body={"choices": []}), Reply(raw=b"{")]
    with OpenAIServer(*replies) as server:
        with pytest.raises(ChatError, match="failed after 3 attempts.*not JSON") as info:
            make_client(server).complete(["hi"])
    assert (info.value.status, info.value.attempts) == (200, 3)
    with OpenAIServer(*[completion(None, finish_reason="content_filter")] * 3) as server:
        with pytest.raises(ChatError, match="finish_reason='content_filter'"):
            make_client(server).complete(["hi"])


def test_sdk_retries_and_reasked_replies_share_one_budget(api_key: str) -> None:
    with OpenAIServer(error(502, "bad gateway", SOON), Reply(raw=b"<html>"), error(502, "bad gateway", SOON)) as server:
        with pytest.raises(ChatError, match="failed after 3 attempts.*HTTP 502: bad gateway") as info:
            make_client(server, max_retries=2).complete(["hi"])
    assert len(server.requests) == 3 and info.value.attempts == 3


def test_other_4xx_fails_at_once_with_the_server_message(api_key: str) -> None:
    with OpenAIServer(error(400, "Invalid image URL"), completion("never")) as server:
        with pytest.raises(ChatError, match="rejected with HTTP 400: Invalid image URL") as info:
            make_client(server).complete(["hi"])
    assert len(server.requests) == 1
    assert (info.value.status, info.value.attempts) == (400, 1)


@pytest.mark.parametrize("value", [None, "", "  \n"], ids=["unset", "empty", "blank"])
def test_missing_key_variable_is_named_and_nothing_is_sent(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("ZOO_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("ZOO_TEST_KEY", value)
    with OpenAIServer(completion("never")) as server:
        with pytest.raises(MissingAPIKeyError, match="environment variable ZOO_TEST_KEY .* is not set"):
            make_client(server).complete(["hi"])
    assert server.requests == []


def test_azure_flavour_uses_deployment_path_and_api_key_header(api_key: str) -> None:
    with OpenAIServer(completion("azure")) as server:
        config = ChatConfig(
            base_url=server.base_url.removesuffix("/v1"), model="gpt-4o", api_key_env="ZOO_TEST_KEY", azure_api_version="2024-11-20"
        )
        client = OpenAIChatClient(config)
        assert client.complete(["hi"]) == "azure"
    (request,) = server.requests
    assert client.url == f"{config.base_url}/openai/deployments/gpt-4o/chat/completions"
    assert request.path == "/openai/deployments/gpt-4o/chat/completions?api-version=2024-11-20"
    assert request.headers["api-key"] == KEY and "authorization" not in request.headers
    assert request.body["model"] == "gpt-4o"


def test_azure_errors_are_chat_errors(api_key: str) -> None:
    with OpenAIServer(error(404, "The API deployment for this resource does not exist.")) as server:
        config = ChatConfig(base_url=server.base_url, model="gpt-5", api_key_env="ZOO_TEST_KEY", azure_api_version="2024-11-20")
        with pytest.raises(ChatError, match="deployments/gpt-5/chat/completions.*rejected with HTTP 404: The API deployment") as info:
            OpenAIChatClient(config).complete(["hi"])
    assert info.value.status == 404


def test_a_pickled_or_copied_client_works(api_key: str) -> None:
    with OpenAIServer(completion("one"), completion("two")) as server:
        client = make_client(server)
        twins = [pickle.loads(pickle.dumps(client)), copy.deepcopy(client)]  # as ddp_spawn, a deep copy
        assert all(twin.config == client.config for twin in twins)
        assert [twin.complete(["hi"]) for twin in twins] == ["one", "two"]


def test_complete_many_keeps_order_and_returns_failures() -> None:
    def respond(request: Request) -> Reply:
        text = request.body["messages"][0]["content"][0]["text"]
        return error(400, "bad prompt") if text == "bad" else completion(text.upper())

    prompts = ["one", "two", "bad", "four", "five"]
    with OpenAIServer(respond=respond) as server:
        client = make_client(server, api_key_env=None)
        results = complete_many(client, [[p] for p in prompts], max_workers=3)
    assert results[:2] == ["ONE", "TWO"] and results[3:] == ["FOUR", "FIVE"]
    assert isinstance(results[2], ChatError) and results[2].status == 400
    assert len(server.requests) == 5


def test_jpeg_quality_steps_down_until_the_image_fits() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    sizes = {}
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        noise.save(buffer, format="JPEG", quality=quality)
        sizes[quality] = len(buffer.getvalue())
    limit = (sizes[95] + sizes[50]) // 2
    expected = next(q for q in JPEG_QUALITIES if sizes[q] <= limit)
    assert 50 <= expected < 95

    _, data = decode_data_url(encode_image(noise, "jpeg", max_bytes=limit))
    assert len(data) == sizes[expected] <= limit

    with pytest.raises(ValueError, match="does not fit max_image_bytes=500 even as quality 5"):
        encode_image(noise, "jpeg", max_bytes=500)
    with pytest.raises(ValueError, match="even as PNG"):
        encode_image(noise, "png", max_bytes=sizes[95])


def test_bad_images_and_settings_give_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"float \[3, H, W\].*\(1, 3, 8, 8\)"):
        to_pil(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        to_pil(torch.rand(3, 8, 8) * 2 - 1)
    with pytest.raises(TypeError, match="PIL image or a tensor"):
        to_pil("lemons.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base_url must start with http"):
        ChatConfig(base_url="api.openai.com/v1", model="gpt-4o")
    with pytest.raises(ValueError, match="image_format"):
        ChatConfig(base_url="http://localhost/v1", model="gpt-4o", image_format="webp")  # type: ignore[arg-type]
    client = OpenAIChatClient(ChatConfig(base_url="http://localhost/v1", model="gpt-4o", api_key_env=None))
    with pytest.raises(ValueError, match="non-empty list"):
        client.complete("just a string")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"timeout": 0}, "timeout must be > 0, got 0"),
        ({"max_retries": -1}, "max_retries must be in [0, inf], got -1"),
        ({"temperature": -0.5}, "temperature must be in [0, inf], got -0.5"),
        ({"max_tokens": 0}, "max_tokens must be in [1, inf], got 0"),
        ({"max_image_bytes": 0}, "max_image_bytes must be > 0, got 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be in [1, inf], got 0"),
        ({"kind": "anthropic"}, "kind must be one of openai, local; got 'anthropic'"),
        ({"torch_dtype": "float8"}, "torch_dtype must be one of float32, bfloat16, float16; got 'float8'"),
        ({"model": None}, "kind 'openai' needs base_url and model"),
    ],
)
def test_a_bad_config_value_is_one_line_config_error(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ChatConfig(**({"base_url": "http://localhost/v1", "model": "m"} | options))  # type: ignore[arg-type]
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_client_refuses_a_config_of_the_other_kind() -> None:
    with pytest.raises(ConfigError, match="OpenAIChatClient needs a config of kind 'openai'"):
        OpenAIChatClient(ChatConfig(kind="local", tiny={}))
    assert isinstance(build_chat_client(ChatConfig(base_url="http://localhost/v1", model="m")), OpenAIChatClient)


# -- the API key never leaks ------------------------------------------------------------------

LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2", "zoo")
"""The SDK's and its HTTP stack's loggers (either generation), captured at DEBUG with the root."""


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def assert_hidden(forms: tuple[str, ...], logs: pytest.LogCaptureFixture, *texts: str) -> None:
    """No form of the key in ``texts``, the captured log text or any captured record's message."""
    seen = [*texts, logs.text, *(record.getMessage() for record in logs.records)]
    for form in forms:
        assert all(form not in text for text in seen), f"key form {form!r} leaked"


def error_texts(err: BaseException) -> tuple[str, ...]:
    """Everything an exception shows: message, repr and the whole printed traceback."""
    return str(err), repr(err), "".join(traceback.format_exception(err))


def test_key_echoed_by_the_server_never_appears_in_errors_or_logs(api_key: str, debug_logs: pytest.LogCaptureFixture) -> None:
    echo = f"Incorrect API key provided: {KEY}"
    with OpenAIServer(error(500, echo, SOON | {"X-Echo": KEY}), error(401, echo, {"X-Echo": KEY})) as server:
        client = make_client(server)
        with pytest.raises(ChatError) as info:
            client.complete(["hi"])
    err = info.value
    assert err.status == 401 and "[redacted]" in str(err)
    assert err.__cause__ is None and err.__context__ is None  # no SDK exception (holding the echo) chained
    assert "Retrying request" in debug_logs.text and "500 Internal Server Error" in debug_logs.text
    assert any(r.name.startswith("httpcore") and "X-Echo" in r.getMessage() for r in debug_logs.records)  # headers logged
    assert_hidden((KEY,), debug_logs, *error_texts(err), repr(client))


def test_key_with_surrounding_whitespace_is_stripped_and_both_forms_are_hidden(
    monkeypatch: pytest.MonkeyPatch, debug_logs: pytest.LogCaptureFixture
) -> None:
    raw = f"  {KEY} \n"
    monkeypatch.setenv("ZOO_TEST_KEY", raw)
    with OpenAIServer(error(503, f"raw {raw!r} stripped {KEY}", SOON), completion(f"ok {KEY}{raw}")) as server:
        reply = make_client(server).complete(["hi"])
    assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {KEY}"] * 2
    assert reply == "ok [redacted][redacted]"
    with OpenAIServer(error(400, f"bad key {raw}")) as server:
        with pytest.raises(ChatError) as info:
            make_client(server).complete(["hi"])
    assert_hidden((raw, KEY), debug_logs, reply, *error_texts(info.value))


def test_key_echoed_in_a_reply_is_redacted_before_it_is_cut_for_display(
    api_key: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    across_the_cut = b"x" * 190 + KEY.encode() + b" and more"  # the 200-character preview would end mid-key
    cut_by_the_server = b"y" * 188 + KEY[:14].encode()  # a server's own cut echo: only a prefix of the key
    long_body = {"choices": [], "note": "z" * 170 + KEY}
    replies = [Reply(raw=across_the_cut), Reply(raw=cut_by_the_server), Reply(body=long_body)]
    with OpenAIServer(*replies) as server:
        with pytest.raises(ChatError, match="failed after 3 attempts") as info:
            make_client(server).complete(["hi"])
    with OpenAIServer(error(400, "w" * 495 + KEY)) as server:  # cut first, "sk-te" would be left
        with pytest.raises(ChatError, match=r"rejected with HTTP 400: w+\[reda\.\.\.$") as rejected:
            make_client(server).complete(["hi"])
    assert "unusable" in debug_logs.text  # the first two replies were logged before asking again
    assert_hidden((KEY, KEY[:8]), debug_logs, *error_texts(info.value), *error_texts(rejected.value))


def test_a_successful_reply_never_returns_the_key(api_key: str, debug_logs: pytest.LogCaptureFixture) -> None:
    with OpenAIServer(completion(f"Your key is {KEY}.")) as server:
        reply = make_client(server).complete(["echo my key"])
    assert reply == "Your key is [redacted]."
    assert_hidden((KEY,), debug_logs, reply)


@pytest.mark.faults
def test_key_with_a_line_break_inside_is_hidden_in_the_protocol_error_and_its_logs(
    monkeypatch: pytest.MonkeyPatch, debug_logs: pytest.LogCaptureFixture, fault: FaultTable
) -> None:
    fault.injected("chat: API key with a line break inside")
    broken = f"{KEY[:10]}\n{KEY[10:]}"
    monkeypatch.setenv("ZOO_TEST_KEY", broken)
    with OpenAIServer(completion("never sent")) as server:
        with pytest.raises(ChatError, match="connection failed") as info:
            make_client(server, max_retries=1).complete(["hi"])
    assert server.requests == []  # the HTTP stack refuses the header before sending it
    assert "Illegal header value" in debug_logs.text and REDACTED in debug_logs.text  # its error, logged at DEBUG
    assert_hidden((broken, f"{KEY[:10]}\\n{KEY[10:]}", KEY[:10], KEY[10:]), debug_logs, *error_texts(info.value))
    fault.survived("chat: API key with a line break inside")
