"""Database operations behind the activities and the CLI: ledger rows, audit entries, opt-outs.

Every write here is keyed, so the same call made twice (an activity retried after a crash) finds
the first row instead of writing a second.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from models.audit import AuditEvent, AuditKind
from models.database import session
from models.delivery import DeliveryRequest
from models.records import AuditEntry, Delivery, OptOut, utcnow


class Ledger:
    """The delivery ledger and the audit trail of one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- the delivery ledger -------------------------------------------------------------------

    def claim(self, request: DeliveryRequest) -> tuple[Delivery, bool]:
        """The ledger row of this (invoice, step, channel), and whether this call created it."""
        key = (request.invoice.invoice_id, request.step, request.channel.value)
        with session(self.engine) as db:
            row = self._find(db, *key)
            if row is not None:
                return row, False
        try:
            with session(self.engine) as db:
                row = Delivery(invoice_id=key[0], step=key[1], channel=key[2],
                               workflow_id=request.workflow_id, status="pending")
                db.add(row)
                db.flush()
                db.refresh(row)
                return row, True
        except IntegrityError:  # another attempt claimed it between our read and write
            with session(self.engine) as db:
                found = self._find(db, *key)
                assert found is not None
                return found, False

    def update(self, row: Delivery, event: AuditEvent | None = None, **changes: object) -> Delivery:
        """Move a ledger row on, and append the matching audit entry in the same transaction."""
        with session(self.engine) as db:
            current = db.get(Delivery, row.id)
            assert current is not None
            for name, value in changes.items():
                setattr(current, name, value)
            current.updated_at = utcnow()
            db.add(current)
            if event is not None:
                self._append(db, event)
            db.flush()
            db.refresh(current)
            return current

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
                select(Delivery).where(Delivery.invoice_id == invoice_id).order_by(Delivery.id)
            ).all()

    # -- the audit trail -----------------------------------------------------------------------

    def record(self, event: AuditEvent) -> bool:
        """Append an audit entry once; return False if an earlier attempt already had."""
        try:
            with session(self.engine) as db:
                self._append(db, event)
            return True
        except IntegrityError:
            return False

    @staticmethod
    def _append(db: Session, event: AuditEvent) -> None:
        db.add(AuditEntry(**event.model_dump()))
        db.flush()

    def trail(self, invoice_id: str) -> Sequence[AuditEntry]:
        """Everything recorded about an invoice, oldest first."""
        with session(self.engine) as db:
            return db.exec(
                select(AuditEntry)
                .where(AuditEntry.invoice_id == invoice_id)
                .order_by(AuditEntry.at, AuditEntry.id)
            ).all()

    # -- opt-outs ------------------------------------------------------------------------------

    def opted_out(self, customer_id: str, channel: str) -> bool:
        with session(self.engine) as db:
            return db.exec(
                select(OptOut).where(OptOut.customer_id == customer_id, OptOut.channel == channel)
            ).first() is not None

    def opt_out(self, customer_id: str, channel: str, reason: str) -> None:
        try:
            with session(self.engine) as db:
                db.add(OptOut(customer_id=customer_id, channel=channel, reason=reason))
        except IntegrityError:
            pass  # already recorded


def communication(request: DeliveryRequest, status: str, detail: str, suffix: str = "") -> AuditEvent:
    """The audit entry for a delivery outcome (keyed so a retry cannot write it twice)."""
    key = f"{request.workflow_id}:delivery:{request.step}:{request.channel}:{status}{suffix}"
    return AuditEvent(
        key=key, workflow_id=request.workflow_id, invoice_id=request.invoice.invoice_id,
        at=utcnow(), kind=AuditKind.COMMUNICATION, status=status, step=request.step,
        channel=request.channel.value, detail=detail,
    )
