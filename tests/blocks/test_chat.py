"""OpenAIChatClient against a real local HTTP server speaking the chat-completions protocol."""

from __future__ import annotations

import base64
import io
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.openai_server import OpenAIServer, Reply, Request, completion, error
from zoo.blocks.chat import (
    JPEG_QUALITIES,
    ChatError,
    MissingAPIKeyError,
    OpenAIChatClient,
    complete_many,
    encode_image,
    to_pil,
)

KEY = "sk-test-4f9a2c81e7d3"


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ZOO_TEST_KEY", KEY)
    return KEY


def make_client(server: OpenAIServer, **kwargs: object) -> OpenAIChatClient:
    options: dict[str, object] = {"api_key_env": "ZOO_TEST_KEY", "backoff": 0.01, "max_retries": 2, "timeout": 5.0}
    options.update(kwargs)
    return OpenAIChatClient(server.base_url, "gpt-4o-2024-11-20", **options)  # type: ignore[arg-type]


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
    assert request.headers["Authorization"] == f"Bearer {KEY}"
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


def test_optional_fields_and_auth_are_left_out_when_unset() -> None:
    with OpenAIServer(completion("ok")) as server:
        client = make_client(server, api_key_env=None, temperature=None)
        assert client.complete(["hello"]) == "ok"
    (request,) = server.requests
    assert "Authorization" not in request.headers
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
    with OpenAIServer(error(429, "rate limited", {"Retry-After": "0.3"}), completion("done")) as server:
        client = make_client(server, backoff=0.0)
        start = time.monotonic()
        assert client.complete(["hi"]) == "done"
        elapsed = time.monotonic() - start
    assert len(server.requests) == 2
    assert elapsed >= 0.3


def test_retry_after_is_capped_by_max_backoff(api_key: str) -> None:
    with OpenAIServer(error(503, "busy", {"Retry-After": "3600"}), completion("done")) as server:
        start = time.monotonic()
        assert make_client(server, max_backoff=0.05).complete(["hi"]) == "done"
    assert time.monotonic() - start < 2.0


def test_persistent_5xx_fails_after_max_retries(api_key: str) -> None:
    with OpenAIServer(*[error(500, "upstream exploded")] * 3, completion("too late")) as server:
        client = make_client(server, max_retries=2)
        with pytest.raises(ChatError, match="failed after 3 attempts.*HTTP 500: upstream exploded") as info:
            client.complete(["hi"])
    assert len(server.requests) == 3
    assert (info.value.status, info.value.attempts) == (500, 3)


def test_timeout_is_retried(api_key: str) -> None:
    slow = completion("slow")
    slow.delay = 0.6
    with OpenAIServer(slow, completion("fast")) as server:
        assert make_client(server, timeout=0.2).complete(["hi"]) == "fast"
    assert len(server.requests) == 2


def test_connection_refused_is_retried_then_reported(api_key: str) -> None:
    with OpenAIServer() as server:
        base_url = server.base_url
    client = OpenAIChatClient(base_url, "m", api_key_env="ZOO_TEST_KEY", max_retries=1, backoff=0.01)
    with pytest.raises(ChatError, match="failed after 2 attempts; last error: connection failed") as info:
        client.complete(["hi"])
    assert info.value.status is None


def test_malformed_json_is_retried(api_key: str) -> None:
    with OpenAIServer(Reply(raw=b"<html>gateway</html>"), completion("fine")) as server:
        assert make_client(server).complete(["hi"]) == "fine"
    assert len(server.requests) == 2


def test_reply_without_content_is_an_error_after_retries(api_key: str) -> None:
    replies = [completion(None, finish_reason="content_filter"), Reply(body={"choices": []}), Reply(raw=b"{")]
    with OpenAIServer(*replies) as server:
        with pytest.raises(ChatError, match="failed after 3 attempts.*not JSON"):
            make_client(server).complete(["hi"])
    with OpenAIServer(*[completion(None, finish_reason="content_filter")] * 3) as server:
        with pytest.raises(ChatError, match="finish_reason='content_filter'"):
            make_client(server).complete(["hi"])


def test_other_4xx_fails_at_once_with_the_server_message(api_key: str) -> None:
    with OpenAIServer(error(400, "Invalid image URL"), completion("never")) as server:
        with pytest.raises(ChatError, match="rejected with HTTP 400: Invalid image URL") as info:
            make_client(server).complete(["hi"])
    assert len(server.requests) == 1
    assert (info.value.status, info.value.attempts) == (400, 1)


def test_missing_key_variable_is_named_and_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZOO_TEST_KEY", raising=False)
    with OpenAIServer(completion("never")) as server:
        with pytest.raises(MissingAPIKeyError, match="environment variable ZOO_TEST_KEY .* is not set"):
            make_client(server).complete(["hi"])
    assert server.requests == []


def test_key_never_appears_in_errors_or_logs(api_key: str, caplog: pytest.LogCaptureFixture) -> None:
    echo = f"Incorrect API key provided: {KEY}"
    with OpenAIServer(error(500, echo), error(401, echo)) as server, caplog.at_level(logging.WARNING):
        with pytest.raises(ChatError) as info:
            make_client(server).complete(["hi"])
    assert info.value.status == 401
    assert KEY not in str(info.value) and "[redacted]" in str(info.value)
    assert "HTTP 500" in caplog.text and KEY not in caplog.text


def test_azure_flavour_uses_deployment_path_and_api_key_header(api_key: str) -> None:
    with OpenAIServer(completion("azure")) as server:
        client = OpenAIChatClient(
            server.base_url.removesuffix("/v1"), "gpt-4o", api_key_env="ZOO_TEST_KEY", azure_api_version="2024-11-20"
        )
        assert client.complete(["hi"]) == "azure"
    (request,) = server.requests
    assert request.path == "/openai/deployments/gpt-4o/chat/completions?api-version=2024-11-20"
    assert request.headers["api-key"] == KEY and "Authorization" not in request.headers


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
        OpenAIChatClient("api.openai.com/v1", "gpt-4o")
    with pytest.raises(ValueError, match="image_format"):
        OpenAIChatClient("http://localhost/v1", "gpt-4o", image_format="webp")
    client = OpenAIChatClient("http://localhost/v1", "gpt-4o", api_key_env=None)
    with pytest.raises(ValueError, match="non-empty list"):
        client.complete("just a string")  # type: ignore[arg-type]
