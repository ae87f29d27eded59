"""A local stand-in for the OpenAI Chat Completions API, for tests that use the real ``openai`` client.

It listens on 127.0.0.1 (a free port), answers ``POST /v1/chat/completions`` from a script of
:class:`Reply` objects (then from ``responder``, if set), and records every request it received,
headers included, so tests can check what the client sent (retries, the Authorization header)::

    with OpenAIStandIn() as api:
        api.script(Reply.error(429), Reply.chat('{"faces": []}'))
        client = openai.OpenAI(api_key="sk-test", base_url=api.base_url)
        ...
        assert len(api.requests) == 2
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
    404: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error",
}


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or the raw text when it is not JSON
    received_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", []) if isinstance(self.body, dict) else []


@dataclass
class Reply:
    """One scripted answer: a status, a JSON body (or raw text), extra headers, and a delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (longer than the client's timeout = a timeout)

    @classmethod
    def chat(cls, content: str | None, *, model: str = "gpt-stand-in", finish_reason: str = "stop",
             refusal: str | None = None, delay: float = 0.0) -> Reply:
        """A well-formed ``chat.completion`` whose assistant message is ``content`` (any text)."""
        return cls(200, chat_completion(content, model=model, finish_reason=finish_reason, refusal=refusal),
                   delay=delay)

    @classmethod
    def error(cls, status: int, message: str | None = None, *, code: str | None = None,
              param: str | None = None, retry_after: float | None = 0.01, delay: float = 0.0) -> Reply:
        """An OpenAI-style error body; 429 and 5xx carry ``Retry-After`` (seconds) so retries are quick."""
        body = {"error": {"message": message or f"stand-in error {status}",
                          "type": ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}}
        headers = {}
        if retry_after is not None and (status == 429 or status >= 500):
            headers["Retry-After"] = f"{retry_after:g}"
        return cls(status, body, headers, delay)


def chat_completion(content: str | None, *, model: str = "gpt-stand-in", finish_reason: str = "stop",
                    refusal: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object as the API returns it."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_standin",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": refusal},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


class OpenAIStandIn:
    """A threaded HTTP server speaking the Chat Completions protocol on a free loopback port."""

    def __init__(self, responder: Callable[[RecordedRequest], Reply] | None = None) -> None:
        self.requests: list[RecordedRequest] = []
        self.responder = responder
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a handler still sleeping out a "timeout" must not block close
        self._thread: threading.Thread | None = None

    # -- lifecycle
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAIStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- script
    def script(self, *replies: Reply) -> None:
        """Queue replies, answered in order, one per request."""
        with self._lock:
            self._script.extend(replies)

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._script:
                return self._script.popleft()
        if self.responder is not None:
            return self.responder(request)
        return Reply.error(500, "stand-in: no scripted reply left", retry_after=None)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output clean
                pass

            def _send(self, reply: Reply) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.body if isinstance(reply.body, (str, bytes)) else json.dumps(reply.body)
                data = payload.encode() if isinstance(payload, str) else payload
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:12]}")
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
                try:
                    body: Any = json.loads(raw)
                except json.JSONDecodeError:
                    body = raw
                request = RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                          body, time.monotonic())
                if self.path.rstrip("/") != "/v1/chat/completions":
                    with standin._lock:
                        standin.requests.append(request)
                    self._send(Reply.error(404, f"stand-in serves /v1/chat/completions, not {self.path}"))
                    return
                self._send(standin._next_reply(request))

            def do_GET(self) -> None:  # noqa: N802
                self._send(Reply.error(404, "stand-in serves POST /v1/chat/completions only"))

        return Handler
