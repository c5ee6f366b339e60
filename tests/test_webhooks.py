"""Webhooks over real HTTP, signed the way each provider signs: Stripe's own signature helper, an
ECDSA P-256 key pair for SendGrid's Event Webhook (its published algorithm), Twilio's own
``RequestValidator``; and bad signatures, replays and stale timestamps."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
import stripe
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from sqlmodel import Session, select
from twilio.request_validator import RequestValidator

from api import Background
from inbox import Inbox
from models.records import OptOut
from models.run import RunState
from models.token import UNSUBSCRIBE, make_token
from settings import Settings
from tests.conftest import Harness, running, sample_invoice
from tests.test_api import KEY, free_port
from tests.test_escalation import until

STRIPE_SECRET = "whsec_test_0123456789abcdef"
TWILIO_TOKEN = "twilio-auth-token-0123456789"
SIGNING = "signing-secret-0123456789abcdef0123456789"
PRIVATE = ec.generate_private_key(ec.SECP256R1())
PUBLIC_B64 = base64.b64encode(PRIVATE.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


class Hooks:
    def __init__(self, base: str, harness: Harness) -> None:
        self.base, self.harness = base, harness
        self.inbox = Inbox(harness.ledger.engine)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        return await asyncio.to_thread(requests.post, self.base + path, data=body, headers=headers,
                                       timeout=30)

    async def stripe(self, event: dict[str, Any], *, timestamp: int | None = None,
                     secret: str = STRIPE_SECRET) -> requests.Response:
        body = json.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)
        return await self.post("/webhooks/stripe", body.encode(), {"Stripe-Signature": header})

    async def sendgrid(self, events: list[dict[str, Any]], *, age: int = 0,
                       key: ec.EllipticCurvePrivateKey = PRIVATE) -> requests.Response:
        body = json.dumps(events)
        stamp = str(int(time.time()) - age)
        signature = base64.b64encode(key.sign((stamp + body).encode(), ec.ECDSA(hashes.SHA256()))).decode()
        return await self.post("/webhooks/sendgrid", body.encode(), {
            "X-Twilio-Email-Event-Webhook-Signature": signature,
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp, "Content-Type": "application/json"})

    async def sms(self, params: dict[str, str], *, token: str = TWILIO_TOKEN) -> requests.Response:
        signature = RequestValidator(token).compute_signature(f"{self.base}/webhooks/twilio/sms", params)
        return await self.post("/webhooks/twilio/sms", urlencode(params).encode(), {
            "X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"})

    def statuses(self, provider: str) -> list[str]:
        return [e.status for e in self.inbox.events(provider)]


@pytest.fixture
async def hooks(time_env: Any, settings: Settings) -> AsyncIterator[Hooks]:
    port = free_port()
    settings = settings.model_copy(update={
        "temporal_address": time_env.client.service_client.config.target_host,
        "api_keys": SecretStr(KEY), "public_url": f"http://127.0.0.1:{port}",
        "stripe_webhook_secret": SecretStr(STRIPE_SECRET), "twilio_auth_token": SecretStr(TWILIO_TOKEN),
        "sendgrid_webhook_public_key": PUBLIC_B64, "signing_secret": SecretStr(SIGNING),
    })
    async with (running(time_env, settings) as harness,
                Background(settings, host="127.0.0.1", port=port) as served):
        yield Hooks(served.url, harness)


def intent(invoice_id: str | None, cents: int, event_id: str, pi: str) -> dict[str, Any]:
    metadata = {"invoice_id": invoice_id} if invoice_id else {}
    return {"id": event_id, "type": "payment_intent.succeeded", "data": {"object": {
        "id": pi, "object": "payment_intent", "amount_received": cents, "currency": "usd",
        "metadata": metadata}}}


async def test_a_stripe_payment_counts_once_and_bad_signatures_change_nothing(hooks: Hooks):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    await hooks.harness.start(invoice)
    event = intent(invoice_id, 25000, "evt_1", "pi_1")
    forged = await hooks.stripe(event, secret="whsec_someone_else")
    assert forged.status_code == 403
    stale = await hooks.stripe(event, timestamp=int(time.time()) - 600)
    assert stale.status_code == 400
    missing = await hooks.post("/webhooks/stripe", json.dumps(event).encode(), {})
    assert missing.status_code == 400
    assert hooks.inbox.events("stripe") == []  # nothing stored

    first = await hooks.stripe(event)
    again = await hooks.stripe(event)  # Stripe redelivers
    assert first.status_code == again.status_code == 200 and again.json()["duplicate"] is True
    await until(lambda: hooks.statuses("stripe") == ["done"])
    status = await hooks.harness.dunning.status(invoice_id)
    assert status.paid == Decimal("250.00") and status.balance_due == Decimal("1000.00")

    stray = intent("INV-NOBODY", 1000, "evt_2", "pi_2")
    assert (await hooks.stripe(stray)).status_code == 200
    await until(lambda: hooks.statuses("stripe") == ["done", "done"])
    assert [p.invoice_id for p in hooks.harness.dunning.unmatched()] == ["INV-NOBODY"]


async def test_a_stripe_dispute_holds_the_run_and_a_won_dispute_resumes_it(hooks: Hooks):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    await hooks.harness.start(invoice)
    await hooks.stripe(intent(invoice_id, 10000, "evt_p", "pi_d"))
    await until(lambda: hooks.statuses("stripe") == ["done"])
    dispute = {"id": "du_1", "object": "dispute", "payment_intent": "pi_d", "amount": 10000,
               "currency": "usd", "reason": "fraudulent", "status": "needs_response"}
    await hooks.stripe({"id": "evt_d1", "type": "charge.dispute.created", "data": {"object": dispute}})
    await until(lambda: hooks.statuses("stripe") == ["done", "done"])
    assert (await hooks.harness.dunning.status(invoice_id)).state is RunState.DISPUTED
    won = {**dispute, "status": "won"}
    await hooks.stripe({"id": "evt_d2", "type": "charge.dispute.closed", "data": {"object": won}})
    await until(lambda: hooks.statuses("stripe") == ["done"] * 3)
    assert (await hooks.harness.dunning.status(invoice_id)).state is RunState.ACTIVE


async def test_oversized_or_undecodable_bodies_are_refused_before_anything_is_read_whole(hooks: Hooks):
    """The body is read before its signature can be checked: a huge one is refused (413) rather
    than held in memory, and bytes that are not UTF-8 are a 400, not a server error."""
    header = {"Stripe-Signature": "t=1,v1=00"}
    huge = await hooks.post("/webhooks/stripe", b"{" + b" " * (2 << 20) + b"}", header)
    assert huge.status_code == 413 and huge.json()["detail"].startswith("body: more than")

    def chunks() -> Any:  # no Content-Length: the cap holds while streaming too
        for _ in range(40):
            yield b" " * 65536

    streamed = await asyncio.to_thread(requests.post, hooks.base + "/webhooks/stripe", data=chunks(),
                                       headers=header, timeout=30)
    assert streamed.status_code == 413
    garbled = await hooks.post("/webhooks/stripe", b"\xff\xfe{}", header)
    assert garbled.status_code == 400 and garbled.json()["detail"] == "body: not UTF-8"
    assert hooks.inbox.events("stripe") == []


async def test_the_api_takes_webhooks_while_temporal_is_unreachable_at_its_start(settings: Settings):
    """An API restarted during a Temporal outage must still answer the providers (Twilio does not
    retry an inbound SMS): webhooks are kept, the rest answers 503 naming Temporal."""
    from types import SimpleNamespace

    from activities.ledger import Ledger
    from models.database import prepare

    port = free_port()
    settings = settings.model_copy(update={
        "temporal_address": f"127.0.0.1:{free_port()}",  # nothing listens there
        "api_keys": SecretStr(KEY), "public_url": f"http://127.0.0.1:{port}",
        "stripe_webhook_secret": SecretStr(STRIPE_SECRET),
    })
    async with Background(settings, host="127.0.0.1", port=port) as served:
        hooks = Hooks(served.url, SimpleNamespace(ledger=Ledger(prepare(settings.database()))))  # type: ignore[arg-type]
        assert (await hooks.stripe(intent("INV-AWAY-1", 5000, "evt_away", "pi_away"))).status_code == 200
        assert [(e.event_id, e.status) for e in hooks.inbox.events("stripe")] == [("evt_away", "pending")]
        bearer = {"Authorization": f"Bearer {KEY.partition(':')[2]}"}
        status = await asyncio.to_thread(requests.get, f"{served.url}/v1/invoices/INV-AWAY-1",
                                         headers=bearer, timeout=30)
        assert status.status_code == 503 and "cannot reach the Temporal server" in status.json()["detail"]
        health = await asyncio.to_thread(requests.get, f"{served.url}/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["database"] == "ok"


async def test_events_wait_in_the_inbox_while_temporal_is_away(hooks: Hooks, monkeypatch: pytest.MonkeyPatch):
    from starter import ServerUnavailable

    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    await hooks.harness.start(invoice)
    down = {"on": True}
    real = hooks.harness.dunning.__class__.pay

    async def pay(self: Any, *args: Any, **kwargs: Any) -> Any:
        if down["on"]:
            raise ServerUnavailable("Temporal server at test: unavailable")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(hooks.harness.dunning.__class__, "pay", pay)
    assert (await hooks.stripe(intent(invoice_id, 5000, "evt_o", "pi_o"))).status_code == 200
    await asyncio.sleep(1.0)
    [row] = hooks.inbox.events("stripe")
    assert row.status == "pending" and "will retry" in row.detail
    # an event stuck behind Temporal does not hold up the others
    assert (await hooks.sms({"MessageSid": "SMx", "From": "+14155550100", "Body": "STOP"})).status_code == 200
    await until(lambda: hooks.statuses("twilio") == ["done"])
    down["on"] = False
    await until(lambda: hooks.statuses("stripe") == ["done"], timeout=30)  # a later pass takes it
    assert (await hooks.harness.dunning.status(invoice_id)).paid == Decimal("50.00")


async def test_a_dropped_database_connection_leaves_the_event_for_the_next_pass(
        hooks: Hooks, monkeypatch: pytest.MonkeyPatch):
    """A STOP must not be lost to one dropped connection: the event waits, then is taken."""
    from sqlalchemy.exc import OperationalError

    invoice = sample_invoice()
    invoice["customer"].update({"id": "C-blip", "phone": "+14155550166"})
    await hooks.harness.start(invoice)
    from activities.ledger import Ledger

    real, drops = Ledger.opt_out, [1]

    def opt_out(self: Ledger, *args: Any) -> None:
        if drops:
            drops.pop()
            raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
        real(self, *args)

    monkeypatch.setattr(Ledger, "opt_out", opt_out)
    ledger = hooks.harness.ledger
    assert (await hooks.sms({"MessageSid": "SMb", "From": "+14155550166", "Body": "STOP"})).status_code == 200
    await until(lambda: not drops)
    [row] = hooks.inbox.events("twilio")
    assert row.status in ("pending", "done"), row.detail
    await until(lambda: hooks.statuses("twilio") == ["done"], timeout=30)
    assert ledger.opted_out("C-blip", "sms")


async def test_a_bounce_makes_the_next_email_step_fall_back_to_sms(hooks: Hooks):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    invoice["customer"]["id"] = f"C-{invoice_id}"
    handle = await hooks.harness.start(invoice)
    base = {"email": "ada@example.com", "timestamp": int(time.time()), "dunning_invoice": invoice_id,
            "dunning_step": "friendly_reminder", "sg_message_id": "m1"}
    assert (await hooks.sendgrid([{**base, "event": "delivered", "sg_event_id": "e1"}], age=600)
            ).status_code == 400
    other = ec.generate_private_key(ec.SECP256R1())
    assert (await hooks.sendgrid([{**base, "event": "bounce", "sg_event_id": "e2"}], key=other)
            ).status_code == 403
    assert hooks.inbox.events("sendgrid") == []
    answer = await hooks.sendgrid([
        {**base, "event": "bounce", "sg_event_id": "e3",
         "reason": "550 5.1.1 <ada@example.com>: Recipient address rejected: no such user"},
        {**base, "event": "open", "sg_event_id": "e4"}])
    assert answer.status_code == 200 and answer.json() == {"received": 2, "new": 2}
    await until(lambda: hooks.statuses("sendgrid") == ["done", "done"])
    await hooks.harness.advance(handle, timedelta(days=2))
    assert hooks.harness.sent(invoice_id) == [("friendly_reminder", "sms")]
    trail = [(e.status, e.channel) for e in hooks.harness.ledger.trail(invoice_id)]
    assert ("unreachable", "email") in trail and ("opened", "email") in trail
    # the bounce's reason is kept without the address it quoted, and the events' bodies are gone
    # once processed (what they did is on the trail)
    with Session(hooks.harness.ledger.engine) as db:
        [opt_out] = db.exec(select(OptOut).where(OptOut.customer_id == f"C-{invoice_id}")).all()
    assert "no such user" in opt_out.reason and "ada@example.com" not in opt_out.reason
    assert [e.payload for e in hooks.inbox.events("sendgrid")] == ["{}", "{}"]
    # a corrected address is worth trying again
    hooks.harness.dunning.update_customer({**invoice["customer"], "email": "ada@new.example.com"})
    assert not hooks.harness.ledger.opted_out(f"C-{invoice_id}", "email")


async def test_sms_stop_start_help_and_replies(hooks: Hooks):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    phone = "+14155550177"
    invoice["customer"].update({"id": f"C-{invoice_id}", "phone": phone})
    await hooks.harness.start(invoice)
    customer = f"C-{invoice_id}"
    forged = await hooks.sms({"MessageSid": "SM0", "From": phone, "Body": "STOP"}, token="wrong-token-000")
    assert forged.status_code == 403
    assert (await hooks.sms({"MessageSid": "SM1", "From": phone, "Body": " stop "})).status_code == 200
    await until(lambda: hooks.harness.ledger.opted_out(customer, "sms"))
    await hooks.sms({"MessageSid": "SM2", "From": phone, "Body": "Start"})
    await until(lambda: not hooks.harness.ledger.opted_out(customer, "sms"))
    helped = await hooks.sms({"MessageSid": "SM3", "From": phone, "Body": "HELP"})
    assert "<Message>" in helped.text and "STOP" in helped.text
    await hooks.sms({"MessageSid": "SM4", "From": phone, "Body": "I paid by cheque on Monday"})
    await until(lambda: any(e.status == "reply" for e in hooks.harness.ledger.trail(invoice_id)))
    reply = next(e for e in hooks.harness.ledger.trail(invoice_id) if e.status == "reply")
    assert "cheque" in reply.detail
    # erasure reaches what the customer wrote and the providers' events about them
    hooks.harness.dunning.forget_customer(customer)
    reply = next(e for e in hooks.harness.ledger.trail(invoice_id) if e.status == "reply")
    assert "cheque" not in reply.detail
    assert all(phone not in e.payload for e in hooks.inbox.events("twilio"))


async def test_one_click_unsubscribe(hooks: Hooks):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    customer = f"C-{invoice_id}"
    invoice["customer"]["id"] = customer
    handle = await hooks.harness.start(invoice)
    await hooks.harness.advance(handle, timedelta(days=2))
    from activities.outbox import messages_for

    [email] = [m for m in messages_for(hooks.harness.ledger.engine, invoice_id) if m.channel == "email"]
    link = email.headers["List-Unsubscribe"].split(",")[0].strip("<> ")
    assert link == f"{hooks.base}/unsubscribe/{make_token(SIGNING, UNSUBSCRIBE, customer, invoice_id)}"
    assert email.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    page = await asyncio.to_thread(requests.get, link, timeout=10)
    assert page.status_code == 200 and "<form method=post>" in page.text
    assert not hooks.harness.ledger.opted_out(customer, "email")  # a GET (a link scanner) does nothing
    done = await asyncio.to_thread(requests.post, link, data="List-Unsubscribe=One-Click", timeout=10)
    assert done.status_code == 200
    await until(lambda: hooks.harness.ledger.opted_out(customer, "email"))
    bad = await asyncio.to_thread(requests.post, link[:-3] + "abc", timeout=10)
    assert bad.status_code == 404


async def test_stripe_refunds_and_a_lost_chargeback_are_owed_again(hooks: Hooks):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await hooks.harness.start(invoice)
    await hooks.stripe(intent(invoice_id, 125000, "evt_all", "pi_all"))
    await until(lambda: hooks.statuses("stripe") == ["done"])
    assert (await handle.result()).state is RunState.PAID
    charge = {"id": "ch_1", "object": "charge", "payment_intent": "pi_all", "currency": "usd"}
    await hooks.stripe({"id": "evt_r1", "type": "charge.refunded",
                        "data": {"object": {**charge, "amount_refunded": 20000}}})
    await until(lambda: hooks.statuses("stripe") == ["done"] * 2)
    reopened = await hooks.harness.dunning.status(invoice_id)
    assert reopened.state is RunState.ACTIVE and reopened.balance_due == Decimal("200.00")
    # a second refund on the same charge: Stripe sends the cumulative total
    await hooks.stripe({"id": "evt_r2", "type": "charge.refunded",
                        "data": {"object": {**charge, "amount_refunded": 30000}}})
    await until(lambda: hooks.statuses("stripe") == ["done"] * 3)
    assert (await hooks.harness.dunning.status(invoice_id)).balance_due == Decimal("300.00")
    lost = {"id": "du_2", "object": "dispute", "payment_intent": "pi_all", "amount": 50000,
            "currency": "usd", "status": "lost"}
    await hooks.stripe({"id": "evt_l", "type": "charge.dispute.closed", "data": {"object": lost}})
    await until(lambda: hooks.statuses("stripe") == ["done"] * 4)
    assert (await hooks.harness.dunning.status(invoice_id)).balance_due == Decimal("800.00")


async def test_press_1_on_a_live_call_texts_the_pay_link_once(time_env: Any, settings: Settings,
                                                              fake_provider: Any):
    """End to end through the fake Twilio: the call's TwiML offers 'press 1'; Twilio posts the key
    press to the opaque signed URL; the run sends one SMS with the pay link, however often the
    press is posted."""
    from tests.test_providers import live_settings

    port = free_port()
    live = live_settings(settings, fake_provider).model_copy(update={
        "temporal_address": time_env.client.service_client.config.target_host,
        "api_keys": SecretStr(KEY), "public_url": f"http://127.0.0.1:{port}",
        "signing_secret": SecretStr(SIGNING)})
    async with (running(time_env, live) as harness,
                Background(live, host="127.0.0.1", port=port) as served):
        invoice = sample_invoice()
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=31))
        [call] = fake_provider.to("/Calls.json")
        twiml = call.form["Twiml"]
        action = twiml.split('action="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        assert action.startswith(f"{served.url}/webhooks/twilio/voice?t=") and invoice_id not in action
        params = {"CallSid": "CA0001", "Digits": "1", "From": "+15005550006", "To": "+14155550100"}
        signature = RequestValidator("t").compute_signature(action, params)  # live_settings' token

        async def press(sig: str = signature, url: str = action) -> requests.Response:
            return await asyncio.to_thread(requests.post, url, data=params, timeout=10,
                                           headers={"X-Twilio-Signature": sig})

        forged = await press(RequestValidator("not-the-token").compute_signature(action, params))
        assert forged.status_code == 403
        other = action.split("?t=")[0] + "?t=" + "x" * 20 + ".y"
        assert (await press(RequestValidator("t").compute_signature(other, params), other)).status_code == 403
        answer = await press()
        assert answer.status_code == 200 and "text message" in answer.text
        await until(lambda: any(d.step.startswith("pay_link_") and d.status == "sent"
                                for d in harness.ledger.deliveries(invoice_id)))
        await press()  # Twilio retries the same key press
        await asyncio.sleep(1.0)
        links = [r for r in fake_provider.to("/Messages.json")
                 if "as asked on our call" in r.form.get("Body", "")]
        assert len(links) == 1 and invoice["payment_url"] in links[0].form["Body"]
        await harness.dunning.cancel(invoice_id, "test over")


async def test_an_undelivered_sms_falls_back_and_call_outcomes_are_recorded(
        time_env: Any, settings: Settings, fake_provider: Any):
    """Live through the fake Twilio: every SMS and call carries the status callback; an SMS the
    carrier could not deliver makes the step fall back to email while the run is still at that
    step (and not once it has moved on); a call's outcome goes on the trail."""
    from tests.test_providers import live_settings

    port = free_port()
    live = live_settings(settings, fake_provider).model_copy(update={
        "temporal_address": time_env.client.service_client.config.target_host,
        "api_keys": SecretStr(KEY), "public_url": f"http://127.0.0.1:{port}"})
    async with (running(time_env, live) as harness,
                Background(live, host="127.0.0.1", port=port) as served):
        status_url = f"{served.url}/webhooks/twilio/status"

        async def report(params: dict[str, str]) -> requests.Response:
            signature = RequestValidator("t").compute_signature(status_url, params)
            return await asyncio.to_thread(requests.post, status_url, data=params, timeout=10,
                                           headers={"X-Twilio-Signature": signature})

        def sms_sid(invoice_id: str) -> str:
            rows = {d.step: d for d in harness.ledger.deliveries(invoice_id) if d.channel == "sms"}
            return rows["sms_reminder"].provider_message_id or ""

        at_step = sample_invoice()
        moved_on = sample_invoice()
        first = await harness.start(at_step)
        second = await harness.start(moved_on)
        await harness.advance(first, timedelta(days=16))
        await harness.advance(second, timedelta(days=31))
        [callback] = {r.form.get("StatusCallback") for r in fake_provider.to("/Messages.json")}
        assert callback == status_url
        assert {r.form.get("StatusCallback") for r in fake_provider.to("/Calls.json")} == {status_url}

        forged = await asyncio.to_thread(requests.post, status_url, timeout=10, data={
            "MessageSid": sms_sid(at_step["invoice_id"]), "MessageStatus": "undelivered"},
            headers={"X-Twilio-Signature": "forged"})
        assert forged.status_code == 403
        mails_before = len(fake_provider.to("/v3/mail/send"))
        for invoice in (at_step, moved_on):
            answer = await report({"MessageSid": sms_sid(invoice["invoice_id"]), "AccountSid": "AC1",
                                   "MessageStatus": "undelivered", "ErrorCode": "30003"})
            assert answer.status_code == 204
        await until(lambda: ("sms_reminder", "email") in harness.sent(at_step["invoice_id"]))
        assert len(fake_provider.to("/v3/mail/send")) == mails_before + 1  # only the run still there
        await until(lambda: any(e.status == "not_retried"
                                for e in harness.ledger.trail(moved_on["invoice_id"])))
        assert ("sms_reminder", "email") not in harness.sent(moved_on["invoice_id"])
        rows = {(d.step, d.channel): d.status for d in harness.ledger.deliveries(at_step["invoice_id"])}
        assert rows[("sms_reminder", "sms")] == "failed"

        call = next(d for d in harness.ledger.deliveries(moved_on["invoice_id"]) if d.channel == "voice")
        await report({"CallSid": call.provider_message_id or "", "CallStatus": "no-answer"})
        await until(lambda: any(e.status == "call_no_answer"
                                for e in harness.ledger.trail(moved_on["invoice_id"])))
        # nobody answered: the call did not reach them, so the step falls back to its SMS
        await until(lambda: ("phone_call", "sms") in harness.sent(moved_on["invoice_id"]))
        rows = {(d.step, d.channel): d.status for d in harness.ledger.deliveries(moved_on["invoice_id"])}
        assert rows[("phone_call", "voice")] == "failed"
        texts = fake_provider.to("/Messages.json")
        await report({"CallSid": call.provider_message_id or "", "CallStatus": "no-answer"})  # again
        await asyncio.sleep(1.0)
        assert len(fake_provider.to("/Messages.json")) == len(texts), "a repeated report sent twice"
        for invoice in (at_step, moved_on):
            await harness.dunning.cancel(invoice["invoice_id"], "test over")


