"""The delivery activity: render, claim the ledger row, send, record. Exactly once where possible.

Neither SendGrid nor Twilio accepts an idempotency key, so duplicates are prevented here:

1. The ledger row for (invoice, step, channel) is claimed *before* the provider is called.
2. A row already ``sent``, ``failed`` or ``unknown`` ends the attempt without sending again.
3. A row found ``pending`` by a later attempt means an earlier attempt died while calling the
   provider. An email is sent again (a duplicate email is the lesser harm than none); an SMS or a
   call is not: the outcome is recorded as ``unknown`` for an operator to reconcile.
4. The outcome and its audit entry are written in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.channels import (
    AmbiguousSendError,
    OutgoingMessage,
    PermanentSendError,
    ProviderConfigError,
    RetryableSendError,
    Sender,
)
from activities.ledger import Ledger, communication
from activities.rendering import Renderer
from models.audit import AuditEvent
from models.delivery import DeliveryRequest, DeliveryResult, DeliveryStatus
from models.policy import Channel
from models.records import Delivery

log = logging.getLogger(__name__)

# Channels where sending twice is worse than an unknown outcome an operator checks by hand.
NO_BLIND_RESEND = frozenset({Channel.SMS, Channel.VOICE})
FINAL = {"sent", "failed", "unknown"}


class DeliveryActivities:
    """Activities that touch providers and the database. Built once per worker with its clients."""

    def __init__(self, ledger: Ledger, senders: Mapping[Channel, Sender], renderer: Renderer):
        self.ledger = ledger
        self.senders = dict(senders)
        self.renderer = renderer

    @activity.defn(name="deliver")
    def deliver(self, request: DeliveryRequest) -> DeliveryResult:
        """Deliver one message of a step on one channel, at most once."""
        message = self.renderer.render(request)
        row, created = self.ledger.claim(request)
        if row.status in FINAL:
            return self._earlier_outcome(row)
        if row.status == "pending" and not created and request.channel in NO_BLIND_RESEND:
            detail = "an earlier attempt stopped while calling the provider; not re-sent"
            self.ledger.update(row, communication(request, "unknown", detail), status="unknown",
                               detail=detail)
            return DeliveryResult(status=DeliveryStatus.UNKNOWN, channel=request.channel,
                                  detail=detail)
        customer_id = request.invoice.customer.id
        if request.channel is not Channel.AGENCY and self.ledger.opted_out(customer_id,
                                                                           request.channel):
            self._reject(request, row, f"customer opted out of {request.channel}")
        row = self.ledger.update(row, status="pending", attempts=row.attempts + 1)
        return self._send(request, row, message)

    def _send(self, request: DeliveryRequest, row: Delivery, message: OutgoingMessage
              ) -> DeliveryResult:
        sender = self.senders[request.channel]
        attempt = activity.info().attempt
        try:
            message_id = sender.send(message)
        except PermanentSendError as err:
            if err.opted_out:
                self.ledger.opt_out(request.invoice.customer.id, request.channel, err.reason)
            self._reject(request, row, err.reason, provider=sender.provider)
        except AmbiguousSendError as err:
            if request.channel in NO_BLIND_RESEND:
                detail = f"outcome unknown, not re-sent: {err.reason}"
                self.ledger.update(row, communication(request, "unknown", detail),
                                   status="unknown", detail=detail, provider=sender.provider)
                return DeliveryResult(status=DeliveryStatus.UNKNOWN, channel=request.channel,
                                      detail=detail)
            self._retry_later(request, row, err, attempt, "ProviderUnavailable")
        except ProviderConfigError as err:
            log.error("%s rejected our configuration: %s (invoice %s will be retried)",
                      sender.provider, err.reason, request.invoice.invoice_id)
            self._retry_later(request, row, err, attempt, "ProviderConfigError")
        except RetryableSendError as err:
            self._retry_later(request, row, err, attempt, "ProviderUnavailable",
                              retry_after=err.retry_after)
        detail = f"{sender.provider} accepted as {message_id}"
        self.ledger.update(row, communication(request, "sent", detail), status="sent",
                           provider=sender.provider, provider_message_id=message_id, detail=detail)
        return DeliveryResult(status=DeliveryStatus.SENT, channel=request.channel,
                              provider_message_id=message_id, detail=detail)

    def _reject(self, request: DeliveryRequest, row: Delivery, reason: str, provider: str = ""
                ) -> None:
        """Record a permanent failure and raise the non-retryable error the workflow falls back on."""
        self.ledger.update(row, communication(request, "failed", reason), status="failed",
                           detail=reason, provider=provider or row.provider)
        raise ApplicationError(reason, type="DeliveryRejected", non_retryable=True)

    def _retry_later(self, request: DeliveryRequest, row: Delivery, err: Exception, attempt: int,
                     error_type: str, retry_after: float | None = None) -> None:
        """Record the failed attempt and raise a retryable error (Temporal backs off)."""
        detail = f"attempt {attempt}: {err}"
        self.ledger.update(row, communication(request, "retrying", detail, suffix=f":{attempt}"),
                           status="retrying", detail=detail)
        delay = timedelta(seconds=retry_after) if retry_after and retry_after > 0 else None
        raise ApplicationError(detail, type=error_type, next_retry_delay=delay) from err

    @staticmethod
    def _earlier_outcome(row: Delivery) -> DeliveryResult:
        if row.status == "failed":
            raise ApplicationError(row.detail, type="DeliveryRejected", non_retryable=True)
        return DeliveryResult(status=DeliveryStatus(row.status), channel=Channel(row.channel),
                              provider_message_id=row.provider_message_id,
                              detail=row.detail, repeated=True)

    @activity.defn(name="record_event")
    def record_event(self, event: AuditEvent) -> None:
        """Append a state change, payment or skip to the audit trail (once per event key)."""
        self.ledger.record(event)
