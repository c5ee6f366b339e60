"""Webhooks from Stripe, SendGrid and Twilio, and one-click unsubscribe, served by ``dunning api``.

No API key: each route verifies its provider's signature with the provider's own library
(``stripe``, SendGrid's ``EventWebhook``, ``twilio.request_validator``), refuses a bad or missing
signature or a timestamp outside five minutes (400/403, nothing changes), stores the event in the
inbox (``inbox.py``) and only then acknowledges it. Processing runs from the inbox.

    POST /webhooks/stripe        payment_intent.succeeded (metadata.invoice_id) -> a payment;
                                 charge.dispute.created -> disputed; charge.dispute.closed: won ->
                                 dispute rejected, lost -> the payment reversed (a paid run
                                 reopens); charge.refunded -> the refunded amount reversed
    POST /webhooks/sendgrid      bounce/dropped -> email unreachable; spamreport/unsubscribe/
                                 group_unsubscribe -> opted out of email; delivered/open/click ->
                                 the invoice's trail
    POST /webhooks/twilio/sms    STOP words -> opted out of SMS; START/YES/UNSTOP -> back in;
                                 HELP -> who we are; any other text -> the open invoices' trails
    POST /webhooks/twilio/voice  a call's "press 1" (signed opaque token in the URL) -> the run
                                 texts the pay link, once per call
    POST /webhooks/twilio/status an SMS undelivered/failed -> refused, the step falls back if the
                                 run has not moved on; a call's outcome -> the trail
    GET|POST /unsubscribe/{token}  RFC 8058 one-click unsubscribe from email
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.exc import InterfaceError, OperationalError

from activities.ledger import UNREACHABLE, Ledger
from activities.redact import excerpt
from inbox import Inbox, Incoming
from models.audit import AuditEvent, AuditKind, audit_key
from models.database import DatabaseError
from models.invoice import workflow_id_for
from models.money import minor_digits
from models.records import WebhookEvent, utcnow
from models.run import RunState
from models.token import UNSUBSCRIBE, VOICE, read_token
from settings import Settings
from starter import ActionRefused, DunningClient, RunClosed, ServerUnavailable

log = logging.getLogger(__name__)

TOLERANCE = 300  # seconds a signed timestamp may be off
DRAIN_EVERY = 5.0  # seconds between passes over pending events
# Twilio's final statuses of a message or call that never reached the customer.
UNDELIVERED_SMS = frozenset({"undelivered", "failed"})
UNANSWERED_CALL = frozenset({"no-answer", "busy", "failed", "canceled"})
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
START_WORDS = frozenset({"START", "YES", "UNSTOP"})
SENDGRID_TRAIL = {"delivered": "delivered", "open": "opened", "click": "clicked"}
SENDGRID_OPT_OUT = frozenset({"spamreport", "unsubscribe", "group_unsubscribe"})
SENDGRID_UNREACHABLE = frozenset({"bounce", "dropped"})


class Busy(Exception):
    """The run cannot take it right now (it is handing off, or closing): try again later."""


class Refused(Exception):
    """A webhook request that is not from the provider (or too old): nothing is stored."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


# -- verification ------------------------------------------------------------------------------

MAX_BODY = 1 << 20  # bytes; a provider's event is a few KiB, a SendGrid batch well under this


