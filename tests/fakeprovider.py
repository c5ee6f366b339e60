"""A local HTTP server standing in for SendGrid, Twilio and the agency, so the real SDKs run.

It records every request and answers like the providers do, unless a test scripts another answer
for a path (a status, a body, headers, a delay long enough to provoke a read timeout, or a
connection dropped after the request was read).

It also keeps what it accepted on Twilio's behalf and answers Twilio's list requests
(``GET .../Messages.json`` and ``.../Calls.json``) from that, filtered the way Twilio filters, so
reconciliation runs through the real SDK too. A request whose answer was delayed or dropped is
kept from the moment it arrived: that is the "accepted, but the worker never heard" case.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

# Twilio's list resources: /2010-04-01/Accounts/{AccountSid}/Messages.json and /Calls.json
TWILIO_LIST = re.compile(r"^/2010-04-01/Accounts/(?P<account>[^/]+)/(?P<kind>Messages|Calls)\.json$")
# Date filters Twilio applies by whole UTC days: the query key, and the record's date it compares.
DATE_FILTERS = {"DateSent": "sent", "StartTime": "started", "EndTime": "ended"}


@dataclass
class Recorded:
    method: str
    path: str  # with the query string, as the client sent it
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}

    @property
    def query(self) -> dict[str, str]:
        """The query parameters (a GET list request's filters), first value of each."""
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}

    @property
    def recipients(self) -> list[str]:
        """Who a POST was for: Twilio's ``To``, SendGrid's personalizations' addresses."""
        if self.body.startswith(b"{"):
            try:
                mail = self.json
            except ValueError:
                return []
            if isinstance(mail, dict):
                return [to.get("email", "") for p in mail.get("personalizations") or []
                        for to in p.get("to") or []]
            return []
        to = self.form.get("To") if b"=" in self.body else None
        return [to] if to else []


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False  # close the connection without answering (after ``delay``)
    accept: bool | None = None  # keep a Twilio create as accepted; None: if 2xx or dropped
    method: str | None = "POST"  # which requests the script applies to; None: any


@dataclass
class Accepted:
    """A message or call the fake Twilio accepted, with the dates Twilio would report."""

    kind: str  # "messages" or "calls"
    sid: str
    account_sid: str
    to: str | None
    from_: str | None
    body: str | None
    created: datetime
    queued: bool  # not handed to the carrier / not dialled yet: no date_sent / start_time

    @property
    def sent(self) -> datetime | None:
        return None if self.queued or self.kind != "messages" else self.created

    @property
    def started(self) -> datetime | None:
        return None if self.queued or self.kind != "calls" else self.created

    @property
    def ended(self) -> datetime | None:
        return None

    def json(self, *, as_created: bool = False) -> dict[str, Any]:
        """Twilio's JSON for the resource; ``as_created`` is the answer to the create itself."""
        queued = self.queued or as_created
        stamp = format_datetime(self.created)  # RFC 2822, "+0000", as Twilio writes it
        record: dict[str, Any] = {
            "sid": self.sid, "account_sid": self.account_sid, "to": self.to, "from": self.from_,
            "date_created": stamp, "date_updated": stamp,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/{self.kind.title()}/{self.sid}.json",
        }
        if self.kind == "messages":
            record.update(body=self.body, direction="outbound-api", num_segments="1",
                          status="queued" if queued else "sent",
                          date_sent=None if queued else stamp)
        else:
            record.update(direction="outbound-api", status="queued" if queued else "in-progress",
                          start_time=None if queued else stamp, end_time=None)
        return record


def default_reply(method: str, path: str, form: dict[str, str]) -> Reply:
    """What SendGrid and the agency answer on success (Twilio's creates: ``_twilio_create``)."""
    if path.endswith("/mail/send"):
        return Reply(202, b"", {"X-Message-Id": f"sg-{uuid.uuid4().hex[:16]}"})
    return Reply(200, {"id": f"agency-{uuid.uuid4().hex[:12]}"})


