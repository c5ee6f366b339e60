"""Database tables: customers, runs, the delivery ledger, the audit trail, the outbox, opt-outs,
and payments that no open run took.

Money is stored as decimal strings so no database turns cents into floats. Every write that an
activity retry could repeat is keyed (ledger by invoice/step/channel, audit by event key), so a
retry finds the earlier row instead of adding a second one. Free text is cut to its column's
size by the writer (see ``activities.ledger.fit``), never left for the database to refuse.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Column, DateTime, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

MAX_ROW_ID = 2**31 - 1  # the tables' integer ids: a larger number names no row


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored in UTC, read back timezone-aware, on SQLite (which keeps no zone) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class CustomerRecord(SQLModel, table=True):
    """A customer's contact details: kept here, never in Temporal, erasable (`customer forget`)."""

    __tablename__ = "customers"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(default="", max_length=200)
    email: str | None = Field(default=None, max_length=254)
    phone: str | None = Field(default=None, max_length=32)
    timezone: str | None = Field(default=None, max_length=64)  # None: from the phone, or the policy's
    locale: str = Field(default="en_US", max_length=32)
    type: str = Field(default="business", max_length=16)  # consumer or business
    country: str | None = Field(default=None, max_length=2)
    region: str | None = Field(default=None, max_length=8)
    policy: str | None = Field(default=None, max_length=64)
    exclude: bool = False
    holds: str = Field(default="", max_length=200)  # the customer's holds, comma separated (bankruptcy, ...)
    forgotten_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RunRow(SQLModel, table=True):
    """The database's mirror of a run: what a delivery checks just before it sends.

    Written by the workflow's records with a sequence number; an update with a lower ``seq`` than
    the row's is ignored, so a stale write can never undo a payment.
    """

    __tablename__ = "runs"

    invoice_id: str = Field(primary_key=True, max_length=64)
    workflow_id: str = Field(max_length=80)
    customer_id: str = Field(index=True, max_length=64)
    currency: str = Field(max_length=3)
    amount_due: str = Field(max_length=32)
    balance_due: str = Field(max_length=32)
    paid: str = Field(default="0", max_length=32)
    state: str = Field(max_length=16)
    stage: str | None = Field(default=None, max_length=64)
    seq: int = 0
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PaymentRow(SQLModel, table=True):
    """A payment no open run took: for an unknown invoice, or after its run ended.

    ``status``: ``unmatched`` (no run for the invoice), ``after_close`` (recorded after the run
    ended; reported to the agency when it held the account).
    """

    __tablename__ = "payments"
    __table_args__ = (UniqueConstraint("invoice_id", "payment_id", name="uq_payment"),)

    id: int | None = Field(default=None, primary_key=True)
    invoice_id: str = Field(index=True, max_length=64)
    payment_id: str = Field(max_length=128)
    amount: str = Field(max_length=32)
    currency: str = Field(max_length=8)
    paid_at: datetime = Field(sa_type=UTCDateTime)
    status: str = Field(max_length=16)
    detail: str = Field(default="", max_length=500)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Delivery(SQLModel, table=True):
    """The ledger: one row per (invoice, step, channel).

    ``status``: ``calling`` (written just before the provider is called), ``retrying`` (the
    provider did not take it), ``ambiguous`` (it may have), then ``sent``, ``failed`` or
    ``unknown``. Every update is compare-and-set on ``version``, so a stale attempt cannot
    overwrite a newer outcome. A row found ``calling`` or ``ambiguous`` by a later attempt is
    reconciled with the provider (messages since ``called_at``) before anything is re-sent.
    """

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("invoice_id", "step", "channel", name="uq_delivery_key"),)

    id: int | None = Field(default=None, primary_key=True)
    invoice_id: str = Field(index=True, max_length=64)
    workflow_id: str = Field(max_length=80)
    step: str = Field(max_length=200)
    channel: str = Field(max_length=16)
    status: str = Field(max_length=16)
    provider: str = Field(default="", max_length=32)
    provider_message_id: str | None = Field(default=None, max_length=200)
    detail: str = Field(default="", max_length=2000)
    attempts: int = 0
    version: int = 0
    called_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # When the customer was contacted, on the run's clock: what frequency caps count.
    contact_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PlannedContact(SQLModel, table=True):
    """When each run expects to message its customer (written at start, from the schedule): lets a
    delivery see that another invoice of the same customer is about to send on the same channel,
    and gather them into one message."""

    __tablename__ = "planned_contacts"
    __table_args__ = (UniqueConstraint("invoice_id", "step", name="uq_planned_step"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(index=True, max_length=64)
    invoice_id: str = Field(max_length=64)
    step: str = Field(max_length=200)
    channel: str = Field(max_length=16)
    at: datetime = Field(sa_type=UTCDateTime)


class Bundle(SQLModel, table=True):
    """One message to a customer standing for several of their invoices (consolidation).

    ``open`` until ``send_at`` while members join; then the first member to claim it after that
    sends it (``sending``) and records the outcome on every member's ledger row (``sent``)."""

    __tablename__ = "bundles"

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(index=True, max_length=64)
    channel: str = Field(max_length=16)
    status: str = Field(max_length=16)
    send_at: datetime = Field(sa_type=UTCDateTime)
    sender_invoice_id: str | None = Field(default=None, max_length=64)
    provider_message_id: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class BundleMember(SQLModel, table=True):
    """An invoice's step in a shared message (its ledger row is ``bundled`` meanwhile)."""

    __tablename__ = "bundle_members"
    __table_args__ = (UniqueConstraint("bundle_id", "invoice_id", name="uq_bundle_member"),)

    id: int | None = Field(default=None, primary_key=True)
    bundle_id: int = Field(index=True)
    invoice_id: str = Field(max_length=64)
    step: str = Field(max_length=200)
    pay_url: str = Field(max_length=2048)


class AuditEntry(SQLModel, table=True):
    """The audit trail. Rows are only ever inserted."""

    __tablename__ = "audit_entries"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=300)
    workflow_id: str = Field(max_length=80)
    invoice_id: str = Field(index=True, max_length=64)
    at: datetime = Field(sa_type=UTCDateTime)
    kind: str = Field(max_length=16)
    status: str = Field(max_length=32)
    step: str | None = Field(default=None, max_length=200)
    channel: str | None = Field(default=None, max_length=16)
    detail: str = Field(default="", max_length=2000)
    recorded_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class OutboxMessage(SQLModel, table=True):
    """A message rendered exactly as it would be sent, kept instead of sending (outbox mode)."""

    __tablename__ = "outbox_messages"

    id: int | None = Field(default=None, primary_key=True)
    reference: str = Field(unique=True, max_length=300)  # the ledger key: one message per key
    invoice_id: str = Field(index=True, max_length=64)
    channel: str = Field(max_length=16)
    recipient: str = Field(max_length=2000)
    subject: str | None = Field(default=None, max_length=500)
    body: str
    html: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class OptOut(SQLModel, table=True):
    """A customer's refusal of a channel (STOP reply, unsubscribe). Later sends there are refused."""

    __tablename__ = "opt_outs"
    __table_args__ = (UniqueConstraint("customer_id", "channel", name="uq_opt_out"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(max_length=64)
    channel: str = Field(max_length=16)
    reason: str = Field(default="", max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ApiRequest(SQLModel, table=True):
    """A POST to the HTTP API with an ``Idempotency-Key``: the first answer is kept and given
    again to a retry of the same request. ``status_code`` is None while the first is in progress.
    """

    __tablename__ = "api_requests"

    scope: str = Field(primary_key=True, max_length=64)  # which API key asked
    key: str = Field(primary_key=True, max_length=200)
    fingerprint: str = Field(max_length=64)  # method, path and body: a reused key is refused
    status_code: int | None = None
    response: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class WebhookEvent(SQLModel, table=True):
    """A provider's webhook event, stored before it is acknowledged and processed from here.

    Unique by (provider, event id): a redelivery changes nothing. ``status``: ``pending`` (to be
    processed; a Temporal outage leaves it here for the next pass), ``done``, ``ignored`` (not
    an event we act on), ``failed`` (needs an operator; ``detail`` says why). ``reference`` and
    ``invoice_id`` are what later events are matched by (a Stripe dispute names its payment).
    """

    __tablename__ = "webhook_events"
    __table_args__ = (UniqueConstraint("provider", "event_id", name="uq_webhook_event"),)

    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(max_length=16)
    event_id: str = Field(max_length=200)
    kind: str = Field(max_length=64)
    reference: str | None = Field(default=None, index=True, max_length=200)
    invoice_id: str | None = Field(default=None, max_length=64)
    payload: str
    status: str = Field(default="pending", index=True, max_length=16)
    attempts: int = 0
    detail: str = Field(default="", max_length=500)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    processed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