async def bounded_body(request: Request) -> bytes:
    """The request's body, refused (413) past ``MAX_BODY``: it is read before its signature can
    be checked, so an unbounded read would let anyone fill the API's memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise Refused(413, f"body: more than {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise Refused(413, f"body: more than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)



def verify_stripe(body: bytes, header: str | None, secret: str, now: float | None = None) -> dict[str, Any]:
    """The event, if ``Stripe-Signature`` signs this body with our secret within five minutes."""
    import stripe

    if not header:
        raise Refused(400, "Stripe-Signature: missing")
    try:
        stripe.WebhookSignature.verify_header(body, header, secret, tolerance=TOLERANCE)
    except UnicodeDecodeError:
        raise Refused(400, "body: not UTF-8") from None
    except stripe.SignatureVerificationError as exc:
        raise Refused(400 if "tolerance" in str(exc) or "extract" in str(exc) else 403,
                      f"Stripe-Signature: {str(exc).split('.')[0]}") from None
    stamp = dict(part.split("=", 1) for part in header.split(",") if "=" in part).get("t", "0")
    if int(stamp) > (now or time.time()) + TOLERANCE:
        raise Refused(400, "Stripe-Signature: timestamp in the future")
    return _json_object(body)


def verify_sendgrid(body: bytes, signature: str | None, timestamp: str | None, public_key: str,
                    now: float | None = None) -> list[dict[str, Any]]:
    """The events, if SendGrid's ECDSA signature covers timestamp + body and the timestamp is recent."""
    from sendgrid.helpers.eventwebhook import EventWebhook

    if not signature or not timestamp:
        raise Refused(400, "X-Twilio-Email-Event-Webhook-Signature and -Timestamp: required")
    try:
        stamp = int(timestamp)
    except ValueError:
        raise Refused(400, "X-Twilio-Email-Event-Webhook-Timestamp: not a number") from None
    if abs((now or time.time()) - stamp) > TOLERANCE:
        raise Refused(400, "X-Twilio-Email-Event-Webhook-Timestamp: outside five minutes")
    try:
        verifier = EventWebhook(public_key)
        good = verifier.verify_signature(body.decode("utf-8"), signature, timestamp)
    except (ValueError, TypeError, UnicodeDecodeError):
        good = False
    if not good:
        raise Refused(403, "X-Twilio-Email-Event-Webhook-Signature: does not match")
    try:
        events = json.loads(body)
    except ValueError:
        raise Refused(400, "body: not JSON") from None
    if not isinstance(events, list):
        raise Refused(400, "body: a JSON array of events")
    return [e for e in events if isinstance(e, dict)]


def verify_twilio(url: str, body: bytes, signature: str | None, auth_token: str) -> dict[str, str]:
    """The form fields, if ``X-Twilio-Signature`` signs them for this URL."""
    from twilio.request_validator import RequestValidator

    if not signature:
        raise Refused(400, "X-Twilio-Signature: missing")
    params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    if not RequestValidator(auth_token).validate(url, params, signature):
        raise Refused(403, "X-Twilio-Signature: does not match")
    return params


def _money(obj: dict[str, Any], field: str) -> tuple[str, Decimal]:
    """A Stripe object's currency and amount (``field``, in minor units) as a decimal."""
    currency = str(obj.get("currency", "")).upper()
    return currency, Decimal(int(obj.get(field) or 0)).scaleb(-minor_digits(currency))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise Refused(400, "body: not JSON") from None
    if not isinstance(data, dict):
        raise Refused(400, "body: a JSON object")
    return data


# -- processing --------------------------------------------------------------------------------

Outcome = tuple[str, str]  # (status, detail) for the inbox row


