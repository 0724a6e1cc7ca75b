"""VLM judges of edited images: a chat judge (an OpenAI-compatible API or a local VLM) and a toy judge.

The benchmarks (ImgEdit-Bench §5 of the ImgEdit paper; GEdit-Bench, VIEScore-style, Step1X-Edit §5)
score an edit by asking a VLM a rubric question about the source and edited images and parsing
its text reply. A :class:`Judge` answers a list of :class:`JudgeRequest` with one raw reply (or a
:class:`~zoo.blocks.chat.ChatError`) each; parsing and aggregation belong to the benchmark
callbacks, so every judge goes through the same parser.

- :class:`ChatJudge`: the chat client a :class:`JudgeConfig` describes: GPT-4.1/4o, a vLLM-served
  ImgEdit-Judge or Qwen2.5-VL over the OpenAI protocol (retries, ``Retry-After``, API key from a
  named variable), or with ``kind: local`` a Qwen2.5-VL checkpoint in-process (ImgEdit-Judge is a
  Qwen2.5-VL-7B fine-tune; texts and images are sent in order).
- :class:`ToyJudge`: on the toy dataset the exact ground truth (the toy edit score) replaces the
  VLM: it writes the reply a perfect judge would write in the benchmark's answer format, so the
  whole evaluator pipeline, parser included, runs offline with meaningful numbers.

Chat judges keep a per-request cache on disk (``<cache_dir>/<hash[:2]>/<hash>.json``, keyed by the
judge model, system prompt, texts and image pixels), so a rerun never asks the same question twice;
only successful replies are cached, so failures are retried on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zoo.blocks.chat import (
    ChatConfig,
    ChatError,
    ChatPart,
    ImageFormat,
    MissingAPIKeyError,
    build_chat_client,
    complete_many,
    to_pil,
)
from zoo.blocks.config import ConfigError, TorchDtype, check_range

log = logging.getLogger(__name__)


@dataclass
class JudgeRequest:
    """One question to a judge.

    Attributes:
        task: answer format asked for: ``imgedit_basic``, ``imgedit_uge``, ``imgedit_multiturn``,
            ``gedit_sc`` or ``gedit_pq``.
        content: the user turn (rubric text and images, in the order sent).
        fields: names of the scores the rubric asks for (ImgEdit basic: its 3 dimensions;
            multi-turn: its yes/no criteria).
        truth: toy ground truth ``{"edit", "preserve", "score"}`` in [0, 1] (only the toy judge reads it).
    """

    task: str
    content: list[ChatPart]
    fields: tuple[str, ...] = ()
    truth: dict[str, float] | None = None


class Judge:
    """Answers judge requests; subclasses implement :meth:`ask`.

    Attributes:
        needs_truth: the judge reads ``JudgeRequest.truth`` (toy ground truth) instead of images.
    """

    needs_truth: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def ask(self, requests: list[JudgeRequest]) -> list[str | ChatError]:
        """One raw reply per request, in order; a failed call gives its :class:`ChatError`."""
        raise NotImplementedError

    def set_default_cache(self, folder: str | os.PathLike[str]) -> None:
        """Use ``folder`` as the reply cache unless one was configured (evaluators call this)."""

    def preflight(self) -> None:
        """Check that the judge can answer at all, before any edit is generated (evaluators call
        this first); raises :class:`JudgeUnavailableError`. Judges without a backend pass."""


@dataclass
class JudgeConfig(ChatConfig):
    """The chat client of a judge: :class:`~zoo.blocks.chat.ChatConfig` with the official scorers'
    defaults. ``model``: ``gpt-4.1`` (the ImgEdit paper and GEdit's scorer), ``gpt-4o`` (ImgEdit's
    script) or the served name of ImgEdit-Judge / Qwen2.5-VL; GEdit's GPT scorer sends
    ``max_tokens: 1400`` (``recipes/eval/gedit_bench.yaml``)."""

    timeout: float = 120.0
    """Seconds per request (a judge turn carries two full-size images)."""
    max_retries: int = 8
    """Retries after the first attempt, as in ChatConfig; more, as a benchmark run meets rate limits for minutes."""
    temperature: float | None = None
    """Null leaves the server default, as both official scorers do."""
    image_format: ImageFormat = "png"
    """``png`` (ImgEdit's script labels its images PNG) or ``jpeg`` (GEdit's scorer)."""
    max_new_tokens: int = 2048
    """Local judge: reply limit (ImgEdit-Judge's script allows 2048)."""
    torch_dtype: TorchDtype = "bfloat16"
    """Local judge: dtype of its weights."""


def _identity(config: ChatConfig) -> str:
    """What distinguishes a judge's answers in the reply cache: the model and the sampling settings.

    The seed is included only when set, so caches written before it was part of the key stay valid.
    """
    if config.kind == "local":
        source = config.pretrained or f"tiny:{json.dumps(config.tiny, sort_keys=True)}"
        return json.dumps({"local": source, "max_new_tokens": config.max_new_tokens})
    sampling = {"temperature": config.temperature, "max_tokens": config.max_tokens, "image_format": config.image_format}
    seed = {"seed": config.seed} if config.seed is not None else {}
    return json.dumps({"model": config.model, **sampling, **seed})


PREFLIGHT_PROMPT = "Reply with the word OK."
"""The one request :meth:`ChatJudge.preflight` sends before an evaluation generates anything."""


class JudgeUnavailableError(ConfigError):
    """The judge failed its pre-flight request: one ``zoo: error:`` line, before any generation."""


class ChatJudge(Judge):
    """A judge over the chat client ``client`` describes, with the on-disk reply cache and a
    concurrency limit.

    Args:
        client: the judge's chat client: ``kind: openai`` (OpenAI, Azure, vLLM, SGLang, OpenRouter)
            or ``kind: local`` (a Qwen2.5-VL checkpoint in-process).
        cache_dir: reply cache folder; None: the evaluator's ``<results>/judge_cache``.
        max_workers: concurrent requests (ImgEdit's script uses 32 processes, GEdit's 5 threads);
            a local model runs one generation at a time whatever this says.
        system: optional system prompt sent with every request (the official scorers send none).
    """

    def __init__(
        self,
        client: JudgeConfig,
        cache_dir: str | None = None,
        max_workers: int = 8,
        system: str | None = None,
    ) -> None:
        check_range("max_workers", max_workers, low=1)
        self.config = client
        self.client = build_chat_client(client)
        self.identity = _identity(client)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_workers = 1 if client.kind == "local" else max_workers
        self.system = system
        self.calls = 0

    @property
    def name(self) -> str:
        return self.identity

    def set_default_cache(self, folder: str | os.PathLike[str]) -> None:
        if self.cache_dir is None:
            self.cache_dir = Path(folder)

    def preflight(self) -> None:
        """One short request to a remote judge, so a missing key, a wrong URL or model name fails in
        seconds, not after hours of generation (a local judge was loaded when it was built)."""
        if self.config.kind == "local":
            return
        try:
            self.client.complete([PREFLIGHT_PROMPT])
        except (ChatError, MissingAPIKeyError, OSError) as error:
            raise JudgeUnavailableError(f"the judge cannot answer ({error}); nothing was generated") from None

    def cache_key(self, request: JudgeRequest) -> str:
        """sha256 over the judge identity, system prompt, texts and image pixels (not file bytes)."""
        digest = hashlib.sha256(json.dumps([self.identity, self.system]).encode())
        for part in request.content:
            if isinstance(part, str):
                digest.update(b"text:" + part.encode())
            else:
                image = to_pil(part)
                digest.update(f"image:{image.size}:".encode() + image.tobytes())
        return digest.hexdigest()

    def _cache_file(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def ask(self, requests: list[JudgeRequest]) -> list[str | ChatError]:
        replies: list[str | ChatError | None] = [None] * len(requests)
        keys = [self.cache_key(r) for r in requests]
        misses = []
        for i, key in enumerate(keys):
            path = self._cache_file(key)
            if path is not None and path.is_file():
                try:
                    replies[i] = json.loads(path.read_text())["reply"]
                    continue
                except (ValueError, KeyError):
                    log.warning("ignored corrupt judge cache entry %s", path)
            misses.append(i)
        if misses:
            self.calls += len(misses)
            answers = complete_many(
                self.client, [requests[i].content for i in misses], system=self.system, max_workers=self.max_workers,
                progress=f"judging ({self.config.model}; {len(requests) - len(misses)} cached)",
            )
            for i, answer in zip(misses, answers):
                replies[i] = answer
                path = self._cache_file(keys[i])
                if path is not None and isinstance(answer, str):
                    _write_atomic(path, json.dumps({"reply": answer, "judge": self.identity}))
        return replies  # type: ignore[return-value]


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed run never leaves a half-written entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    Path(handle.name).replace(path)


def _five(x: float) -> int:
    """A [0, 1] ground-truth score on ImgEdit's 1-5 scale."""
    return 1 + round(4 * min(max(x, 0.0), 1.0))


def _ten(x: float) -> int:
    """A [0, 1] ground-truth score on VIEScore's 0-10 scale."""
    return round(10 * min(max(x, 0.0), 1.0))


class ToyJudge(Judge):
    """Writes the reply a perfect judge would give on toy data, from the exact ground truth.

    Mapping of the toy edit score (``edit``: the requested change happened, ``preserve``: the rest
    was kept, ``score``: their mean) onto each benchmark's dimensions:

    - ImgEdit basic: 1st dimension (instruction compliance) = edit, 2nd (naturalness /
      preservation) = preserve, 3rd (integrity / quality) = score, each ``1 + round(4x)``;
    - ImgEdit UGE: ``Score: 1 + round(4 * score)``; multi-turn: yes when edit (1st criterion) or
      preserve (2nd) is at least 0.5;
    - GEdit SC: ``[10 edit, 10 preserve]``; PQ: ``[10 score, 10 preserve]`` (rounded, VIEScore JSON).
    """

    needs_truth = True

    def ask(self, requests: list[JudgeRequest]) -> list[str | ChatError]:
        return [self._answer(r) for r in requests]

    def _answer(self, request: JudgeRequest) -> str:
        if request.truth is None:
            raise ValueError(
                "the toy judge needs ground truth: evaluate toy data (shards from `zoo data toy`, with "
                "targets and edit-region masks) or use an HTTP/local judge"
            )
        edit, preserve, score = (request.truth[k] for k in ("edit", "preserve", "score"))
        if request.task == "imgedit_basic":
            lines = [f"{name}: {_five(v)}" for name, v in zip(request.fields, (edit, preserve, score))]
            return "\n".join(["Brief reasoning: exact toy ground truth.", *lines])
        if request.task == "imgedit_uge":
            return f"Brief reasoning: exact toy ground truth.\nScore: {_five(score)}"
        if request.task == "imgedit_multiturn":
            verdicts = ("yes" if v >= 0.5 else "no" for v in (edit, preserve))
            return "\n".join(f"{name}: {v}" for name, v in zip(request.fields, verdicts))
        if request.task == "gedit_sc":
            return json.dumps({"score": [_ten(edit), _ten(preserve)], "reasoning": "exact toy ground truth"})
        if request.task == "gedit_pq":
            return json.dumps({"score": [_ten(score), _ten(preserve)], "reasoning": "exact toy ground truth"})
        raise ValueError(f"the toy judge has no answer format for task {request.task!r}")