async def test_an_undelivered_shared_sms_is_refused_on_every_invoice_it_carried(
        time_env: Any, settings: Settings, fake_provider: Any, tmp_path: Any):
    """Two invoices of one customer share one SMS (consolidation); the carrier could not deliver
    it: neither invoice got its notice, so both ledger rows become failed and both runs are told
    (each step falls back to email, an SMS step's usual fallback)."""
    from temporalio.service import RPCError

    from tests.test_contact import GATHERED, shipped_policies
    from tests.test_providers import live_settings

    port = free_port()
    live = shipped_policies(live_settings(settings, fake_provider), tmp_path, GATHERED).model_copy(update={
        "temporal_address": time_env.client.service_client.config.target_host,
        "api_keys": SecretStr(KEY), "public_url": f"http://127.0.0.1:{port}"})
    due = datetime.now(UTC) + timedelta(minutes=5)
    async with (running(time_env, live) as harness,
                Background(live, host="127.0.0.1", port=port) as served):
        invoices = [sample_invoice(due_at=due.isoformat(), policy="gathered",
                                   payment_url=f"https://billing.example.com/pay/{n}") for n in range(2)]
        ids = [invoice["invoice_id"] for invoice in invoices]
        handles = [await harness.start(invoice) for invoice in invoices]

        async def everyone_by(duration: timedelta) -> None:
            for handle in handles:  # each run has its own clock on the time-skipping server
                try:
                    await harness.advance(handle, duration)
                except RPCError as exc:
                    assert "already completed" in exc.message
            await asyncio.sleep(1)

        await everyone_by(due + timedelta(days=1, seconds=10) - datetime.now(UTC))
        for step in (timedelta(minutes=3), timedelta(minutes=3), timedelta(days=14, minutes=-6),
                     timedelta(minutes=3), timedelta(minutes=3)):
            await everyone_by(step)  # the email, then the SMS, each gathered for both invoices

        def sms_rows() -> list[Any]:
            return [d for i in ids for d in harness.ledger.deliveries(i)
                    if (d.step, d.channel) == ("sms_reminder", "sms")]

        assert len(fake_provider.to("/Messages.json")) == 1  # one text for both invoices
        [sid] = {row.provider_message_id for row in sms_rows()}
        assert sid and [row.status for row in sms_rows()] == ["sent", "sent"]
        status_url = f"{served.url}/webhooks/twilio/status"
        params = {"MessageSid": sid, "AccountSid": "AC1", "MessageStatus": "undelivered",
                  "ErrorCode": "30003"}
        signature = RequestValidator("t").compute_signature(status_url, params)
        answer = await asyncio.to_thread(requests.post, status_url, data=params, timeout=10,
                                         headers={"X-Twilio-Signature": signature})
        assert answer.status_code == 204
        await until(lambda: [e.status for e in Inbox(harness.ledger.engine).events("twilio-status")]
                    == ["done"])
        assert [(row.status, row.detail) for row in sms_rows()] == [
            ("failed", "carrier: undelivered (error 30003)")] * 2
        for invoice_id in ids:  # every run heard of it, not only the first: each falls back
            await until(lambda invoice_id=invoice_id: ("sms_reminder", "email") in harness.sent(invoice_id))
            await harness.dunning.cancel(invoice_id, "test over")
