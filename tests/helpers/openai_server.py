"""A scripted OpenAI chat-completions server on 127.0.0.1 for tests of remote VLM calls.

It speaks the real protocol over a real socket (threaded ``http.server`` on an ephemeral port), so
the client under test runs its whole HTTP path; each request is answered by the next scripted
:class:`Reply` and recorded for assertions. Used by the chat client, the designer and the judges.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    """One scripted answer: ``body`` is sent as JSON, ``raw`` as-is; ``delay`` seconds before it."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Request:
    """One request as the server received it; header names lower-cased (HTTP ignores their case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


def completion(text: str | None, finish_reason: str = "stop") -> Reply:
    """A successful chat completion whose ``choices[0].message.content`` is ``text``."""
    return Reply(
        body={
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "test-model",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    """An OpenAI-style error body ``{"error": {"message": ...}}`` with ``status``."""
    return Reply(status=status, body={"error": {"message": message, "type": "test_error"}}, headers=headers or {})


class OpenAIServer:
    """Context manager serving scripted replies in order, then ``respond(request)`` if given;
    a request with neither gets HTTP 599.

    Use as ``with OpenAIServer(completion("hi")) as server:`` and point the client at
    ``server.base_url``; ``server.requests`` then holds what was sent.
    """

    def __init__(self, *replies: Reply, respond: Callable[[Request], Reply] | None = None) -> None:
        self._replies = list(replies)
        self._respond = respond
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                request = Request("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with server._lock:
                    server.requests.append(request)
                    scripted = server._replies.pop(0) if server._replies else None
                if scripted is not None:
                    reply = scripted
                elif server._respond is not None:
                    reply = server._respond(request)
                else:
                    reply = error(599, "no scripted reply left")
                time.sleep(reply.delay)
                data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout test); nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll keeps shutdown() (waited on by every test) from costing half a second.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def add(self, *replies: Reply) -> None:
        """Script more replies after those already queued."""
        with self._lock:
            self._replies.extend(replies)

    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