class Processor:
    """Turns stored events into payments, holds, opt-outs and trail entries."""

    def __init__(self, dunning: DunningClient, inbox: Inbox) -> None:
        self.dunning, self.inbox = dunning, inbox
        self.ledger: Ledger = dunning.ledger
        self._lock = asyncio.Lock()

    async def drain(self) -> int:
        """One pass over pending events; how many were settled."""
        settled = 0
        async with self._lock:
            for row in await asyncio.to_thread(self.inbox.pending):
                try:
                    status, detail = await self.process(row)
                except (ServerUnavailable, DatabaseError, OperationalError, InterfaceError, ConnectionError,
                        Busy) as exc:
                    # Temporal or the database down (a dropped connection, a locked SQLite
                    # file), or the run busy for a moment: this row waits (longer each time);
                    # the others are not held up behind it.
                    await asyncio.to_thread(self.inbox.postpone, row.id or 0, f"will retry: {exc}")
                    continue
                except Exception as exc:  # a bug or data nobody expected: an operator looks
                    log.exception("webhook event %s could not be processed", row.id)
                    status, detail = "failed", f"{exc.__class__.__name__}: {exc}"
                await asyncio.to_thread(self.inbox.settle, row.id or 0, status, detail)
                settled += 1
        return settled

    async def process(self, row: WebhookEvent) -> Outcome:
        data = json.loads(row.payload)
        handler: Callable[[WebhookEvent, Any], Awaitable[Outcome]] = {
            "stripe": self._stripe, "sendgrid": self._sendgrid, "twilio": self._twilio_sms,
            "twilio-voice": self._pay_link, "twilio-status": self._twilio_status,
            "unsubscribe": self._unsubscribe,
        }[row.provider]
        return await handler(row, data)

    # Stripe

    async def _stripe(self, row: WebhookEvent, event: dict[str, Any]) -> Outcome:
        obj = (event.get("data") or {}).get("object") or {}
        if row.kind == "payment_intent.succeeded":
            invoice_id = (obj.get("metadata") or {}).get("invoice_id")
            if not invoice_id:
                return "ignored", "no metadata.invoice_id: not a dunning invoice's payment"
            currency, amount = _money(obj, "amount_received")
            result = await self.dunning.pay(invoice_id, f"{amount:f}", currency=currency,
                                            payment_id=str(obj.get("id")), actor="webhook:stripe")
            return "done", f"{result.outcome}: {result.detail}"
        if row.kind in ("charge.dispute.created", "charge.dispute.closed"):
            invoice_id = await self._paid_invoice(obj)
            if invoice_id is None:
                return "failed", (f"no invoice known for payment {obj.get('payment_intent')} (its "
                                  "payment_intent.succeeded was not seen)")
            currency, amount = _money(obj, "amount")
            if row.kind == "charge.dispute.created":
                why = obj.get("reason") or "no reason given"
                return await self._act(row, invoice_id, "dispute", {
                    "reason": f"Stripe dispute {obj.get('id')} ({why}) of {amount:f} {currency}"})
            if obj.get("status") == "won":
                return await self._act(row, invoice_id, "resolve", {
                    "outcome": "rejected", "note": f"Stripe dispute {obj.get('id')} won"})
            if obj.get("status") != "lost":
                return "ignored", f"dispute closed {obj.get('status')}: nothing to do"
            outcome = await self._reverse(row, invoice_id, f"dispute:{obj.get('id')}", amount,
                                          f"Stripe dispute {obj.get('id')} lost")
            if (await self.dunning.status(invoice_id)).state is RunState.DISPUTED:
                await self._act(row, invoice_id, "resolve", {
                    "outcome": "rejected", "note": f"Stripe dispute {obj.get('id')} lost: owed again"})
            return outcome
        if row.kind == "charge.refunded":
            invoice_id = await self._paid_invoice(obj)
            if invoice_id is None:
                return "ignored", (f"a refund of {obj.get('payment_intent')}, which paid no dunning "
                                   "invoice we saw")
            _, refunded = _money(obj, "amount_refunded")
            return await self._reverse(row, invoice_id, f"refund:{obj.get('id')}", refunded,
                                       f"Stripe refund of charge {obj.get('id')}")
        return "ignored", f"{row.kind}: not an event dunning acts on"

    async def _reverse(self, row: WebhookEvent, invoice_id: str, key: str, total: Decimal,
                       reason: str) -> Outcome:
        """Take a payment back: ``total`` is cumulative (a charge's refunds so far), so each
        refund event applies only what is new."""
        try:
            status = await self.dunning.reverse(invoice_id, f"{total:f}", key=key, reason=reason,
                                                actor="webhook:stripe")
        except ActionRefused as exc:
            if exc.transient:
                raise Busy(str(exc)) from None
            await self._note(invoice_id, "reversal_refused", f"{reason}: {exc}", row)
            return "failed", f"not applied: {exc}"
        return "done", f"reversed; the run is {status.state}, balance {status.balance_due}"

    async def _paid_invoice(self, obj: dict[str, Any]) -> str | None:
        """The invoice the object's PaymentIntent paid, as its succeeded event named it."""
        intent = obj.get("payment_intent")
        return await asyncio.to_thread(self.inbox.invoice_of, "stripe", str(intent)) if intent else None

    async def _act(self, row: WebhookEvent, invoice_id: str, action: str,
                   fields: dict[str, Any]) -> Outcome:
        try:
            status = await self.dunning.act(invoice_id, action, fields, actor="webhook:stripe",
                                            request_id=f"stripe:{row.event_id}")
        except ActionRefused as exc:
            if exc.transient:
                raise Busy(str(exc)) from None
            await self._note(invoice_id, f"{action}_refused", str(exc), row)
            return "done", f"not applied: {exc}"
        return "done", f"{action}: the run is {status.state}"

    # SendGrid

    async def _sendgrid(self, row: WebhookEvent, event: dict[str, Any]) -> Outcome:
        invoice_id, step = row.invoice_id, event.get("dunning_step")
        kind = row.kind
        run = await asyncio.to_thread(self.ledger.run, invoice_id) if invoice_id else None
        if run is None:
            return "ignored", "not a message of a dunning run"
        if kind in SENDGRID_TRAIL:
            await self._note(invoice_id or "", SENDGRID_TRAIL[kind], f"email {SENDGRID_TRAIL[kind]}", row,
                             step=step, channel="email")
            return "done", SENDGRID_TRAIL[kind]
        if kind in SENDGRID_UNREACHABLE:
            why = excerpt(str(event.get("reason") or event.get("type") or ""), 200, event.get("email"))
            reason = f"{UNREACHABLE} SendGrid {kind}: {why}"
            await asyncio.to_thread(self.ledger.opt_out, run.customer_id, "email", reason)
            await self._note(invoice_id or "", "unreachable", f"email {kind}: later email steps fall back",
                             row, step=step, channel="email")
            return "done", "email marked unreachable"
        if kind in SENDGRID_OPT_OUT:
            await asyncio.to_thread(self.ledger.opt_out, run.customer_id, "email", f"SendGrid {kind}")
            await self._note(invoice_id or "", "opted_out", f"email {kind}", row, step=step, channel="email")
            return "done", "opted out of email"
        return "ignored", f"{kind}: not an event dunning acts on"

    # Twilio

    async def _twilio_sms(self, row: WebhookEvent, form: dict[str, str]) -> Outcome:
        number, text = form.get("From", ""), form.get("Body", "").strip()
        customers = await asyncio.to_thread(self.ledger.customers_with_phone, number)
        if not customers:
            return "ignored", "a number no customer has"
        word = text.upper()
        if word in STOP_WORDS:
            for customer in customers:
                await asyncio.to_thread(self.ledger.opt_out, customer, "sms", f"replied {word}")
            return "done", f"opted out of SMS ({len(customers)} customer(s))"
        if word in START_WORDS:
            for customer in customers:
                await asyncio.to_thread(self.ledger.opt_in, customer, "sms")
            return "done", f"opted back in to SMS ({len(customers)} customer(s))"
        if word == "HELP":
            return "done", "answered HELP"
        invoices = await asyncio.to_thread(self.ledger.open_invoices, customers)
        for invoice_id in invoices:
            await self._note(invoice_id, "reply", f"SMS reply: {text}"[:1000], row, channel="sms")
        return "done", f"reply recorded on {len(invoices)} open invoice(s)"

    async def _pay_link(self, row: WebhookEvent, data: dict[str, str]) -> Outcome:
        try:
            await self.dunning.send_pay_link(data["invoice_id"], data["call_sid"])
        except RunClosed as exc:
            return "ignored", str(exc)
        return "done", "pay link requested from the run"

    async def _twilio_status(self, row: WebhookEvent, form: dict[str, str]) -> Outcome:
        """An SMS undelivered or failed after Twilio accepted it, or a call nobody answered: it
        never reached the customer, so it is refused on every invoice it carried (a shared
        message carries several) and each run's step falls back to its next channel. Every
        call outcome goes on the trail."""
        sid = form.get("MessageSid") or form.get("CallSid") or ""
        status = form.get("MessageStatus") or form.get("CallStatus") or ""
        found = await asyncio.to_thread(self.ledger.delivery_by_message_id, sid)
        if found is None:
            return "ignored", "not a message of a dunning run"
        code = f" (error {form['ErrorCode']})" if form.get("ErrorCode") else ""
        sms = "MessageSid" in form
        channel, noun, failed = ("sms", "SMS", UNDELIVERED_SMS) if sms else ("voice", "call", UNANSWERED_CALL)
        entry = "failed" if sms else f"call_{status.replace('-', '_')}"  # the trail's status
        if not sms and status == "completed":
            await self._note(found.invoice_id, entry, f"call completed{code}", row, step=found.step,
                             channel=channel)
            return "done", "call completed"
        if status not in failed:
            return "ignored", f"{noun} {status}"
        refused = await asyncio.to_thread(self.ledger.refused_later, sid,
                                          f"{'carrier' if sms else 'call'}: {status}{code}")
        if not refused:
            return "ignored", "already settled"
        what = f"SMS {status} after Twilio accepted it" if sms else f"call {status}"
        ended = 0
        for delivery in refused:  # a shared message: every invoice it carried
            await self._note(delivery.invoice_id, entry, f"{what}{code}", row, step=delivery.step,
                             channel=channel)
            try:
                await self.dunning.delivery_refused(delivery.invoice_id, delivery.step, channel)
            except RunClosed:
                ended += 1
        told = f"refused on {len(refused)} invoice(s); each step falls back if its run has not moved on"
        return "done", f"{told} ({ended} run(s) had ended)" if ended else told

    # Unsubscribe

    async def _unsubscribe(self, row: WebhookEvent, data: dict[str, str]) -> Outcome:
        await asyncio.to_thread(self.ledger.opt_out, data["customer_id"], "email", "one-click unsubscribe")
        await self._note(data["invoice_id"], "opted_out", "unsubscribed from email (one click)", row,
                         channel="email")
        return "done", "opted out of email"

    async def _note(self, invoice_id: str, status: str, detail: str, row: WebhookEvent | None = None, *,
                    step: str | None = None, channel: str | None = None) -> None:
        workflow_id = workflow_id_for(invoice_id)
        await asyncio.to_thread(self.ledger.append, AuditEvent(
            key=audit_key(workflow_id, "webhook", row.provider if row else "",
                          row.event_id if row else status, status),
            workflow_id=workflow_id, invoice_id=invoice_id, at=utcnow(), kind=AuditKind.COMMUNICATION,
            status=status, step=step, channel=channel, detail=detail[:1000]))


