"""A local HTTP server standing in for SendGrid, Twilio and the agency, so the real SDKs run.

It records every request and answers like the providers do, unless a test scripts another answer
for a path (a status, a body, headers, or a delay long enough to provoke a read timeout).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def default_reply(method: str, path: str, form: dict[str, str]) -> Reply:
    """What the real providers answer on success."""
    if path.endswith("/mail/send"):
        return Reply(202, b"", {"X-Message-Id": f"sg-{uuid.uuid4().hex[:16]}"})
    if path.endswith("/Messages.json") or path.endswith("/Calls.json"):
        prefix = "SM" if path.endswith("/Messages.json") else "CA"
        return Reply(201, {"sid": f"{prefix}{uuid.uuid4().hex}", "status": "queued",
                           "to": form.get("To"), "from": form.get("From"), "body": form.get("Body")})
    return Reply(200, {"id": f"agency-{uuid.uuid4().hex[:12]}"})


class FakeProvider:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._scripts: list[tuple[str, Reply]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                recorded = Recorded("POST", self.path, dict(self.headers.items()), body)
                reply = fake._reply_for(recorded)
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.body
                if not isinstance(payload, bytes):
                    payload = json.dumps(payload).encode() if payload is not None else b""
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def script(self, path_contains: str, status: int, body: Any = None,
               headers: dict[str, str] | None = None, delay: float = 0.0) -> None:
        """The next request whose path contains ``path_contains`` gets this reply (once)."""
        with self._lock:
            self._scripts.append((path_contains, Reply(status, body, headers or {}, delay)))

    def _reply_for(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.requests.append(recorded)
            for index, (needle, reply) in enumerate(self._scripts):
                if needle in recorded.path:
                    del self._scripts[index]
                    return reply
        form = recorded.form if b"=" in recorded.body and not recorded.body.startswith(b"{") else {}
        return default_reply(recorded.method, recorded.path, form)

    def to(self, path_contains: str) -> list[Recorded]:
        return [r for r in self.requests if path_contains in r.path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("TWILIO_EDGE", "TWILIO_REGION", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                 "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeProvider()
    yield fake
    fake.close()
