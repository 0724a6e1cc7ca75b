"""Keeping API keys out of every message, log line and displayed text the zoo produces.

A key reaches text in three ways: a server echoes the key it rejected (OpenAI's 401 body does), a
server or proxy echoes it in a reply or a header, and the environment variable holds it with
stray whitespace (``export KEY="sk-...\\n"``), so the form sent differs from the form stored.

- :func:`key_forms`: the raw, stripped and escaped forms of a key (and the pieces of one with a
  line break inside), all of which must be hidden.
- :func:`redact` / :func:`shorten`: the text with every form replaced, and a display-length cut
  of it that also hides a key prefix left at the cut (or at the end of a server's own cut echo).
- :func:`hide_in_logs`: one log-record factory hides registered keys from every logger, the
  ``openai`` SDK's and its HTTP stack's included (they log response headers at DEBUG). A record
  factory rather than a logging filter because a filter only sees records of the logger it is
  attached to, and the HTTP stack creates its loggers lazily under names that vary by version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "[redacted]"
"""What stands in the place of a key."""

MIN_FRAGMENT = 8
"""Shortest key prefix hidden where a text ends (a shorter one is too common to be telling)."""


def key_forms(raw: str) -> tuple[str, ...]:
    """The distinct non-empty forms of a key read from the environment that must be hidden: as
    stored and stripped; both escaped as ``repr`` writes them (the HTTP stack rejects a key with a
    line break inside, and its error, logged at DEBUG, shows ``b'Bearer sk-...\\n...'``); and each
    whitespace-separated piece of at least :data:`MIN_FRAGMENT` characters (what is left of such a
    key once a line-based tool splits it)."""
    stripped = raw.strip()
    escaped = (form.encode("unicode_escape").decode("ascii") for form in (raw, stripped))
    pieces = (piece for piece in stripped.split() if len(piece) >= MIN_FRAGMENT)
    return tuple(form for form in dict.fromkeys((raw, stripped, *escaped, *pieces)) if form)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by :data:`REDACTED` (longest first,
    so a stripped key inside its raw form does not leave the whitespace-padded remainder)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def shorten(text: str, limit: int, secrets: Iterable[str]) -> str:
    """At most ``limit`` characters of ``text`` for display, redacted before it is cut.

    Cutting first could split a key so that no full form matches any more; and a key prefix of at
    least :data:`MIN_FRAGMENT` characters left at the end (by this cut or by the server's own) is
    hidden as well.
    """
    secrets = tuple(secrets)
    text = redact(text, secrets)
    cut = text[:limit]
    for secret in secrets:
        for length in range(len(secret), min(MIN_FRAGMENT, len(secret)) - 1, -1):
            if cut.endswith(secret[:length]):
                cut = cut[:-length] + REDACTED
                break
    return cut + ("..." if len(text) > limit else "")


class _RedactingRecordFactory:
    """Wraps the current log-record factory; rewrites a record whose text holds a registered key."""

    def __init__(self, previous: Callable[..., logging.LogRecord]) -> None:
        self.previous = previous
        self.secrets: tuple[str, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        secrets = self.secrets  # one read: another thread may register a key meanwhile
        if not secrets:
            return record
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return record  # a malformed log call; the handler reports it
        if any(secret in message for secret in secrets):
            record.msg, record.args = redact(message, secrets), None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            if any(secret in text for secret in secrets):
                record.exc_text = redact(text, secrets)
        if record.stack_info and any(secret in record.stack_info for secret in secrets):
            record.stack_info = redact(record.stack_info, secrets)
        return record


_lock = threading.Lock()
_factory: _RedactingRecordFactory | None = None


def hide_in_logs(secrets: Iterable[str]) -> None:
    """Hide ``secrets`` from every log record created from now on, by any logger of the process."""
    global _factory
    with _lock:
        if _factory is None or logging.getLogRecordFactory() is not _factory:
            _factory = _RedactingRecordFactory(logging.getLogRecordFactory())
            logging.setLogRecordFactory(_factory)
        new = tuple(secret for secret in secrets if secret not in _factory.secrets)
        if new:
            _factory.secrets = (*_factory.secrets, *new)
