"""The webhook inbox: every verified provider event is stored before it is acknowledged, then
processed from the table, so a Temporal outage or a provider's redelivery loses or doubles
nothing.

Storing is idempotent by (provider, event id). Processing is a pass over the pending rows: each
handler either settles its row (``done``, ``ignored``, or ``failed`` with the reason, for an
operator) or, when Temporal or the database cannot be reached, leaves it pending for the next
pass. Handlers themselves are idempotent (payments by payment id, opt-outs by customer and
channel, trail entries by key), so a row processed twice after a crash does no harm.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from activities.ledger import fit
from models.invoice import invoice_id_problem
from models.records import MAX_ROW_ID, WebhookEvent, utcnow

PASS_SIZE = 100
MAX_WAIT = 600  # seconds between tries of an event that keeps failing
MAX_ATTEMPTS = 500  # about three days of tries at the longest wait
STATUSES = ("failed", "pending", "done", "ignored")


@dataclass(frozen=True)
class Incoming:
    """A verified event, as a provider's route hands it to the inbox."""

    provider: str
    event_id: str
    kind: str
    payload: dict[str, Any]
    reference: str | None = None  # what later events may name this one by
    invoice_id: str | None = None


class Inbox:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def store(self, event: Incoming) -> bool:
        """Keep the event; False when it was already kept (a redelivery)."""
        with Session(self.engine) as db:
            # an invoice id no run can have (too long, a '/') matches nothing later: not kept
            invoice_id = str(event.invoice_id) if event.invoice_id is not None else None
            if invoice_id is not None and invoice_id_problem(invoice_id):
                invoice_id = None
            db.add(WebhookEvent(provider=event.provider, event_id=fit(event.event_id, 200),
                                kind=fit(event.kind, 64), reference=fit(event.reference, 200) or None,
                                invoice_id=invoice_id, payload=json.dumps(event.payload)))
            try:
                db.commit()
                return True
            except IntegrityError:
                return False

    def pending(self, limit: int = PASS_SIZE) -> list[WebhookEvent]:
        """Pending events whose next try is due: one that failed waits 2, 4, 8 ... seconds after
        its last try, at most ``MAX_WAIT``; a fresh one is due at once."""
        now = utcnow()
        with Session(self.engine) as db:
            rows = db.exec(select(WebhookEvent).where(WebhookEvent.status == "pending")
                           .order_by(col(WebhookEvent.id)).limit(limit * 10)).all()
        return [row for row in rows if row.processed_at is None or now - row.processed_at
                >= timedelta(seconds=min(2 ** row.attempts, MAX_WAIT))][:limit]

    def settle(self, row_id: int, status: str, detail: str = "") -> None:
        """Record the outcome. A processed or ignored event's body goes: what it did is on the
        runs' trails, and its body holds what providers know of the customer (a payer's billing
        details, the number an SMS came from), which nothing needs any longer. A failed event
        keeps its body for the operator."""
        with Session(self.engine) as db:
            row = db.get(WebhookEvent, row_id)
            if row is None:
                return
            if status in ("done", "ignored"):
                row.payload = "{}"
            row.status, row.detail, row.processed_at = status, fit(detail, 500), utcnow()
            row.attempts += 1
            db.add(row)
            db.commit()

    def postpone(self, row_id: int, detail: str) -> None:
        """Leave it pending (Temporal down, the run busy for a moment): tried again after a
        growing wait; after ``MAX_ATTEMPTS`` it is ``failed`` for an operator."""
        with Session(self.engine) as db:
            row = db.get(WebhookEvent, row_id)
            if row is not None:
                row.attempts += 1
                row.processed_at = utcnow()  # the last try, while pending
                if row.attempts >= MAX_ATTEMPTS:
                    row.status, detail = "failed", f"gave up after {row.attempts} tries: {detail}"
                row.detail = fit(detail, 500)
                db.add(row)
                db.commit()

    def invoice_of(self, provider: str, reference: str) -> str | None:
        """The invoice an earlier event with this reference named (a payment a dispute names)."""
        with Session(self.engine) as db:
            return db.exec(select(WebhookEvent.invoice_id).where(
                WebhookEvent.provider == provider, WebhookEvent.reference == reference,
                col(WebhookEvent.invoice_id).is_not(None)).limit(1)).first()

    def requeue(self, row_id: int) -> bool:
        """An operator's "try it again" for a failed event (its body is kept until processed):
        pending, with its tries counted from zero. False unless it was failed."""
        if not 1 <= row_id <= MAX_ROW_ID:  # no row has it (and PostgreSQL would refuse the number)
            return False
        with Session(self.engine) as db:
            row = db.get(WebhookEvent, row_id)
            if row is None or row.status != "failed":
                return False
            row.status, row.attempts, row.processed_at = "pending", 0, None
            row.detail = fit(f"requeued by an operator (was: {row.detail})", 500)
            db.add(row)
            db.commit()
            return True

    def listed(self, status: str = "failed", limit: int = 500) -> Sequence[WebhookEvent]:
        """The newest events first, of one of ``STATUSES`` or ``all``; ValueError naming the
        choices for anything else."""
        if status not in (*STATUSES, "all"):
            raise ValueError(f"status: one of {', '.join(STATUSES)}, all (not {status!r})")
        with Session(self.engine) as db:
            query = select(WebhookEvent).order_by(col(WebhookEvent.id).desc()).limit(limit)
            if status != "all":
                query = query.where(WebhookEvent.status == status)
            return db.exec(query).all()

    @staticmethod
    def summary(event: WebhookEvent) -> dict[str, Any]:
        """What an operator sees of an event (never its body): the CLI's and the API's rows."""
        return {"id": event.id, "provider": event.provider, "kind": event.kind, "event_id": event.event_id,
                "invoice_id": event.invoice_id or "", "status": event.status, "tries": event.attempts,
                "received_at": event.received_at.isoformat(timespec="seconds"), "detail": event.detail}

    def events(self, provider: str | None = None) -> Sequence[WebhookEvent]:
        with Session(self.engine) as db:
            query = select(WebhookEvent).order_by(col(WebhookEvent.id))
            if provider is not None:
                query = query.where(WebhookEvent.provider == provider)
            return db.exec(query).all()