# -- routes ------------------------------------------------------------------------------------


def routes(settings: Settings, state: dict[str, Any]) -> APIRouter:
    """The webhook routes; ``state`` holds the app's ``inbox`` once started, and its
    ``processor`` once Temporal answers (events wait in the inbox until then)."""
    router = APIRouter(tags=["webhooks"])
    public = (settings.public_url or "").rstrip("/")

    async def keep(events: list[Incoming]) -> int:
        inbox: Inbox = state["inbox"]
        fresh = 0
        for event in events:
            fresh += await asyncio.to_thread(inbox.store, event)
        processor: Processor | None = state.get("processor")  # None until Temporal answers
        if processor is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(processor.drain())
        return fresh

    def configured(value: object, name: str) -> None:
        if not value:
            raise Refused(404, f"this webhook is not configured (set {name})")

    async def twilio_form(request: Request, path: str) -> dict[str, str]:
        """The posted form, if Twilio signed it for ``{DUNNING_PUBLIC_URL}{path}``."""
        token = settings.twilio_auth_token
        configured(token and public, "TWILIO_AUTH_TOKEN and DUNNING_PUBLIC_URL")
        assert token is not None
        return verify_twilio(f"{public}{path}", await bounded_body(request),
                             request.headers.get("X-Twilio-Signature"), token.get_secret_value())

    async def guarded(work: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await work()
        except Refused as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @router.post("/webhooks/stripe", summary="Stripe events (Stripe-Signature)")
    async def stripe_events(request: Request) -> Response:
        async def work() -> Response:
            secret = settings.stripe_webhook_secret
            configured(secret, "STRIPE_WEBHOOK_SECRET")
            assert secret is not None
            event = verify_stripe(await bounded_body(request), request.headers.get("Stripe-Signature"),
                                  secret.get_secret_value())
            obj = (event.get("data") or {}).get("object") or {}
            reference = obj.get("id") if str(obj.get("id", "")).startswith("pi_") else None
            fresh = await keep([Incoming(
                "stripe", str(event.get("id")), str(event.get("type")), event, reference=reference,
                invoice_id=(obj.get("metadata") or {}).get("invoice_id") if reference else None)])
            return JSONResponse({"received": True, "duplicate": not fresh})
        return await guarded(work)

    @router.post("/webhooks/sendgrid", summary="SendGrid signed Event Webhook")
    async def sendgrid_events(request: Request) -> Response:
        async def work() -> Response:
            configured(settings.sendgrid_webhook_public_key, "DUNNING_SENDGRID_WEBHOOK_PUBLIC_KEY")
            events = verify_sendgrid(
                await bounded_body(request), request.headers.get("X-Twilio-Email-Event-Webhook-Signature"),
                request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp"),
                settings.sendgrid_webhook_public_key or "")
            fresh = await keep([Incoming(
                "sendgrid", str(e.get("sg_event_id") or f"{e.get('sg_message_id')}:{e.get('event')}"),
                str(e.get("event")), e, invoice_id=e.get("dunning_invoice")) for e in events])
            return JSONResponse({"received": len(events), "new": fresh})
        return await guarded(work)

    @router.post("/webhooks/twilio/sms", summary="Inbound SMS (X-Twilio-Signature)")
    async def twilio_sms(request: Request) -> Response:
        async def work() -> Response:
            form = await twilio_form(request, "/webhooks/twilio/sms")
            sid = form.get("MessageSid") or form.get("SmsSid", "")
            await keep([Incoming("twilio", sid, "sms.inbound", form)])
            reply = ""
            if form.get("Body", "").strip().upper() == "HELP":
                reply = (f"<Message>{escape(settings.company_name)}: reminders about your invoices. Pay "
                         f"with the link in our messages; questions: {escape(settings.email_from)}. "
                         "Reply STOP to opt out.</Message>")
            return Response(f'<?xml version="1.0" encoding="UTF-8"?><Response>{reply}</Response>',
                            media_type="application/xml")
        return await guarded(work)

    @router.post("/webhooks/twilio/status", summary="SMS and call outcomes (X-Twilio-Signature)")
    async def twilio_status(request: Request) -> Response:
        async def work() -> Response:
            form = await twilio_form(request, "/webhooks/twilio/status")
            sid = form.get("MessageSid") or form.get("CallSid") or ""
            status = form.get("MessageStatus") or form.get("CallStatus") or ""
            await keep([Incoming("twilio-status", f"{sid}:{status}", f"status.{status}"[:64], form)])
            return Response(status_code=204)
        return await guarded(work)

    @router.post("/webhooks/twilio/voice", summary="A call's key press (X-Twilio-Signature, signed token)")
    async def twilio_voice(request: Request, t: str = "") -> Response:
        async def work() -> Response:
            secret = settings.signing_secret
            configured(secret, "DUNNING_SIGNING_SECRET")
            assert secret is not None
            form = await twilio_form(request, f"/webhooks/twilio/voice?{request.url.query}")
            found = read_token(secret.get_secret_value(), VOICE, t)
            if found is None or len(found) != 2:
                raise Refused(403, "t: not a token of this deployment")
            words = "Goodbye."
            if form.get("Digits") == "1" and form.get("CallSid"):
                await keep([Incoming("twilio-voice", f"{form['CallSid']}:pay_link", "voice.pay_link",
                                     {"invoice_id": found[0], "call_sid": form["CallSid"]})])
                words = "We are sending you a text message with the payment link. Goodbye."
            return Response(f'<?xml version="1.0" encoding="UTF-8"?><Response><Say>{words}</Say></Response>',
                            media_type="application/xml")
        return await guarded(work)

    def unsubscriber(token: str) -> tuple[str, str]:
        secret = settings.signing_secret
        configured(secret, "DUNNING_SIGNING_SECRET")
        assert secret is not None
        found = read_token(secret.get_secret_value(), UNSUBSCRIBE, token)
        if found is None or len(found) != 2:
            raise Refused(404, "this unsubscribe link is not valid")
        return found[0], found[1]

    @router.get("/unsubscribe/{token}", response_class=HTMLResponse, summary="Unsubscribe page")
    async def unsubscribe_page(token: str) -> Response:
        async def work() -> Response:
            unsubscriber(token)
            return HTMLResponse(
                "<!doctype html><title>Unsubscribe</title><p>Stop receiving payment reminders by "
                f"email from {html.escape(settings.company_name)}?</p><form method=post>"
                "<button>Unsubscribe</button></form>")
        return await guarded(work)

    @router.post("/unsubscribe/{token}", response_class=HTMLResponse, summary="One-click unsubscribe")
    async def unsubscribe(token: str) -> Response:
        async def work() -> Response:
            customer_id, invoice_id = unsubscriber(token)
            await keep([Incoming("unsubscribe", f"{customer_id}:{invoice_id}", "unsubscribe",
                                 {"customer_id": customer_id, "invoice_id": invoice_id})])
            return HTMLResponse("<!doctype html><title>Unsubscribed</title><p>You will receive no more "
                                "payment reminders by email.</p>")
        return await guarded(work)

    return router


async def drain_forever(processor: Processor) -> None:
    """Pass over pending events every few seconds (events a Temporal outage left behind)."""
    while True:
        try:
            await processor.drain()
        except Exception:  # keep the loop alive; the next pass tries again
            log.exception("webhook inbox pass failed")
        await asyncio.sleep(DRAIN_EVERY)
