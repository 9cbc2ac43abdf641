"""A local OpenAI-compatible chat server for tests: deterministic answers, injectable faults.

`POST /v1/chat/completions` answers from the request alone:
- a request with `response_format` (the window assistant) gets JSON content
  `{"suggested_reply": "Re: <last line's text>", "summary": "<n> lines, last from <sender>"}`
  built from the last user message, a transcript of `sender: text` lines;
- any other request (a translation) gets `[<lang>] <text>`, where `<lang>` is the code quoted in
  the system prompt (`... code 'es' ...`) and `<text>` the last user message.

Faults are queued with `inject(kind, times=..., match=...)` and consumed by the next matching
requests: `429` and `500` (with `Retry-After` seconds when given), `hang` (sleeps `hang_seconds`
or until the server stops), `malformed` (HTTP 200 whose content is truncated JSON), `fenced` (the
normal content inside a Markdown ```json code fence, as some models answer), `slow` (answers
normally after `delay` more seconds). The server counts requests, tracks the most requests in
flight at once and keeps every JSON payload, its headers (names lower-cased) and its arrival time (monotonic);
`GET /stats` answers `{"requests", "max_in_flight"}`, for a server in another process (`python
fake_openai.py [latency]` prints its base URL and serves until interrupted).
Bound to 127.0.0.1 on a free port; run in a background thread by `start()`, ended by `stop()`.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

FaultKind = Literal["429", "500", "hang", "malformed", "fenced", "slow"]
_LANG = re.compile(r"code '([^']+)'")


@dataclass
class Fault:
    kind: FaultKind
    times: int
    match: str | None
    retry_after: float | None
    delay: float


def answer_content(payload: dict[str, Any]) -> str:
    """The deterministic assistant content for a chat request."""
    messages = payload.get("messages", [])
    last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    if "response_format" in payload:
        lines = [line for line in str(last).splitlines() if line.strip()]
        sender, _, text = (lines[-1] if lines else ": ").partition(": ")
        return json.dumps({"suggested_reply": f"Re: {text}", "summary": f"{len(lines)} lines, last from {sender}"})
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    found = _LANG.search(str(system))
    return f"[{found.group(1) if found else '?'}] {last}"


def completion(model: str, content: str, number: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake-{number}",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class FakeOpenAI:
    """The server and what it saw. `latency` (seconds) delays every answer.

    `gather`, when set, holds every request until that many have been in flight at once (a one-time
    barrier), so a test sees a client's concurrency reached whatever the machine's speed; a client
    that never gets there is held for `gather_bound` seconds (that only bounds a failing test).
    """

    def __init__(self, *, latency: float = 0.0, hang_seconds: float = 3600.0) -> None:
        self.latency = latency
        self.gather = 0
        self.gather_bound = 60.0
        self.hang_seconds = hang_seconds
        self.requests = 0
        self.hanging = 0
        """Requests held by a `hang` fault right now: a client that returned while one is held was not waiting on it."""
        self.in_flight = 0
        self.max_in_flight = 0
        self.payloads: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._gathered = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="fake-openai", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release hanging requests and close open keep-alive connections."""
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, kind: FaultKind, *, times: int = 1, match: str | None = None,
               retry_after: float | None = None, delay: float = 0.0) -> None:
        """Make the next `times` requests (whose body contains `match`, if given) fail with `kind`."""
        with self._lock:
            self._faults.append(Fault(kind, times, match, retry_after, delay))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.max_in_flight = 0
            self.payloads.clear()
            self.headers.clear()
            self.arrivals.clear()

    def _take_fault(self, body: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.match is None or fault.match in body:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _enter(self, payload: dict[str, Any], headers: dict[str, str]) -> int:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.payloads.append(payload)
            self.headers.append(headers)
            self.arrivals.append(time.monotonic())
            self._gathered.notify_all()
            return self.requests

    def _wait_for_gather(self) -> None:
        """Hold a request until `gather` requests have been in flight at once (see the class)."""
        with self._gathered:
            self._gathered.wait_for(lambda: self.max_in_flight >= self.gather or self._stopping.is_set(),
                                    timeout=self.gather_bound)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    fake: FakeOpenAI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle + delayed ACK adds ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._lock:
            self.server.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        pass

    def do_GET(self) -> None:
        fake = self.server.fake
        if self.path.rstrip("/") != "/stats":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        with fake._lock:
            stats = {"requests": fake.requests, "max_in_flight": fake.max_in_flight}
        self._send(200, stats)

    def do_POST(self) -> None:
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        payload = json.loads(raw)
        number = fake._enter(payload, {k.lower(): v for k, v in self.headers.items()})
        try:
            fault = fake._take_fault(raw)
            if fake.gather:
                fake._wait_for_gather()
            if fake.latency:
                fake._stopping.wait(fake.latency)
            if fault is not None and fault.kind == "slow":
                fake._stopping.wait(fault.delay)
            if fault is not None and fault.kind == "hang":
                with fake._lock:
                    fake.hanging += 1
                fake._stopping.wait(fake.hang_seconds)
                with fake._lock:
                    fake.hanging -= 1
                self.close_connection = True
                return
            if fault is not None and fault.kind in ("429", "500"):
                extra = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
                message = "rate limited" if fault.kind == "429" else "internal error"
                self._send(int(fault.kind), {"error": {"message": f"fake {message}", "type": "fake"}}, extra)
                return
            content = answer_content(payload)
            if fault is not None and fault.kind == "malformed":
                content = '{"suggested_reply": "cut sh'
            if fault is not None and fault.kind == "fenced":
                content = f"```json\n{content}\n```"
            self._send(200, completion(payload.get("model", "fake"), content, number))
        finally:
            fake._leave()

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True


if __name__ == "__main__":
    import sys

    server = FakeOpenAI(latency=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0).start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
