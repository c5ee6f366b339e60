"""What the workflow asks a delivery activity to do, and what it hears back."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from models.invoice import Invoice
from models.payment import PaymentReceived
from models.policy import Channel


class Purpose(StrEnum):
    REMINDER = "reminder"  # a step's message to the customer
    HANDOFF = "handoff"  # the account referred to the agency
    PAYMENT_REPORT = "payment_report"  # a payment on an account the agency holds


class DeliveryRequest(BaseModel):
    """One message for one (invoice, step, channel): the ledger key that prevents duplicates."""

    model_config = ConfigDict(frozen=True)

    workflow_id: str
    invoice: Invoice
    step: str
    template: str
    channel: Channel
    purpose: Purpose = Purpose.REMINDER
    balance_due: Decimal
    as_of: datetime  # the workflow's time when it asked: "days overdue" counts to this
    payment: PaymentReceived | None = None


class DeliveryStatus(StrEnum):
    SENT = "sent"
    FAILED = "failed"  # permanent for this channel: the workflow falls back
    UNKNOWN = "unknown"  # the provider may have it; not re-sent, left for reconciliation


class DeliveryResult(BaseModel):
    status: DeliveryStatus
    channel: Channel
    provider_message_id: str | None = None
    detail: str = ""
    repeated: bool = False  # an earlier attempt had already done this; nothing was sent now
