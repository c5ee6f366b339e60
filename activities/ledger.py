"""Database operations behind the activities and the CLI: customers, the runs mirror, the
delivery ledger, the audit trail, opt-outs and payments no run took.

Every write here is keyed or compare-and-set, so the same call made twice (an activity retried
after a crash) finds the first row instead of writing a second, and a stale attempt can never
overwrite a newer outcome. Free text is cut to its column's size here (and the entry says so):
PostgreSQL refuses an over-long value, and a refused write retried forever wedges a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import Engine, func, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from models.audit import AuditEvent, AuditKind, audit_key
from models.database import session
from models.delivery import DeliveryRequest
from models.invoice import Customer
from models.policy import Channel
from models.records import (
    AuditEntry,
    CustomerRecord,
    Delivery,
    OptOut,
    OutboxMessage,
    PaymentRow,
    RunRow,
    utcnow,
)
from models.run import CLOSED, RunInvoice, RunRecord, RunSnapshot, RunState

TRUNCATED = " [truncated]"
FINAL = frozenset({"sent", "failed", "unknown"})
INTERRUPTED = frozenset({"calling", "ambiguous"})  # the provider may have it: look before sending
ERASED = "[erased]"


def fit(text: str | None, size: int) -> str:
    """``text`` cut to ``size`` characters, marked when cut."""
    text = text or ""
    return text if len(text) <= size else text[: size - len(TRUNCATED)] + TRUNCATED


def _limit(column: object) -> int:
    return int(column.type.length)  # type: ignore[attr-defined]


class Decision(StrEnum):
    SEND = "send"  # nothing reached the provider yet: send
    RECONCILE = "reconcile"  # an earlier attempt may have reached it: ask the provider first
    DONE = "done"  # sent (or unknown) already: nothing to do
    REFUSED = "refused"  # this channel cannot reach the customer: try the next
    STOPPED = "stopped"  # the run is paid or cancelled: send nothing


@dataclass(frozen=True)
class Claim:
    """What the first transaction of a send decided, with what the send needs."""

    decision: Decision
    row: Delivery | None = None
    customer: CustomerRecord | None = None
    balance_due: Decimal | None = None
    since: datetime | None = None  # RECONCILE: when the first provider call began


def reachable(customer: CustomerRecord | None, channel: Channel) -> str | None:
    """Why the customer cannot be reached on ``channel`` (None when they can)."""
    if channel is Channel.AGENCY:
        return None
    if customer is None:
        return "no contact details on file for this customer"
    if customer.forgotten_at is not None:
        return "the customer's contact details were erased"
    if channel is Channel.EMAIL and not customer.email:
        return "no email address on file"
    if channel in (Channel.SMS, Channel.VOICE) and not customer.phone:
        return "no phone number on file"
    return None


class Ledger:
    """The delivery ledger and the audit trail of one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- customers -----------------------------------------------------------------------------

    def upsert_customer(self, customer: Customer) -> None:
        """Store the billing system's current contact details (a corrected number reaches runs
        in flight: deliveries read it when they send)."""
        for _ in range(2):
            try:
                with session(self.engine) as db:
                    row = db.get(CustomerRecord, customer.id) or CustomerRecord(id=customer.id)
                    row.name, row.email, row.phone = customer.name, customer.email, customer.phone
                    row.timezone, row.locale = customer.timezone, customer.locale
                    row.forgotten_at, row.updated_at = None, utcnow()
                    db.add(row)
                return
            except IntegrityError:  # inserted concurrently by another start: update it
                continue

    def customer(self, customer_id: str) -> CustomerRecord | None:
        with session(self.engine) as db:
            return db.get(CustomerRecord, customer_id)

    def forget(self, customer_id: str) -> int:
        """Erase a customer's contact details and the rendered bodies of their messages.

        The audit facts stay (what was sent when, by which channel); returns how many kept
        messages were erased. Raises LookupError for an unknown customer.
        """
        with session(self.engine) as db:
            row = db.get(CustomerRecord, customer_id)
            if row is None:
                raise LookupError(f"no customer {customer_id}")
            row.name, row.email, row.phone = ERASED, None, None
            row.forgotten_at = row.updated_at = utcnow()
            db.add(row)
            invoices = db.exec(select(RunRow.invoice_id).where(RunRow.customer_id == customer_id)).all()
            messages = db.exec(
                select(OutboxMessage).where(col(OutboxMessage.invoice_id).in_(invoices))
            ).all() if invoices else []
            for message in messages:
                message.recipient, message.subject, message.body, message.html = ERASED, None, ERASED, None
                message.headers = {}
                db.add(message)
            return len(messages)

    # -- runs ----------------------------------------------------------------------------------

    def open_run(self, invoice: RunInvoice, event: AuditEvent | None = None) -> None:
        """Create the run's mirror row if it does not exist yet (and record its start)."""
        try:
            with session(self.engine) as db:
                if db.get(RunRow, invoice.invoice_id) is None:
                    db.add(_new_run(invoice))
                    db.flush()
                if event is not None:
                    self._append(db, event)
        except IntegrityError:
            pass  # created concurrently

    def run(self, invoice_id: str) -> RunRow | None:
        with session(self.engine) as db:
            return db.get(RunRow, invoice_id)

    def record(self, invoice: RunInvoice, records: Iterable[RunRecord]) -> None:
        """Write the workflow's records in one transaction: audit entries once per key, and the
        run's snapshot unless a newer one is already there."""
        with session(self.engine) as db:
            self._write(db, invoice, records)

    def _write(self, db: Session, invoice: RunInvoice, records: Iterable[RunRecord]) -> None:
        for record in records:
            newest = self._apply(db, invoice, record.snapshot) if record.snapshot else True
            if newest or not record.conditional:
                self._append(db, record.event)

    @staticmethod
    def _apply(db: Session, invoice: RunInvoice, snapshot: RunSnapshot) -> bool:
        """Compare-and-set the mirror row to ``snapshot``; False if a newer one is there."""
        if db.get(RunRow, invoice.invoice_id) is None:
            db.add(_new_run(invoice))
            db.flush()
        result = db.exec(  # type: ignore[call-overload]
            update(RunRow)
            .where(col(RunRow.invoice_id) == invoice.invoice_id, col(RunRow.seq) < snapshot.seq)
            .values(seq=snapshot.seq, state=snapshot.state.value, stage=snapshot.stage,
                    balance_due=str(snapshot.balance_due), paid=str(snapshot.paid),
                    updated_at=utcnow())
        )
        return bool(result.rowcount)

    def retrying_runs(self, older_than: timedelta) -> int:
        """How many invoices have a delivery that has been retrying longer than ``older_than``."""
        cutoff = utcnow() - older_than
        with session(self.engine) as db:
            return int(db.exec(
                select(func.count(func.distinct(Delivery.invoice_id))).where(
                    col(Delivery.status).in_(("retrying", "ambiguous", "calling")),
                    Delivery.created_at < cutoff,
                )
            ).one())

    # -- the delivery ledger -------------------------------------------------------------------

    def claim(self, request: DeliveryRequest, channel: Channel, *, guard: bool) -> Claim:
        """The first transaction of a send: write the workflow's records, check that the run is
        still open (``guard``), find the customer, and claim the ledger row for this attempt.

        A claim marks the row ``calling`` (a provider call is about to begin) and bumps its
        version; the completion must present that version.
        """
        invoice = request.invoice
        with session(self.engine) as db:
            self._write(db, invoice, request.records)
            run = db.get(RunRow, invoice.invoice_id)
            if guard and run is not None and RunState(run.state) in CLOSED:
                return Claim(Decision.STOPPED)
            row = self._find(db, invoice.invoice_id, request.step, channel.value)
            if row is not None and row.status in FINAL:
                return Claim(Decision.DONE if row.status != "failed" else Decision.REFUSED, row)
            customer = db.get(CustomerRecord, invoice.customer_id)
            refusal = reachable(customer, channel)
            if refusal is None and channel is not Channel.AGENCY and self._opted_out(
                    db, invoice.customer_id, channel.value):
                refusal = f"the customer opted out of {channel}"
            if row is None:  # first attempt: the row is born claimed (or refused)
                row = Delivery(invoice_id=invoice.invoice_id, step=request.step, channel=channel.value,
                               workflow_id=request.workflow_id, version=1,
                               status="failed" if refusal else "calling",
                               detail=fit(refusal, _limit(Delivery.detail)),
                               attempts=0 if refusal else 1, called_at=None if refusal else utcnow())
                db.add(row)
                db.flush()
                if refusal is not None:
                    self._append(db, _communication(request, channel, "failed", refusal))
                    return Claim(Decision.REFUSED, row)
                balance = Decimal(run.balance_due) if run is not None else request.balance_due
                return Claim(Decision.SEND, row, customer, balance, None)
            if refusal is not None:
                row = self._set(db, row, status="failed", detail=refusal)
                self._append(db, _communication(request, channel, "failed", refusal))
                return Claim(Decision.REFUSED, row)
            interrupted = row.status in INTERRUPTED
            since = row.called_at
            row = self._set(db, row, status="calling", attempts=row.attempts + 1,
                            called_at=row.called_at or utcnow())
            balance = Decimal(run.balance_due) if run is not None else request.balance_due
            return Claim(Decision.RECONCILE if interrupted else Decision.SEND, row, customer,
                         balance, since)

    def complete(self, request: DeliveryRequest, claim: Claim, status: str, detail: str, *,
                 channel: Channel, provider: str = "", message_id: str | None = None,
                 audit_suffix: str = "", opt_out: bool = False,
                 records: Iterable[RunRecord] = ()) -> Delivery | None:
        """The second transaction: the outcome, its audit entry, an opt-out, and ``records``,
        only if this attempt still holds the row. Returns None when a newer attempt took it."""
        assert claim.row is not None
        detail = fit(detail, _limit(Delivery.detail))
        with session(self.engine) as db:
            changes: dict[str, object] = {"status": status, "detail": detail}
            if provider:
                changes["provider"] = provider
            if message_id:
                changes["provider_message_id"] = fit(message_id, 200)
            if status == "retrying":
                changes["called_at"] = None  # the provider has nothing: no lookup needed
            moved = self._cas(db, claim.row, **changes)
            if moved is None:
                return None
            self._append(db, _communication(request, channel, status, detail, audit_suffix))
            if opt_out:
                self._add_opt_out(db, request.invoice.customer_id, channel.value, detail)
            self._write(db, request.invoice, records)
            return moved

    def _set(self, db: Session, row: Delivery, **changes: object) -> Delivery:
        moved = self._cas(db, row, **changes)
        if moved is None:  # another attempt moved it between our read and write
            raise StaleClaim(f"ledger row {row.id} changed under this attempt")
        return moved

    @staticmethod
    def _cas(db: Session, row: Delivery, **changes: object) -> Delivery | None:
        result = db.exec(  # type: ignore[call-overload]
            update(Delivery)
            .where(col(Delivery.id) == row.id, col(Delivery.version) == row.version)
            .values(version=row.version + 1, updated_at=utcnow(), **changes)
            .execution_options(synchronize_session=False)
        )
        if not result.rowcount:
            return None
        if row in db:  # mirror the update on our copy, without the session writing it again
            db.expunge(row)
        for name, value in changes.items():
            setattr(row, name, value)
        row.version += 1
        return row

    def settle(self, delivery_id: int, status: str, note: str, who: str = "operator") -> Delivery:
        """An operator's verdict on an ``unknown`` delivery: ``sent`` or ``failed``."""
        with session(self.engine) as db:
            row = db.get(Delivery, delivery_id)
            if row is None or row.status != "unknown":
                raise LookupError(f"no delivery {delivery_id} with an unknown outcome")
            detail = fit(f"settled by {who}: {note}", _limit(Delivery.detail))
            moved = self._cas(db, row, status=status, detail=detail)
            assert moved is not None
            self._append(db, AuditEvent(
                key=audit_key(row.workflow_id, "settled", row.step, row.channel),
                workflow_id=row.workflow_id, invoice_id=row.invoice_id, at=utcnow(),
                kind=AuditKind.COMMUNICATION, status=status, step=row.step, channel=row.channel,
                detail=detail,
            ))
            return moved

    def unknown_deliveries(self) -> Sequence[Delivery]:
        with session(self.engine) as db:
            return db.exec(select(Delivery).where(Delivery.status == "unknown").order_by(
                col(Delivery.id))).all()

    @staticmethod
    def _find(db: Session, invoice_id: str, step: str, channel: str) -> Delivery | None:
        return db.exec(
            select(Delivery).where(
                Delivery.invoice_id == invoice_id, Delivery.step == step, Delivery.channel == channel
            )
        ).first()

    def deliveries(self, invoice_id: str) -> Sequence[Delivery]:
        with session(self.engine) as db:
            return db.exec(
                select(Delivery).where(Delivery.invoice_id == invoice_id).order_by(col(Delivery.id))
            ).all()

    # -- the audit trail -----------------------------------------------------------------------

    def append(self, event: AuditEvent) -> bool:
        """Append an audit entry once; return False if an earlier attempt already had."""
        try:
            with session(self.engine) as db:
                if self._has(db, event.key):
                    return False
                self._append(db, event)
            return True
        except IntegrityError:
            return False

    @staticmethod
    def _has(db: Session, key: str) -> bool:
        return db.exec(select(AuditEntry.id).where(AuditEntry.key == key)).first() is not None

    @staticmethod
    def _append(db: Session, event: AuditEvent) -> None:
        """Insert an audit entry unless its key is there (an earlier or concurrent attempt)."""
        data = event.model_dump()
        data["detail"] = fit(event.detail, _limit(AuditEntry.detail))
        data["step"] = fit(event.step, 200) if event.step else None
        data["status"] = fit(event.status, 32)
        data["kind"] = event.kind.value
        data["recorded_at"] = utcnow()
        insert = sqlite_insert if db.get_bind().dialect.name == "sqlite" else postgresql_insert
        db.exec(insert(AuditEntry).values(**data).on_conflict_do_nothing(  # type: ignore[call-overload]
            index_elements=["key"]))

    def trail(self, invoice_id: str) -> Sequence[AuditEntry]:
        """Everything recorded about an invoice, oldest first."""
        with session(self.engine) as db:
            return db.exec(
                select(AuditEntry)
                .where(AuditEntry.invoice_id == invoice_id)
                .order_by(col(AuditEntry.at), col(AuditEntry.id))
            ).all()

    # -- opt-outs ------------------------------------------------------------------------------

    def opted_out(self, customer_id: str, channel: str) -> bool:
        with session(self.engine) as db:
            return self._opted_out(db, customer_id, channel)

    @staticmethod
    def _opted_out(db: Session, customer_id: str, channel: str) -> bool:
        return db.exec(
            select(OptOut).where(OptOut.customer_id == customer_id, OptOut.channel == channel)
        ).first() is not None

    def opt_out(self, customer_id: str, channel: str, reason: str) -> None:
        with session(self.engine) as db:
            self._add_opt_out(db, customer_id, channel, reason)

    def _add_opt_out(self, db: Session, customer_id: str, channel: str, reason: str) -> None:
        if not self._opted_out(db, customer_id, channel):
            db.add(OptOut(customer_id=customer_id, channel=channel, reason=fit(reason, 500)))
            db.flush()

    # -- payments no run took ------------------------------------------------------------------

    def keep_payment(self, invoice_id: str, payment_id: str, amount: str, currency: str,
                     paid_at: datetime, status: str, detail: str) -> bool:
        """Keep a payment (once per invoice and payment id); False if it was already kept."""
        try:
            with session(self.engine) as db:
                db.add(PaymentRow(invoice_id=invoice_id, payment_id=payment_id, amount=fit(amount, 32),
                                  currency=fit(currency, 8), paid_at=paid_at, status=status,
                                  detail=fit(detail, 500)))
            return True
        except IntegrityError:
            return False

    def payments(self, status: str | None = None) -> Sequence[PaymentRow]:
        with session(self.engine) as db:
            query = select(PaymentRow).order_by(col(PaymentRow.id))
            if status is not None:
                query = query.where(PaymentRow.status == status)
            return db.exec(query).all()


class StaleClaim(RuntimeError):
    """Another attempt moved the ledger row while this one held it (retried by Temporal)."""


def _new_run(invoice: RunInvoice) -> RunRow:
    return RunRow(invoice_id=invoice.invoice_id, workflow_id=invoice.workflow_id,
                  customer_id=invoice.customer_id, currency=invoice.currency,
                  amount_due=str(invoice.amount_due), balance_due=str(invoice.amount_due),
                  state=RunState.ACTIVE.value)


def _communication(request: DeliveryRequest, channel: Channel, status: str, detail: str,
                   suffix: str = "") -> AuditEvent:
    """The audit entry for a delivery outcome (keyed so a retry cannot write it twice)."""
    return AuditEvent(
        key=audit_key(request.workflow_id, "delivery", request.step, channel.value, status, suffix),
        workflow_id=request.workflow_id, invoice_id=request.invoice.invoice_id, at=utcnow(),
        kind=AuditKind.COMMUNICATION, status=status, step=request.step, channel=channel.value,
        detail=detail,
    )
