"""One chat client for every vision-language call the zoo makes to a remote or local model.

DIM's external designer (DIM paper §3.2, the chain-of-thought "blueprint"), the ImgEdit-Bench and
GEdit-Bench judges and data annotation all send the same thing: one user turn made of images and
text, optionally preceded by a system prompt, and read back one text reply. :class:`ChatClient` is
that call; :class:`ChatConfig` holds every setting of it once, and :func:`build_chat_client` builds
either :class:`OpenAIChatClient` (the OpenAI chat-completions protocol through the ``openai`` SDK:
OpenAI, Azure OpenAI, vLLM, SGLang, OpenRouter ...) or :class:`LocalVLMChatClient` (a transformers
VLM in-process through :class:`zoo.blocks.mllm.VLMEncoder`).

Facts carried over from the official code: DIM sends the image before the text as a base64 JPEG
whose quality is stepped down until it fits the API's size limit, with ``seed=233, temperature=0,
timeout=60`` (``showlab/DIM@28e644f:models/modeling_dim.py:807-840`` and
``models/utils/__init__.py:19-44``); the judges run many calls concurrently and retry on rate
limits and server errors (``PKU-YuanGroup/ImgEdit@547185d:Benchmark/UGE/UGE_bench.py:41-92``,
``stepfun-ai/Step1X-Edit@570eba6:GEdit-Bench/test_gedit_score.py:18-58``). The SDK does the
transport (retries with backoff and ``Retry-After``, timeouts, Azure's paths and headers); the image
encoding, the re-asking of malformed replies and the key redaction (:mod:`zoo.blocks.redact`) are
ours, because the SDK does not fit images to a size limit and puts server messages, which may echo
the key, into its errors.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import openai
import torch
from PIL import Image

from zoo.blocks.config import ConfigError, TorchDtype, check_choice, check_positive, check_range
from zoo.blocks.progress import counting
from zoo.blocks.redact import hide_in_logs, key_forms, redact, shorten

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


ChatKind = Literal["openai", "local"]
"""``openai``: an OpenAI-compatible API over HTTP; ``local``: a transformers VLM in this process."""

ImageFormat = Literal["jpeg", "png"]
"""How images are sent to an API: JPEG (quality stepped down to fit) or lossless PNG."""

@dataclass
class ChatConfig:
    """Settings of one chat client, declared once for the designer and the judges.

    ``kind: openai`` reads ``base_url`` .. ``azure_api_version``; ``kind: local`` reads
    ``pretrained`` .. ``torch_dtype``. Users with other defaults subclass this and change only the
    defaults (:class:`~zoo.blocks.designer.DesignerConfig`, :class:`~callbacks.judges.JudgeConfig`).
    """

    kind: ChatKind = "openai"
    """``openai``: an OpenAI-compatible API over HTTP; ``local``: a Qwen2.5-VL run in-process."""
    base_url: str | None = None
    """API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1`` (vLLM); for
    Azure, the resource endpoint ``https://<resource>.openai.azure.com``."""
    model: str | None = None
    """Model name sent with every request (for Azure, the deployment name)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key, read at every call so a rotated key takes effect;
    null for a server without authentication. The key never appears in a config, log or error."""
    timeout: float = 60.0
    """Seconds to wait for the connection and for each reply."""
    max_retries: int = 5
    """Retries after the first attempt on HTTP 408/409/429/5xx, timeouts, failed connections and
    malformed replies; the SDK waits with exponential backoff, or as long as the server's
    ``Retry-After`` says up to two minutes (a longer one fails at once). Other 4xx fail at once."""
    temperature: float | None = 0.0
    """Sampling temperature; null leaves the server default."""
    seed: int | None = None
    """Sampling seed; null sends none."""
    max_tokens: int | None = None
    """Reply length limit in tokens; null sends none."""
    image_format: ImageFormat = "jpeg"
    """``jpeg`` (quality stepped down until it fits ``max_image_bytes``) or lossless ``png``."""
    max_image_bytes: int = 18_000_000
    """Largest encoded image file sent (OpenAI accepts up to 20 MB)."""
    extra_headers: dict[str, str] | None = None
    """HTTP headers added to every request (e.g. OpenRouter's ``HTTP-Referer``)."""
    azure_api_version: str | None = None
    """When set, speak Azure OpenAI with this ``api-version`` (the key goes in an ``api-key``
    header; DIM's GPT-4o designer was deployment ``gpt-4o`` at ``2024-11-20``)."""
    pretrained: str | None = None
    """Local model: folder or cached hub id of a Qwen2.5-VL checkpoint. Exclusive with ``tiny``."""
    tiny: dict[str, Any] | None = None
    """Local model: :class:`~zoo.blocks.mllm.TinyVLMConfig` options of a random toy model (tests)."""
    max_new_tokens: int = 1024
    """Local model: longest reply in tokens (DIM's open designers allow 8192)."""
    device: str = "cpu"
    """Local model: where it runs, e.g. ``cuda`` (each rank's current GPU) or ``cpu``."""
    torch_dtype: TorchDtype = "float32"
    """Local model: dtype of its weights."""

    def __post_init__(self) -> None:
        for name, choices in (("kind", ChatKind), ("image_format", ImageFormat), ("torch_dtype", TorchDtype)):
            check_choice(name, getattr(self, name), choices)
        check_positive("timeout", self.timeout)
        check_range("max_retries", self.max_retries, low=0)
        if self.temperature is not None:
            check_range("temperature", self.temperature, low=0)
        if self.max_tokens is not None:
            check_range("max_tokens", self.max_tokens, low=1)
        check_positive("max_image_bytes", self.max_image_bytes)
        check_range("max_new_tokens", self.max_new_tokens, low=1)
        if self.kind == "openai":
            if not self.base_url or not self.model:
                raise ConfigError(
                    "a chat client of kind 'openai' needs base_url and model, e.g. base_url: "
                    "https://api.openai.com/v1, model: gpt-4o-2024-11-20"
                )
            if not self.base_url.startswith(("http://", "https://")):
                raise ConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")


