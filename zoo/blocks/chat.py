"""One chat client for every vision-language call the zoo makes to a remote or local model.

DIM's external designer (DIM paper §3.2, the chain-of-thought "blueprint"), the ImgEdit-Bench and
GEdit-Bench judges and data annotation all send the same thing: one user turn made of images and
text, optionally preceded by a system prompt, and read back one text reply. :class:`ChatClient` is
that call; :class:`OpenAIChatClient` speaks the OpenAI chat-completions protocol over HTTP (OpenAI,
Azure OpenAI, vLLM, SGLang, OpenRouter ...) and :class:`LocalVLMChatClient` runs a transformers
VLM in-process through :class:`zoo.blocks.mllm.QwenVLEncoder`.

Facts carried over from the official code (research notes §1A, §4, §5): DIM sends the image
before the text as a base64 JPEG whose quality is stepped down until it fits the API's size
limit, with ``seed=233, temperature=0, timeout=60``; the judges run many calls concurrently and
retry on rate limits and server errors. Hand-written because the ``openai`` package is not a
dependency of the zoo and the protocol needs only one POST.
"""

from __future__ import annotations

import base64
import copy
import email.utils
import io
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import requests
import torch
from PIL import Image

log = logging.getLogger(__name__)

ChatImage = Image.Image | torch.Tensor
"""A PIL image or a float tensor ``[3, H, W]`` with values in ``[0, 1]``."""

ChatPart = str | Image.Image | torch.Tensor
"""One part of a user turn: a text or an image, sent in the order given."""

JPEG_QUALITIES = tuple(range(95, 4, -5))
"""Qualities tried in turn until a JPEG fits ``max_image_bytes`` (DIM steps down the same way)."""


class ChatError(RuntimeError):
    """A chat call failed: rejected by the server, or still failing after every retry.

    Attributes:
        status: the last HTTP status, or ``None`` when no response arrived (timeout, refused).
        attempts: how many requests were sent.
    """

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class MissingAPIKeyError(RuntimeError):
    """The environment variable that should hold the API key is unset or empty.

    Not a :class:`ChatError`: it is a set-up mistake that would fail every call the same way, so
    batch helpers that collect per-call failures let it through.
    """


class ChatClient(Protocol):
    """Anything that answers one user turn of images and texts with one text reply."""

    def complete(self, content: Sequence[ChatPart], *, system: str | None = None) -> str:
        """Send ``content`` (images and texts, in order) as one user turn; return the reply text."""
        ...


