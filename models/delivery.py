"""What the workflow asks a delivery activity to do, and what it hears back.

No contact details travel here: the activity reads the customer's email and phone from the
database when it sends, so a corrected number reaches runs already in flight and nothing personal
is written into a Temporal history.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from models.charges import Charges
from models.contact import ContactRules
from models.payment import PaymentReceived
from models.policy import Channel
from models.run import CLOSED, HELD, RunInvoice, RunRecord, RunState


class Purpose(StrEnum):
    REMINDER = "reminder"  # a step's message to the customer
    HANDOFF = "handoff"  # the account referred to the agency, then the customer told so
    PAYMENT_REPORT = "payment_report"  # a payment on an account the agency holds
    RECALL = "recall"  # the account taken back from the agency (cancelled, written off)
    ADJUSTMENT = "adjustment"  # what the agency should collect changed (a part written off, a reversal)
    INSTALMENT = "instalment"  # a reminder of a payment plan's instalment
    CONFIRMATION = "confirmation"  # the one message a cease-communication hold allows


def halts(purpose: Purpose, state: RunState) -> bool:
    """Whether a message for ``purpose`` must not go out while the run is in ``state``: nothing
    reaches the customer once the run is closed, and only a plan's own reminders while it is
    held. Reports and recalls to the agency always go out."""
    if purpose in (Purpose.REMINDER, Purpose.HANDOFF):
        return state in CLOSED or state in HELD
    if purpose is Purpose.INSTALMENT:
        return state in CLOSED or (state in HELD and state is not RunState.ON_PLAN)
    return False


class InstalmentDue(BaseModel):
    """The instalment a plan reminder is about."""

    model_config = ConfigDict(frozen=True)

    due_on: date
    amount: str


class DeliveryRequest(BaseModel):
    """One step's message: its channels in order of preference, tried until one is not refused.

    The ledger key of each attempt is (invoice, step, channel), which is what prevents duplicates.
    ``records`` are audit entries the workflow made since its last activity; they ride along
    instead of costing an activity of their own. ``on_sent`` are written with the outcome, in
    the same transaction, only if the first channel's message was sent.
    """

    model_config = ConfigDict(frozen=True)

    workflow_id: str
    invoice: RunInvoice
    step: str
    template: str
    channels: tuple[Channel, ...]
    notice: tuple[Channel, ...] = ()  # after a handoff: how the customer is told
    purpose: Purpose = Purpose.REMINDER
    balance_due: Decimal  # at scheduling; the activity quotes the balance at sending
    as_of: datetime  # the workflow's time when it asked: "days overdue" counts to this
    payment: PaymentReceived | None = None
    reason: str = ""  # a recall's reason
    instalment: InstalmentDue | None = None
    records: tuple[RunRecord, ...] = ()
    on_sent: tuple[RunRecord, ...] = ()
    contact: ContactRules | None = None  # when the customer may be contacted (None: any time)
    charges: Charges | None = None  # fees and interest at ``as_of``, itemised in the message
    letter: bool = False  # attach the formal final notice (PDF) to an email
    collections_after: datetime | None = None  # the letter's date after which the agency gets it


class DeliveryStatus(StrEnum):
    SENT = "sent"
    FAILED = "failed"  # no channel could take it (refused, opted out, no address)
    UNKNOWN = "unknown"  # the provider may have it and cannot tell; an operator reconciles
    STOPPED = "stopped"  # the run was paid or cancelled before anything went out
    DEFERRED = "deferred"  # not now (contact window, frequency cap): ask again at ``until``


class DeliveryResult(BaseModel):
    status: DeliveryStatus
    channel: Channel | None = None
    provider_message_id: str | None = None
    detail: str = ""
    repeated: bool = False  # an earlier attempt had already done this; nothing was sent now
    notice: DeliveryStatus | None = None  # a handoff's message to the customer
    customer_holds: tuple[str, ...] = ()  # STOPPED because the customer is on hold: the holds
    until: datetime | None = None  # DEFERRED: the earliest moment the rules allow it