def build_chat_client(config: ChatConfig) -> ChatClient:
    """The client ``config.kind`` names: the one place the designer and the judges build one."""
    if config.kind == "local":
        return LocalVLMChatClient(config)
    return OpenAIChatClient(config)


def complete_many(
    client: ChatClient,
    contents: Sequence[Sequence[ChatPart]],
    *,
    system: str | None = None,
    max_workers: int = 8,
    progress: str | None = None,
) -> list[str | ChatError]:
    """Run ``client.complete`` on many user turns concurrently; results keep the input order.

    A call that fails gives its :class:`ChatError` in place of the reply, so a caller (a judge over
    a whole benchmark) counts and logs the failures instead of losing the finished calls. Use
    ``max_workers=1`` for a :class:`LocalVLMChatClient`: one model cannot run two generations.
    ``progress`` (a label) shows a progress bar of the finished calls and a summary line
    (:func:`zoo.blocks.progress.counting`).
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")

    def one(content: Sequence[ChatPart]) -> str | ChatError:
        try:
            return client.complete(content, system=system)
        except ChatError as err:
            return err

    with counting(progress, len(contents), unit="calls") as advance, ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(one, content) for content in contents]
        for future in futures:
            future.add_done_callback(lambda _: advance())
        return [future.result() for future in futures]


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


NO_KEY = "no-key"
"""The ``api_key`` given to the SDK for a server without authentication (it insists on one)."""


class OpenAIChatClient:
    """A client of the OpenAI chat-completions protocol on ``openai.OpenAI`` / ``openai.AzureOpenAI``.

    The SDK retries HTTP 408/409/429/5xx, timeouts and failed connections ``max_retries`` times,
    honouring ``Retry-After``; a reply that arrives but holds no text (not JSON, no choices, content
    null) is asked again here, within the same budget of ``max_retries + 1`` requests.

    Args:
        config: the settings (``kind: openai``).
    """

    def __init__(self, config: ChatConfig) -> None:
        if config.kind != "openai":
            raise ConfigError(f"OpenAIChatClient needs a config of kind 'openai', got {config.kind!r}")
        assert config.base_url is not None and config.model is not None  # checked by ChatConfig
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        options: dict[str, Any] = {
            "api_key": NO_KEY,  # the real key is read at every call, see complete()
            "timeout": config.timeout,
            "max_retries": config.max_retries,
            "default_headers": config.extra_headers,
        }
        self._sdk: openai.OpenAI
        if config.azure_api_version is not None:
            self._sdk = openai.AzureOpenAI(azure_endpoint=self.base_url, api_version=config.azure_api_version, **options)
        else:
            self._sdk = openai.OpenAI(base_url=self.base_url, **options)

    def __repr__(self) -> str:
        return f"OpenAIChatClient({self.config!r})"

    def __reduce__(self) -> tuple[type[OpenAIChatClient], tuple[ChatConfig]]:
        # The SDK's HTTP client holds locks and sockets: a pickled (ddp_spawn) or deep-copied client
        # is rebuilt from its config instead.
        return type(self), (self.config,)

    @property
    def url(self) -> str:
        """The endpoint every request goes to (without the Azure ``api-version`` query)."""
        if self.config.azure_api_version is not None:
            return f"{self.base_url}/openai/deployments/{self.config.model}/chat/completions"
        return f"{self.base_url}/chat/completions"

    def complete(self, content: Sequence[ChatPart], *, system: str | None = None) -> str:
        """Send one user turn (images become base64 ``image_url`` parts, in order); return the reply,
        with any echo of the API key redacted.

        Raises:
            MissingAPIKeyError: the ``api_key_env`` variable is unset or blank.
            ChatError: a rejected request (4xx other than 408/409/429, with the server's message), or
                no usable reply after ``max_retries`` retries. Its message never holds the key, and it
                chains no SDK exception (whose message may).
            ValueError, TypeError: empty content, or an image that cannot be encoded.
        """
        key, secrets = self._api_key()
        reply = self._ask(key or NO_KEY, self._request(content, system), secrets)
        if isinstance(reply, ChatError):
            raise reply  # raised outside the SDK's except block, so no SDK exception is its context
        return reply

    def _ask(self, key: str, request: dict[str, Any], secrets: tuple[str, ...]) -> str | ChatError:
        """The redacted reply text, or the :class:`ChatError` describing why there is none."""
        attempts, budget, reason = 0, self.config.max_retries + 1, ""
        while attempts < budget:
            sdk = self._sdk.with_options(api_key=key, max_retries=budget - attempts - 1)
            try:
                raw = sdk.chat.completions.with_raw_response.create(**request)
            except openai.APIError as err:
                return self._error(err, attempts, secrets)
            attempts += raw.retries_taken + 1
            text, reason = _reply_text(raw.status_code, raw.text, secrets)
            if text is not None:
                return redact(text, secrets)
            if attempts < budget:
                # Asked again at once: a malformed reply says nothing about load, unlike a 429.
                log.warning("chat reply from %s is unusable (%s); asking again (%d/%d)", self.url, reason, attempts, budget)
        return self._failed(f"failed after {_count(attempts)}; last error: {reason}", 200, attempts)

    def _error(self, err: openai.APIError, earlier: int, secrets: tuple[str, ...]) -> ChatError:
        """The SDK's exception as a :class:`ChatError` whose text is redacted."""
        # The SDK numbers each request it sends in this header; the exception carries the last one.
        attempts = earlier + int(err.request.headers.get("x-stainless-retry-count", "0")) + 1
        if isinstance(err, openai.APITimeoutError):
            reason, status = f"no reply within timeout={self.config.timeout}s", None
        elif isinstance(err, openai.APIConnectionError):
            reason, status = f"connection failed ({type(err.__cause__ or err).__name__})", None
        elif isinstance(err, openai.APIStatusError):
            reason, status = f"HTTP {err.status_code}: {_server_message(err, secrets)}", err.status_code
        else:
            reason, status = shorten(err.message, 500, secrets), None
        if status is not None and attempts == 1:
            return self._failed(f"was rejected with {reason}", status, attempts)
        return self._failed(f"failed after {_count(attempts)}; last error: {reason}", status, attempts)

    def _failed(self, outcome: str, status: int | None, attempts: int) -> ChatError:
        return ChatError(f"chat request to {self.url} (model {self.config.model!r}) {outcome}", status=status, attempts=attempts)

    def _api_key(self) -> tuple[str | None, tuple[str, ...]]:
        """The stripped key and every form of it to hide, after registering them with the logs."""
        name = self.config.api_key_env
        if name is None:
            return None, ()
        raw = os.environ.get(name, "")
        if not raw.strip():
            raise MissingAPIKeyError(
                f"environment variable {name} holding the API key for {self.base_url} is not set: "
                f"export {name}=<key>, or set api_key_env to null for a server without authentication"
            )
        secrets = key_forms(raw)
        hide_in_logs(secrets)
        return raw.strip(), secrets

    def _request(self, content: Sequence[ChatPart], system: str | None) -> dict[str, Any]:
        """Keyword arguments of ``chat.completions.create``; unset options are left to the server."""
        if isinstance(content, str) or not content:
            raise ValueError("content must be a non-empty list of texts and images (one user turn)")
        parts: list[dict[str, Any]] = []
        for part in content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            else:
                url = encode_image(part, self.config.image_format, self.config.max_image_bytes)
                parts.append({"type": "image_url", "image_url": {"url": url}})
        messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": parts})
        request: dict[str, Any] = {"model": self.config.model, "messages": messages}
        for name in ("temperature", "seed", "max_tokens"):
            if getattr(self.config, name) is not None:
                request[name] = getattr(self.config, name)
        return request


class LocalVLMChatClient:
    """A chat client running a transformers VLM in-process (:class:`~zoo.blocks.mllm.VLMEncoder`).

    The open-designer path of DIM (Qwen/InternVL/MiMo/GLM, greedy decoding: the
    ``get_cot_from_designer_*`` methods of ``showlab/DIM@28e644f:models/modeling_dim.py:854-1092``) and
    a local judge. Decoding is greedy, so replies are deterministic. One call runs at a time: use
    ``complete_many(..., max_workers=1)``.

    Args:
        config: the settings (``kind: local``): ``pretrained`` or ``tiny``, ``max_new_tokens``,
            ``device`` and ``torch_dtype``.
    """

    def __init__(self, config: ChatConfig) -> None:
        if config.kind != "local":
            raise ConfigError(f"LocalVLMChatClient needs a config of kind 'local', got {config.kind!r}")
        # Imported here so remote-only users (API judges, designer) never load transformers.
        from zoo.blocks.mllm import TinyVLMConfig, VLMConfig, VLMEncoder

        tiny = TinyVLMConfig(**config.tiny) if config.tiny is not None else None
        vlm = VLMConfig(pretrained=config.pretrained, tiny=tiny, torch_dtype=config.torch_dtype)
        self.vlm = VLMEncoder(vlm).to(config.device)
        self.max_new_tokens = config.max_new_tokens

    def complete(self, content: Sequence[ChatPart], *, system: str | None = None) -> str:
        """Greedy reply to one user turn (texts and images, in the order given) after an optional
        system prompt, at most ``max_new_tokens`` long.

        ImgEdit-Judge reads ``[rubric, original, result]`` (its usage example,
        ``PKU-YuanGroup/ImgEdit@547185d:README.md:276-302``), so images keep their place among the
        texts. That official example passes only ``max_new_tokens`` to ``generate``: the
        checkpoint's own generation settings (stop tokens, repetition penalty) apply, except that
        decoding is greedy so replies are deterministic.

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


def _count(attempts: int) -> str:
    """``1 attempt``, ``3 attempts``."""
    return f"{attempts} attempt{'s' if attempts != 1 else ''}"


def _reply_text(status: int, body: str, secrets: tuple[str, ...]) -> tuple[str | None, str]:
    """``(choices[0].message.content, "")`` or ``(None, why it is missing)`` for a 2xx reply."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, f"HTTP {status} reply is not JSON: {shorten(body, 200, secrets)!r}"
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, f"reply has no choices[0].message.content: {shorten(json.dumps(data), 200, secrets)}"
    if not isinstance(text, str):
        finish = shorten(repr(choice.get("finish_reason")), 50, secrets)
        return None, f"reply content is {shorten(repr(text), 200, secrets)} (finish_reason={finish})"
    return text, ""


def _server_message(err: openai.APIStatusError, secrets: tuple[str, ...]) -> str:
    """The ``error.message`` of an OpenAI error body, else the start of the raw body; redacted."""
    body = err.body
    if isinstance(body, dict) and "message" in body:
        text = str(body["message"])
    elif isinstance(body, str) and body:
        text = body
    else:
        text = err.response.text or err.response.reason_phrase or "(empty body)"
    return shorten(text, 500, secrets)
