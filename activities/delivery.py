"""The delivery activity: one step's message, through its channels in order, exactly once where the
provider allows it.

Neither SendGrid nor Twilio accepts an idempotency key, so duplicates are prevented here. For each
channel, two database transactions frame the provider call:

1. **claim**: write the workflow's pending records; stop if the run is already paid or cancelled;
   refuse the channel if the customer cannot be reached on it (no address, opted out, erased);
   otherwise mark the ledger row ``calling`` (compare-and-set on its version).
2. **complete**: the outcome and its audit entry, only if this attempt still holds the row.

A row already ``sent`` or ``unknown`` ends the attempt without sending. A row found ``calling`` or
``ambiguous`` means an earlier attempt may have reached the provider: SMS and calls are looked up
at Twilio (messages or calls to that number since the first call) before anything is re-sent, so
they go out exactly once; only a lookup that cannot decide leaves them ``unknown`` for
``dunning reconcile``. An email cut off that way is sent again (SendGrid cannot be asked) and
marked *possible duplicate*. Permanent refusals move on to the next channel inside the same
activity, so a fallback costs no extra round trip through the workflow.

While it runs longer than a moment, the activity heartbeats from a helper thread: a worker killed
mid-send is noticed within the heartbeat timeout instead of the start-to-close timeout, and a
payment's cancellation reaches it. Provider calls are shielded from that cancellation: a send that
has begun is always recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import NoReturn

from sqlalchemy.exc import DataError, StatementError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.channels import (
    AmbiguousSendError,
    PermanentSendError,
    ProviderConfigError,
    RejectedSendError,
    RetryableSendError,
    Sender,
    SendError,
)
from activities.ledger import Claim, Decision, Ledger
from activities.redact import excerpt, redact
from activities.rendering import Renderer
from models.audit import AuditEvent, AuditKind, audit_key
from models.contact import ContactError
from models.delivery import DeliveryRequest, DeliveryResult, DeliveryStatus, Purpose
from models.policy import Channel
from models.records import utcnow
from models.run import RecordBatch, RunRecord

log = logging.getLogger(__name__)

# Purposes that must not go out once the run is closed or held (``models.delivery.halts``;
# reports and recalls to the agency always go out).
GUARDED = frozenset({Purpose.REMINDER, Purpose.HANDOFF, Purpose.INSTALMENT})
HEARTBEAT_EVERY = 1.5  # seconds; the workflow's heartbeat timeout is a few times this
BROKEN = "DeliveryBroken"  # non-retryable: needs an operator (template, stored data)

Outcome = Callable[[Channel, str], None]  # told each recorded outcome (metrics)


class DeliveryActivities:
    """Activities that touch providers and the database. Built once per worker with its clients."""

    def __init__(self, ledger: Ledger, senders: Mapping[Channel, Sender], renderer: Renderer,
                 on_outcome: Outcome | None = None):
        self.ledger = ledger
        self.senders = dict(senders)
        self.renderer = renderer
        self.on_outcome: Outcome = on_outcome or (lambda channel, outcome: None)

    @activity.defn(name="deliver")
    def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        """Deliver one step's message; for a handoff, then tell the customer (if still unpaid)."""
        with keep_alive(), broken_on_bad_data(self.ledger, request):
            guard = request.purpose in GUARDED
            result = self._first_that_works(request, request.channels, guard=guard,
                                            on_sent=request.on_sent)
            if request.purpose is Purpose.HANDOFF and result.status is DeliveryStatus.SENT:
                # the handoff waited for the customer's window; the notice follows it at once
                told = request.model_copy(update={"contact": None})
                notice = self._first_that_works(told, request.notice, guard=True, on_sent=())
                result = result.model_copy(update={"notice": notice.status})
            return result

    def _first_that_works(self, request: DeliveryRequest, channels: tuple[Channel, ...], *,
                          guard: bool, on_sent: tuple[RunRecord, ...]) -> DeliveryResult:
        refusals: list[str] = []
        for channel in channels:
            with activity.shield_thread_cancel_exception():
                claim = self.ledger.claim(request, channel, guard=guard)
                if claim.decision is Decision.STOPPED:
                    return DeliveryResult(status=DeliveryStatus.STOPPED, customer_holds=claim.holds,
                                          detail="the run was closed or put on hold; nothing sent")
                if claim.decision is Decision.DEFERRED:
                    assert claim.deferral is not None
                    return DeliveryResult(status=DeliveryStatus.DEFERRED, channel=channel,
                                          until=claim.deferral.until, detail=claim.deferral.reason)
                if claim.decision is Decision.DONE:
                    row = claim.row
                    assert row is not None
                    return DeliveryResult(status=DeliveryStatus(row.status), channel=channel,
                                          provider_message_id=row.provider_message_id,
                                          detail=row.detail, repeated=True)
                if claim.decision is Decision.REFUSED:
                    refusals.append(f"{channel}: {claim.row.detail if claim.row else ''}")
                    continue
                result = self._send(request, channel, claim, on_sent)
            if result is not None:
                return result
            refusals.append(f"{channel}: refused")
        return DeliveryResult(status=DeliveryStatus.FAILED,
                              detail="; ".join(refusals) or "no channel to try")

    def _send(self, request: DeliveryRequest, channel: Channel, claim: Claim,
              on_sent: tuple[RunRecord, ...]) -> DeliveryResult | None:
        """Send on one claimed channel. None: refused for good on this channel (try the next)."""
        sender = self.senders[channel]
        assert claim.balance_due is not None
        if request.charges is not None and claim.balance_due != request.balance_due:
            # a payment since the run asked: the total is the one in the runs table now, and the
            # itemisation of the older total would not add up to it, so the message leaves it out
            request = request.model_copy(update={"charges": None})
        secrets = _personal(claim.customer)
        try:
            message = self.renderer.render(request, channel, claim.customer, claim.balance_due,
                                           shared=claim.bundle.lines if claim.bundle else ())
        except Exception as err:  # a missing template, a stored locale Babel refuses: an operator's
            self._give_up(request, claim, channel, redact(
                f"cannot render {request.template!r}: {err.__class__.__name__}: {err}", *secrets))
        secrets = (*secrets, message.recipient)
        note = ""
        if claim.decision is Decision.RECONCILE:
            assert claim.since is not None
            try:
                found = sender.find_sent(message, claim.since)
            except AmbiguousSendError as err:
                return self._finish(request, claim, channel, sender, "unknown",
                                    f"an earlier attempt was cut off and the provider cannot tell "
                                    f"whether it sent it: {redact(err.reason, *secrets)}")
            except SendError as err:
                self._retry_later(request, claim, channel, err, secrets, keep_interrupted=True)
            if found is not None:
                return self._finish(request, claim, channel, sender, "sent",
                                    f"{sender.provider} had accepted it as {found} (an earlier "
                                    "attempt was cut off)", message_id=found, on_sent=on_sent)
            if channel is Channel.EMAIL:
                note = " (possible duplicate: an earlier attempt was cut off mid-send)"
        try:
            message_id = sender.send(message)
        except PermanentSendError as err:
            self._finish(request, claim, channel, sender, "failed", redact(err.reason, *secrets),
                         opt_out=err.opted_out)
            return None
        except AmbiguousSendError as err:
            self._retry_later(request, claim, channel, err, secrets, keep_interrupted=True)
        except RejectedSendError as err:
            self._give_up(request, claim, channel, redact(err.reason, *secrets))
        except ProviderConfigError as err:
            log.error("%s rejected our configuration: %s (invoice %s will be retried)",
                      sender.provider, redact(err.reason, *secrets), request.invoice.invoice_id)
            self._retry_later(request, claim, channel, err, secrets)
        except RetryableSendError as err:
            self._retry_later(request, claim, channel, err, secrets)
        return self._finish(request, claim, channel, sender, "sent",
                            f"{sender.provider} accepted as {message_id}{note}",
                            message_id=message_id, on_sent=on_sent,
                            status_note="possible_duplicate" if note else "")

    def _finish(self, request: DeliveryRequest, claim: Claim, channel: Channel, sender: Sender,
                status: str, detail: str, *, message_id: str | None = None, opt_out: bool = False,
                on_sent: tuple[RunRecord, ...] = (), status_note: str = "") -> DeliveryResult:
        moved = self.ledger.complete(request, claim, status, detail, channel=channel,
                                     provider=sender.provider, message_id=message_id,
                                     opt_out=opt_out, records=on_sent if status == "sent" else (),
                                     audit_suffix=status_note)
        self.on_outcome(channel, status)
        if moved is None:  # a newer attempt took the row over while this one was calling
            raise ApplicationError("the ledger row moved under this attempt", type="StaleAttempt")
        delivery_status = {"sent": DeliveryStatus.SENT, "unknown": DeliveryStatus.UNKNOWN}.get(
            status, DeliveryStatus.FAILED)
        return DeliveryResult(status=delivery_status, channel=channel,
                              provider_message_id=message_id, detail=moved.detail)

    def _give_up(self, request: DeliveryRequest, claim: Claim, channel: Channel, reason: str) -> NoReturn:
        """Fail the delivery for good: retrying cannot help until an operator has looked (a
        template is missing, the agency refused the document). The run shows ``failed``."""
        moved = self.ledger.complete(request, claim, "broken", reason, channel=channel)
        self.on_outcome(channel, moved.status if moved else "broken")
        raise ApplicationError(reason, type=BROKEN, non_retryable=True) from None

    def _retry_later(self, request: DeliveryRequest, claim: Claim, channel: Channel,
                     err: SendError, secrets: tuple[str | None, ...],
                     *, keep_interrupted: bool = False) -> None:
        """Record the failed attempt and raise a retryable error (Temporal backs off).

        ``keep_interrupted``: the provider may have the message, so the next attempt looks it up
        before sending (the row stays ``ambiguous``)."""
        attempt = activity.info().attempt
        reason = redact(err.reason, *secrets)
        detail = f"attempt {attempt}: {reason}"
        status = "ambiguous" if keep_interrupted else "retrying"
        # The row always shows the latest attempt; the trail gets the first few and then every
        # tenth, so a day-long outage is visible without thousands of entries.
        moved = self.ledger.complete(request, claim, status, detail, channel=channel,
                                     audit_suffix=str(attempt) if attempt <= 3 or attempt % 10 == 0 else "")
        self.on_outcome(channel, moved.status if moved else status)
        retry_after = getattr(err, "retry_after", None)
        delay = timedelta(seconds=retry_after) if retry_after and retry_after > 0 else None
        error_type = "ProviderConfigError" if isinstance(err, ProviderConfigError) else "ProviderUnavailable"
        raise ApplicationError(detail, type=error_type, next_retry_delay=delay) from None

    @activity.defn(name="customer_holds")
    def customer_holds(self, customer_id: str) -> list[str]:
        """The holds on a customer as the database has them (a local activity of a held run)."""
        return self.ledger.holds_of(customer_id)

    @activity.defn(name="record")
    def record(self, batch: RecordBatch) -> None:
        """Write the workflow's records (payments, state changes) when no delivery carries them."""
        self.ledger.record(batch.invoice, batch.records)