class FakeProvider:
    """The server, what it recorded, and what it accepted.

    ``clock`` dates what is accepted (replace it to backdate); with ``keep_queued`` set, accepted
    texts and calls stay queued (no ``date_sent`` / ``start_time``), like a long-code backlog.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.keep_queued = False
        self._accepted: list[Accepted] = []
        self._scripts: list[tuple[str, Reply]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self._serve("POST")

            def do_GET(self) -> None:
                self._serve("GET")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded = Recorded(method, self.path, dict(self.headers.items()), body)
                reply = fake._reply_for(recorded)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True  # the socket closes with nothing written
                    return
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
               headers: dict[str, str] | None = None, delay: float = 0.0, *,
               drop: bool = False, method: str | None = "POST",
               accept: bool | None = None) -> None:
        """The next request whose path contains ``path_contains`` gets this reply (once).

        ``drop``: read the request, wait ``delay``, then close the connection without a word.
        ``method``: the requests it applies to ("POST" by default, as before GETs were served;
        "GET" for list lookups; None for either). ``accept``: whether a Twilio create counts as
        accepted (listed later); by default it does when the reply is 2xx or dropped, and it is
        kept from its arrival, however late the answer.
        """
        reply = Reply(status, body, headers or {}, delay, drop, accept,
                      method.upper() if method else None)
        with self._lock:
            self._scripts.append((path_contains, reply))

    def _reply_for(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.requests.append(recorded)
            scripted = None
            for index, (needle, reply) in enumerate(self._scripts):
                if needle in recorded.path and reply.method in (None, recorded.method):
                    scripted = self._scripts.pop(index)[1]
                    break
            route = TWILIO_LIST.match(urlsplit(recorded.path).path)
            if route and recorded.method == "POST":
                return self._twilio_create(recorded, route, scripted)
            if scripted is not None:
                return scripted
            if route and recorded.method == "GET":
                return self._twilio_list(recorded, route)
        if recorded.method == "GET":
            return Reply(404, {"code": 20404, "message": "The requested resource was not found",
                               "status": 404})
        form = recorded.form if b"=" in recorded.body and not recorded.body.startswith(b"{") else {}
        return default_reply(recorded.method, recorded.path, form)

    def _twilio_create(self, recorded: Recorded, route: re.Match[str],
                       scripted: Reply | None) -> Reply:
        """Answer a create and, when Twilio would have taken it, keep it for later lists."""
        kind = route["kind"].lower()
        form = recorded.form
        reply = scripted or Reply(201)
        accept = reply.accept if reply.accept is not None else (
            reply.drop or 200 <= reply.status < 300)
        given = reply.body.get("sid") if isinstance(reply.body, dict) else None
        record = Accepted(kind=kind, sid=given or f"{'SM' if kind == 'messages' else 'CA'}"
                          f"{uuid.uuid4().hex}", account_sid=route["account"], to=form.get("To"),
                          from_=form.get("From"), body=form.get("Body"), created=self.clock(),
                          queued=self.keep_queued)
        if accept:
            self._accepted.append(record)
        if scripted is None:
            return Reply(201, record.json(as_created=True))
        return scripted

    def _twilio_list(self, recorded: Recorded, route: re.Match[str]) -> Reply:
        """One page of what was accepted, filtered and ordered as Twilio does (newest first)."""
        kind = route["kind"].lower()
        query = recorded.query
        found = [a for a in self._accepted if a.kind == kind and a.account_sid == route["account"]]
        for key, attribute in (("To", "to"), ("From", "from_")):
            if key in query:
                found = [a for a in found if getattr(a, attribute) == query[key]]
        if "Status" in query:
            found = [a for a in found if a.json()["status"] == query["Status"]]
        for key, attribute in DATE_FILTERS.items():
            for suffix, keep in (("", date.__eq__), ("<", date.__le__), (">", date.__ge__)):
                if key + suffix in query:
                    day = date.fromisoformat(query[key + suffix][:10])
                    found = [a for a in found if (moment := getattr(a, attribute)) is not None
                             and keep(moment.date(), day)]
        found.sort(key=lambda a: a.created, reverse=True)
        size = int(query.get("PageSize") or 50)
        number = int(query.get("Page") or 0)
        chunk = found[number * size:(number + 1) * size]
        path = urlsplit(recorded.path).path
        filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

        def uri(page: int) -> str:
            return f"{path}?{urlencode({**filters, 'PageSize': size, 'Page': page})}"

        more = (number + 1) * size < len(found)
        return Reply(200, {
            kind: [a.json() for a in chunk], "page": number, "page_size": size,
            "start": number * size, "end": number * size + max(len(chunk) - 1, 0),
            "uri": uri(number), "first_page_uri": uri(0),
            "next_page_uri": uri(number + 1) if more else None,
            "previous_page_uri": uri(number - 1) if number > 0 else None,
        })

    def to(self, path_contains: str, method: str | None = "POST") -> list[Recorded]:
        """Requests whose path contains ``path_contains``: POSTs (sends) unless told otherwise."""
        return [r for r in self.requests if path_contains in r.path
                and (method is None or r.method == method.upper())]

    def accepted(self, kind: str, to: str | None = None) -> list[dict[str, Any]]:
        """What Twilio would list: ``kind`` "messages" or "calls", oldest first, as Twilio's JSON."""
        kind = {"sms": "messages", "voice": "calls"}.get(kind.lower(), kind.lower())
        with self._lock:
            return [a.json() for a in self._accepted
                    if a.kind == kind and (to is None or a.to == to)]

    def count_by_recipient(self, path_contains: str) -> dict[str, int]:
        """POSTs per recipient (Twilio ``To``, SendGrid address; "" when there is none)."""
        counts: Counter[str] = Counter()
        for request in self.to(path_contains):
            for recipient in request.recipients or [""]:
                counts[recipient] += 1
        return dict(counts)

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