def complete_many(
    client: ChatClient,
    contents: Sequence[Sequence[ChatPart]],
    *,
    system: str | None = None,
    max_workers: int = 8,
) -> list[str | ChatError]:
    """Run ``client.complete`` on many user turns concurrently; results keep the input order.

    A call that fails gives its :class:`ChatError` in place of the reply, so a caller (a judge over
    a whole benchmark) counts and logs the failures instead of losing the finished calls. Use
    ``max_workers=1`` for a :class:`LocalVLMChatClient`: one model cannot run two generations.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")

    def one(content: Sequence[ChatPart]) -> str | ChatError:
        try:
            return client.complete(content, system=system)
        except ChatError as err:
            return err

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(one, contents))


def to_pil(image: ChatImage) -> Image.Image:
    """An RGB PIL image from a PIL image of any mode or a float tensor ``[3, H, W]`` in ``[0, 1]``."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"a chat image must be a PIL image or a tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(
            f"a chat image tensor must be float [3, H, W] with values in [0, 1], got "
            f"{image.dtype} of shape {tuple(image.shape)}"
        )
    low, high = image.min().item(), image.max().item()
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"a chat image tensor must hold values in [0, 1], got [{low:.3f}, {high:.3f}]; map an "
            f"image in [-1, 1] with (x + 1) / 2 first"
        )
    pixels = (image.detach().float().cpu() * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def to_tensor(image: ChatImage) -> torch.Tensor:
    """A float tensor ``[3, H, W]`` in ``[0, 1]`` from either accepted image form."""
    return torch.from_numpy(np.array(to_pil(image))).permute(2, 0, 1).float() / 255


def encode_image(image: ChatImage, image_format: str = "jpeg", max_bytes: int = 18_000_000) -> str:
    """The image as a ``data:`` URL for an OpenAI ``image_url`` part.

    JPEG is saved at the qualities of :data:`JPEG_QUALITIES` until the file is at most
    ``max_bytes`` (the API rejects larger images); PNG is lossless, so it either fits or fails.

    Raises:
        ValueError: unknown format, or an image that cannot be made small enough.
    """
    fmt = image_format.lower()
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    pil = to_pil(image)
    qualities = JPEG_QUALITIES if fmt == "jpeg" else (None,)
    for quality in qualities:
        buffer = io.BytesIO()
        if quality is None:
            pil.save(buffer, format="PNG")
        else:
            pil.save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
        if len(data) <= max_bytes:
            if quality is not None and quality != JPEG_QUALITIES[0]:
                log.info("chat image %dx%d sent as JPEG quality %d (%d bytes)", *pil.size, quality, len(data))
            return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"
    smallest = f"quality {qualities[-1]}" if fmt == "jpeg" else "PNG"
    raise ValueError(
        f"a {pil.width}x{pil.height} image does not fit max_image_bytes={max_bytes} even as {smallest} "
        f"({len(data)} bytes): raise max_image_bytes, use image_format='jpeg' or downscale the image"
    )


class OpenAIChatClient:
    """A client of the OpenAI chat-completions protocol (``POST {base_url}/chat/completions``).

    Args:
        base_url: API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``
            for a vLLM server; for Azure, the resource endpoint (see ``azure_api_version``).
        model: model name sent in the request (for Azure, the deployment name).
        api_key_env: name of the environment variable holding the API key, read at every call so a
            rotated key takes effect; ``None`` for a server without authentication. The key itself
            never appears in a config, a log line or an error message.
        timeout: seconds to wait for the connection and for the reply.
        max_retries: retries after the first attempt on HTTP 429, 5xx, timeouts, connection errors
            and malformed replies; other 4xx fail at once.
        backoff: first retry delay in seconds, doubled each retry (with jitter), unless the server
            sends ``Retry-After``.
        max_backoff: upper bound of any single delay, ``Retry-After`` included.
        temperature: sampling temperature; ``None`` leaves the server default (GEdit's judge).
        seed: sampling seed (DIM's designer uses 233); ``None`` sends none.
        max_tokens: reply length limit; ``None`` sends none.
        image_format: ``"jpeg"`` (quality stepped down to fit) or ``"png"``.
        max_image_bytes: largest encoded image file sent (OpenAI accepts up to 20 MB).
        extra_headers: added to every request (e.g. OpenRouter's ``HTTP-Referer``).
        azure_api_version: when set, speak Azure OpenAI instead: ``POST
            {base_url}/openai/deployments/{model}/chat/completions?api-version=...`` with the key in
            an ``api-key`` header (DIM's GPT-4o designer used ``2024-11-20``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 2.0,
        max_backoff: float = 60.0,
        temperature: float | None = 0.0,
        seed: int | None = None,
        max_tokens: int | None = None,
        image_format: str = "jpeg",
        max_image_bytes: int = 18_000_000,
        extra_headers: dict[str, str] | None = None,
        azure_api_version: str | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model must name the model (or Azure deployment) to call")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or max_backoff < 0 or max_image_bytes <= 0:
            raise ValueError(
                f"need timeout > 0, max_retries >= 0, backoff >= 0, max_backoff >= 0 and "
                f"max_image_bytes > 0; got timeout={timeout}, max_retries={max_retries}, "
                f"backoff={backoff}, max_backoff={max_backoff}, max_image_bytes={max_image_bytes}"
            )
        if image_format.lower() not in ("jpeg", "png"):
            raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.seed = seed
        self.max_tokens = max_tokens
        self.image_format = image_format.lower()
        self.max_image_bytes = max_image_bytes
        self.extra_headers = dict(extra_headers or {})
        self.azure_api_version = azure_api_version

    @property
    def url(self) -> str:
        """The endpoint every request goes to (without the Azure ``api-version`` query)."""
        if self.azure_api_version is not None:
            return f"{self.base_url}/openai/deployments/{self.model}/chat/completions"
        return f"{self.base_url}/chat/completions"

    def complete(self, content: Sequence[ChatPart], *, system: str | None = None) -> str:
        """Send one user turn (images become base64 ``image_url`` parts, in order); return the reply.

        Raises:
            MissingAPIKeyError: the ``api_key_env`` variable is unset.
            ChatError: a rejected request (4xx other than 429, with the server's message), or no
                usable reply after ``max_retries`` retries.
            ValueError, TypeError: empty content, or an image that cannot be encoded.
        """
        key = self._api_key()
        payload = json.dumps(self._body(content, system))
        headers = {"Content-Type": "application/json", **self.extra_headers}
        params: dict[str, str] = {}
        if key is not None and self.azure_api_version is not None:
            headers["api-key"] = key
        elif key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if self.azure_api_version is not None:
            params["api-version"] = self.azure_api_version

        attempts, attempt = self.max_retries + 1, 0
        while True:
            attempt += 1
            status: int | None = None
            retry_after: float | None = None
            try:
                response = requests.post(self.url, data=payload, headers=headers, params=params, timeout=self.timeout)
            except requests.Timeout:
                reason = f"no reply within timeout={self.timeout}s"
            except requests.ConnectionError as err:
                reason = f"connection failed ({type(err).__name__})"
            except requests.RequestException as err:
                raise ChatError(f"chat request to {self.url} could not be sent: {err}", attempts=attempt) from err
            else:
                status = response.status_code
                if 200 <= status < 300:
                    reply, reason = _reply_text(response)
                    if reply is not None:
                        return reply
                elif status == 429 or status >= 500:
                    reason = f"HTTP {status}: {_server_message(response)}"
                    retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
                else:
                    raise ChatError(
                        f"chat request to {self.url} (model {self.model!r}) was rejected with HTTP {status}: "
                        f"{_redact(_server_message(response), key)}",
                        status=status,
                        attempts=attempt,
                    )
            reason = _redact(reason, key)
            if attempt == attempts:
                raise ChatError(
                    f"chat request to {self.url} (model {self.model!r}) failed after {attempts} attempts; "
                    f"last error: {reason}",
                    status=status,
                    attempts=attempt,
                )
            delay = self._delay(attempt, retry_after)
            log.warning(
                "chat request to %s failed (%s); retry %d/%d in %.2fs",
                self.url, reason, attempt, self.max_retries, delay,
            )
            time.sleep(delay)

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise MissingAPIKeyError(
                f"environment variable {self.api_key_env} holding the API key for {self.base_url} is not "
                f"set: export {self.api_key_env}=<key>, or set api_key_env to null for a server without "
                f"authentication"
            )
        return key

    def _body(self, content: Sequence[ChatPart], system: str | None) -> dict[str, Any]:
        if isinstance(content, str) or not content:
            raise ValueError("content must be a non-empty list of texts and images (one user turn)")
        parts: list[dict[str, Any]] = []
        for part in content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            else:
                url = encode_image(part, self.image_format, self.max_image_bytes)
                parts.append({"type": "image_url", "image_url": {"url": url}})
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": parts})
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        for name in ("temperature", "seed", "max_tokens"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        # Jitter spreads the retries of many concurrent judge calls hit by the same rate limit.
        return min(self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0), self.max_backoff)


class LocalVLMChatClient:
    """A chat client running a transformers VLM in-process (:class:`~zoo.blocks.mllm.QwenVLEncoder`).

    The open-designer path of DIM (Qwen/InternVL/MiMo/GLM, greedy decoding, research notes §1A) and
    a local judge. Decoding is greedy, so replies are deterministic. One call runs at a time: use
    ``complete_many(..., max_workers=1)``.

    Args:
        pretrained: folder or cached hub id of a Qwen2.5-VL checkpoint (e.g.
            ``Qwen/Qwen2.5-VL-7B-Instruct``). Exclusive with ``tiny``.
        tiny: options of :func:`zoo.blocks.tiny.tiny_qwen2_5_vl` for a random toy model (tests).
        max_new_tokens: longest reply in tokens (DIM's open designers allow 8192).
        device: where the model runs, e.g. ``cuda`` (each rank's current GPU) or ``cpu``.
        torch_dtype: ``float32``, ``bfloat16`` or ``float16``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tiny: dict[str, Any] | None = None,
        max_new_tokens: int = 1024,
        device: str = "cpu",
        torch_dtype: str = "float32",
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # Imported here so remote-only users (API judges, designer) never load transformers.
        from zoo.blocks.mllm import QwenVLEncoder

        self.vlm = QwenVLEncoder(pretrained=pretrained, tiny=tiny, torch_dtype=torch_dtype).to(device)
        self.max_new_tokens = max_new_tokens

    def complete(self, content: Sequence[ChatPart], *, system: str | None = None) -> str:
        """Greedy reply to one user turn (texts and images, in the order given) after an optional
        system prompt, at most ``max_new_tokens`` long.

        ImgEdit-Judge reads ``[rubric, original, result]`` (research notes §4D), so images keep their
        place among the texts. The official judge script passes only ``max_new_tokens`` to
        ``generate``: the checkpoint's own generation settings (stop tokens, repetition penalty)
        apply, except that decoding is greedy so replies are deterministic.

        Raises:
            ValueError: empty content.
        """
        if isinstance(content, str) or not content:
            raise ValueError("content must be a non-empty list of texts and images (one user turn)")
        processor, model = self.vlm.processor, self.vlm.model
        parts = [{"type": "text", "text": part} if isinstance(part, str) else {"type": "image"} for part in content]
        messages = [{"role": "system", "content": system}] if system is not None else []
        prompt = processor.apply_chat_template([*messages, {"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True)
        images = [to_pil(part) for part in content if not isinstance(part, str)]
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt").to(model.device)
        config = copy.deepcopy(model.generation_config)
        config.update(max_new_tokens=self.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=config)
        return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _reply_text(response: requests.Response) -> tuple[str | None, str]:
    """``(choices[0].message.content, "")`` or ``(None, why it is missing)`` for a 2xx reply."""
    try:
        data = response.json()
    except ValueError:
        return None, f"HTTP {response.status_code} reply is not JSON: {response.text[:200]!r}"
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, f"reply has no choices[0].message.content: {json.dumps(data)[:200]}"
    if not isinstance(text, str):
        return None, f"reply content is {text!r} (finish_reason={choice.get('finish_reason')!r})"
    return text, ""


def _server_message(response: requests.Response) -> str:
    """The ``error.message`` of an OpenAI error body, else the start of the raw body."""
    try:
        error = response.json()["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason or "(empty body)"


def _redact(text: str, key: str | None) -> str:
    # Servers echo the key they rejected (OpenAI's 401 does); it must not reach logs or tracebacks.
    return text.replace(key, "[redacted]") if key else text


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)