def _personal(customer: object) -> tuple[str | None, ...]:
    """The customer's name, email and phone: never in an error text that reaches Temporal."""
    return tuple(getattr(customer, name, None) for name in ("name", "email", "phone"))


class _Pulse:
    """One thread heartbeats every delivery that has run longer than a moment.

    A quick delivery finishes before its first beat and costs no heartbeat (heartbeats are
    billable); a slow one (a provider taking its time, a lookup) beats every ``HEARTBEAT_EVERY``
    seconds, so the server notices a dead worker within the heartbeat timeout and can deliver a
    cancellation. One shared thread rather than one per delivery: starting a thread per message
    cost more CPU than the rest of a quick send's bookkeeping.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, tuple[float, contextvars.Context]] = {}
        self._thread: threading.Thread | None = None

    @contextmanager
    def keep_alive(self) -> Iterator[None]:
        key = threading.get_ident()
        with self._lock:
            self._running[key] = (time.monotonic(), contextvars.copy_context())
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="delivery-heartbeat",
                                                daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(key, None)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_EVERY / 3)
            now = time.monotonic()
            with self._lock:
                due = [(k, ctx) for k, (last, ctx) in self._running.items() if now - last >= HEARTBEAT_EVERY]
                for key, ctx in due:
                    self._running[key] = (now, ctx)
            for _key, ctx in due:
                with contextlib.suppress(Exception):  # the activity finished meanwhile
                    ctx.run(activity.heartbeat)


_pulse = _Pulse()
keep_alive = _pulse.keep_alive


@contextmanager
def broken_on_bad_data(ledger: Ledger, request: DeliveryRequest) -> Iterator[None]:
    """A database refusal of our data (not of our connection) will never succeed on retry: fail
    the activity for good with an audit entry, so the run shows ``failed`` to an operator instead
    of retrying forever."""
    try:
        yield
    except ContactError as err:  # a policy whose windows never open for this customer
        reason = f"the contact rules can never be met for this customer: {err}"
        _broken(ledger, request, reason)
    except (DataError, StatementError) as err:
        if not isinstance(err, DataError) and not isinstance(getattr(err, "orig", None), ValueError):
            raise
        # the driver's words may quote a value ("invalid input ... 'ada@example.com'"): masked
        reason = f"the database refused the data: {err.__class__.__name__}: {excerpt(str(err.orig), 300)}"
        _broken(ledger, request, reason)


def _broken(ledger: Ledger, request: DeliveryRequest, reason: str) -> NoReturn:
    """Fail the delivery for good, with an audit entry an operator sees."""
    ledger.append(AuditEvent(
        key=audit_key(request.workflow_id, "broken", request.step, utcnow().isoformat()),
        workflow_id=request.workflow_id, invoice_id=request.invoice.invoice_id, at=utcnow(),
        kind=AuditKind.COMMUNICATION, status="broken", step=request.step, detail=reason,
    ))
    raise ApplicationError(reason, type=BROKEN, non_retryable=True) from None
