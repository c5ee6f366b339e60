"""The HTTP API over real HTTP (uvicorn on a loopback port, ``requests`` as the client) against the
time-skipping dev server and a running worker."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import requests
from pydantic import SecretStr

from api import Background, parse_keys
from settings import Settings
from tests.conftest import Harness, running, sample_invoice

KEY = "ops:s3cret-key-for-tests-0001"


@dataclass
class Api:
    base: str
    harness: Harness

    def call(self, method: str, path: str, *, key: str | None = KEY.partition(":")[2],
             json: Any = None, headers: dict[str, str] | None = None) -> requests.Response:
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        return requests.request(method, self.base + path, json=json, headers=sent, timeout=30)

    async def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return await asyncio.to_thread(self.call, method, path, **kwargs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def api(time_env: Any, settings: Settings) -> AsyncIterator[Api]:
    address = time_env.client.service_client.config.target_host
    settings = settings.model_copy(update={"temporal_address": address, "api_keys": SecretStr(KEY)})
    async with (running(time_env, settings) as harness,
                Background(settings, host="127.0.0.1", port=free_port()) as served):
        yield Api(served.url, harness)


def test_keys_need_a_value_and_may_be_named():
    with pytest.raises(ValueError, match="DUNNING_API_KEYS"):
        parse_keys("")
    with pytest.raises(ValueError, match="16 characters"):
        parse_keys("short")
    keys = parse_keys("ops:0123456789abcdef, 0123456789ABCDEFGH")
    assert keys["0123456789abcdef"] == "ops"
    assert keys["0123456789ABCDEFGH"].startswith("key-")


async def test_no_key_no_answer_but_health_is_open(api: Api):
    assert (await api("GET", "/v1/invoices/INV-1", key=None)).status_code == 401
    wrong = await api("GET", "/v1/invoices/INV-1", key="not-the-key-0000000")
    assert wrong.status_code == 401 and "bearer key" in wrong.json()["detail"]
    health = await api("GET", "/healthz", key=None)
    assert health.status_code == 200 and health.json() == {"temporal": "ok", "database": "ok"}
    docs = await api("GET", "/openapi.json", key=None)
    assert "/v1/invoices/{invoice_id}/actions/{action}" in docs.json()["paths"]


async def test_start_status_pay_and_events(api: Api):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    first = await api("POST", "/v1/invoices", json=invoice)
    assert first.status_code == 201, first.text
    again = await api("POST", "/v1/invoices", json=invoice)
    assert again.status_code == 200 and "already" in again.json()["detail"]
    bad = await api("POST", "/v1/invoices", json=sample_invoice(currency="ZZZ"))
    assert bad.status_code == 422 and bad.json()["detail"].startswith("currency:")
    batch = await api("POST", "/v1/invoices", json=[sample_invoice(), {"invoice_id": "x"}])
    rows = batch.json()["results"]
    assert [r["status"] for r in rows] == [201, 422] and rows[1]["detail"].startswith("[1].")

    status = await api("GET", f"/v1/invoices/{invoice_id}")
    assert status.status_code == 200 and status.json()["state"] == "active"
    assert (await api("GET", "/v1/invoices/NOPE-1")).status_code == 404

    paid = await api("POST", f"/v1/invoices/{invoice_id}/payments",
                     json={"payment_id": "pi_9", "amount": "250.00", "currency": "USD"})
    assert paid.status_code == 200, paid.text
    assert paid.json()["outcome"] == "accepted"
    assert Decimal(paid.json()["status"]["balance_due"]) == Decimal("1000.00")
    missing = await api("POST", f"/v1/invoices/{invoice_id}/payments", json={"amount": "1.00"})
    assert missing.status_code == 422 and missing.json()["detail"] == "payment_id: required"
    wrong = await api("POST", f"/v1/invoices/{invoice_id}/payments",
                      json={"payment_id": "pi_10", "amount": "5.00", "currency": "EUR"})
    assert wrong.status_code == 422 and "currency" in wrong.json()["detail"]
    for field, value in (("currency", 978), ("currency", ["EUR"]), ("payment_id", ["pi_11"])):
        typed = await api("POST", f"/v1/invoices/{invoice_id}/payments",
                          json={"payment_id": "pi_11", "amount": "5.00", field: value})
        assert typed.status_code == 422 and typed.json()["detail"] == f"{field}: a string", typed.text

    events = await api("GET", f"/v1/invoices/{invoice_id}/events")
    accepted = [e for e in events.json() if (e["kind"], e["status"]) == ("payment", "accepted")]
    assert len(accepted) == 1 and "reported by api:ops" in accepted[0]["detail"]  # who asked


async def test_actions_answer_the_status_or_the_reason(api: Api):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    assert (await api("POST", "/v1/invoices", json=invoice)).status_code == 201
    paused = await api("POST", f"/v1/invoices/{invoice_id}/actions/pause", json={"reason": "call back"})
    assert paused.status_code == 200, paused.text
    assert paused.json()["state"] == "paused" and paused.json()["hold"]["actor"] == "api:ops"
    twice = await api("POST", f"/v1/invoices/{invoice_id}/actions/pause", json={"reason": "again"})
    assert twice.status_code == 409 and "resume it first" in twice.json()["detail"]
    resumed = await api("POST", f"/v1/invoices/{invoice_id}/actions/resume", json={})
    assert resumed.json()["state"] == "active"
    past = await api("POST", f"/v1/invoices/{invoice_id}/actions/promise",
                     json={"amount": "10.00", "by": "2020-01-01"})
    assert past.status_code == 422 and past.json()["detail"].startswith("by:")
    plan = await api("POST", f"/v1/invoices/{invoice_id}/actions/plan",
                     json={"instalments": [{"due_on": "2099-01-01", "amount": "1.00"}]})
    assert plan.status_code == 422 and plan.json()["detail"].startswith("instalments")
    assert (await api("POST", f"/v1/invoices/{invoice_id}/actions/dance", json={})).status_code == 404
    # a NUL cannot be stored by PostgreSQL: refused here, never a run retrying its records forever
    for action in ("pause", "cancel"):
        nul = await api("POST", f"/v1/invoices/{invoice_id}/actions/{action}", json={"reason": "a\u0000b"})
        assert nul.status_code == 422, nul.text
        assert nul.json()["detail"] == "reason: must not contain control characters"
    nul = await api("POST", f"/v1/invoices/{invoice_id}/payments",
                    json={"payment_id": "p\u0000", "amount": "1"})
    assert nul.status_code == 422
    assert nul.json()["detail"] == "payment_id: must not contain control characters"
    long = await api("POST", f"/v1/invoices/{invoice_id}/actions/cancel", json={"reason": "x" * 501})
    assert long.status_code == 422 and long.json()["detail"] == "reason: at most 500 characters"
    cancelled = await api("POST", f"/v1/invoices/{invoice_id}/actions/cancel", json={"reason": "void"})
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    closed = await api("POST", f"/v1/invoices/{invoice_id}/actions/escalate", json={"reason": "x"})
    assert closed.status_code == 409


async def test_failed_webhook_events_are_listed_and_queued_again(api: Api):
    """What `dunning webhooks` does, for an operator's tooling: never an event's body."""
    from inbox import Inbox, Incoming

    inbox = Inbox(api.harness.ledger.engine)
    inbox.store(Incoming("stripe", "evt_api_1", "payment_intent.succeeded", {"id": "evt_api_1",
                                                                            "receipt_email": "a@b.c"}))
    [event] = [e for e in inbox.events("stripe") if e.event_id == "evt_api_1"]
    inbox.settle(event.id or 0, "failed", "PaymentRefused: invoice_id: 'Rechnung 2024/17' is not an id")
    failed = await api("GET", "/v1/webhooks")
    assert failed.status_code == 200 and [r["event_id"] for r in failed.json()] == ["evt_api_1"]
    assert "receipt_email" not in failed.text and "Rechnung 2024/17" in failed.json()[0]["detail"]
    assert (await api("GET", "/v1/webhooks?status=sideways")).status_code == 422
    assert (await api("GET", "/v1/webhooks", key=None)).status_code == 401
    again = await api("POST", f"/v1/webhooks/{event.id}/retry")
    assert again.status_code == 200 and again.json() == {"id": event.id, "status": "pending"}
    assert (await api("POST", f"/v1/webhooks/{event.id}/retry")).status_code == 404  # not failed now


async def test_idempotency_key_replays_the_first_answer(api: Api):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    await api("POST", "/v1/invoices", json=invoice)
    path = f"/v1/invoices/{invoice_id}/actions/write-off"
    headers = {"Idempotency-Key": "wo-1"}
    first = await api("POST", path, json={"reason": "goodwill", "amount": "50.00"}, headers=headers)
    second = await api("POST", path, json={"reason": "goodwill", "amount": "50.00"}, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.headers.get("Idempotent-Replayed") == "true" and second.json() == first.json()
    status = await api("GET", f"/v1/invoices/{invoice_id}")
    assert Decimal(status.json()["balance_due"]) == Decimal("1200.00")  # written off once
    other = await api("POST", path, json={"reason": "goodwill", "amount": "60.00"}, headers=headers)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]


async def test_list_runs_by_state_and_customer(api: Api):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    customer = f"C-{invoice_id}"
    invoice["customer"]["id"] = customer
    await api("POST", "/v1/invoices", json=invoice)
    await api("POST", f"/v1/invoices/{invoice_id}/actions/dispute", json={"reason": "wrong amount"})
    deadline = time.monotonic() + 20
    while True:  # visibility is eventually consistent
        page = (await api("GET", f"/v1/invoices?state=disputed&customer_id={customer}")).json()
        if page["runs"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert [r["invoice_id"] for r in page["runs"]] == [invoice_id]
    assert page["runs"][0]["state"] == "disputed"
    bad = await api("GET", "/v1/invoices?state=sleeping")
    assert bad.status_code == 422 and bad.json()["detail"].startswith("state:")
    size = await api("GET", "/v1/invoices?page_size=lots")
    assert size.status_code == 422 and size.json()["detail"].startswith("page_size:")


async def test_put_customer_validates_and_stores(api: Api):
    ok = await api("PUT", "/v1/customers/C-77", json={"name": "Grace Hopper", "phone": "+14155550123"})
    assert ok.status_code == 200 and ok.json()["phone"] == "+14155550123"
    assert api.harness.ledger.customer("C-77").name == "Grace Hopper"
    bad = await api("PUT", "/v1/customers/C-77", json={"name": "G", "phone": "12"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("phone must be in E.164 form")
    other = await api("PUT", "/v1/customers/C-77", json={"id": "C-78", "name": "G", "phone": "+14155550123"})
    assert other.status_code == 422 and other.json()["detail"].startswith("id:")
    # a change of one field keeps the rest (the stored phone makes them reachable), and the
    # answer is the record as stored, not the request echoed
    renamed = await api("PUT", "/v1/customers/C-77", json={"name": "Grace B. Hopper", "timezone": "UTC"})
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["name"], renamed.json()["phone"]) == ("Grace B. Hopper", "+14155550123")
    emailed = await api("PUT", "/v1/customers/C-77", json={"email": "grace@example.com"})
    assert (emailed.json()["email"], emailed.json()["timezone"]) == ("grace@example.com", "UTC")
    stored = api.harness.ledger.customer("C-77")
    assert (stored.name, stored.phone, stored.email) == ("Grace B. Hopper", "+14155550123",
                                                         "grace@example.com")


async def test_a_pause_shifts_the_run_seen_through_the_api(api: Api):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    await api("POST", "/v1/invoices", json=invoice)
    handle = api.harness.client.get_workflow_handle(f"dunning-{invoice_id}")
    await api.harness.advance(handle, timedelta(days=2))
    await api("POST", f"/v1/invoices/{invoice_id}/actions/pause", json={"reason": "x"})
    await api.harness.advance(handle, timedelta(days=10))
    resumed = (await api("POST", f"/v1/invoices/{invoice_id}/actions/resume", json={})).json()
    assert resumed["next_step"]["name"] == "sms_reminder"


def test_an_idempotency_key_left_in_progress_by_a_dead_process_is_taken_over(ledger: Any):
    from datetime import timedelta

    from sqlmodel import Session

    from api import LEASE, Idempotency
    from models.records import ApiRequest, utcnow

    store = Idempotency(ledger.engine)
    assert store._claim("ops", "k1", "f") is None
    again = store._claim("ops", "k1", "f")
    assert again is not None and again.status_code is None  # in progress: a retry now gets 409
    with Session(ledger.engine) as db:
        row = db.get(ApiRequest, ("ops", "k1"))
        assert row is not None
        row.created_at = utcnow() - LEASE - timedelta(seconds=1)
        db.add(row)
        db.commit()
    assert store._claim("ops", "k1", "f") is None  # the dead process's claim is taken over
    assert store._claim("ops", "k1", "other") is not None  # but never by another request


class Relay:
    """A TCP relay to PostgreSQL that a test can freeze (connections stay open, nothing passes:
    a partitioned network) or cut (every connection closed, new ones refused: the server gone)."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


async def test_a_database_gone_after_start_is_503_and_health_does_not_hang(time_env: Any, settings: Settings):
    """The API answers 503 naming the database (it answered 500 with a traceback in the log)
    when PostgreSQL goes away after it started; when the database stops answering, its health
    check answers within seconds and a request within the TCP timeout of 10 s (both hung as
    long as the caller waited)."""
    from models.database import migrate
    from tests.test_ledger import private_schema

    with private_schema("dunning_api") as url:
        migrate(url)
        relay = Relay()
        through = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        address = time_env.client.service_client.config.target_host
        live = settings.model_copy(update={"temporal_address": address, "api_keys": SecretStr(KEY),
                                           "database_url": SecretStr(through)})
        async with Background(live, host="127.0.0.1", port=free_port()) as served:
            api = Api(served.url, None)  # type: ignore[arg-type]
            assert (await api("GET", "/healthz", key=None)).status_code == 200
            assert (await api("GET", "/v1/invoices/INV-1/events")).status_code in (200, 404)
            relay.frozen.set()
            stop = threading.Timer(30, relay.cut)  # a request that hangs fails, not the suite
            stop.start()
            began = time.monotonic()
            frozen = await api("GET", "/healthz", key=None)
            waited = time.monotonic() - began
            began = time.monotonic()
            stuck = await api("GET", "/v1/invoices/INV-1/events")  # a request, not only the probe
            stuck_for = time.monotonic() - began
            stop.cancel()
            relay.frozen.clear()
            relay.cut()
            gone = await api("GET", "/v1/invoices/INV-1/events")
            paid = await api("POST", "/v1/invoices/INV-1/payments", headers={"Idempotency-Key": "k1"},
                             json={"amount": "5.00", "payment_id": "p1"})
    assert frozen.status_code == 503 and frozen.json()["database"].startswith("unreachable"), frozen.text
    assert waited < 15, waited
    assert stuck.status_code == 503 and stuck_for < 19, (stuck.text, stuck_for)
    for answer in (gone, paid):
        assert answer.status_code == 503, answer.text
        assert answer.json()["detail"].startswith("cannot reach the database"), answer.text
