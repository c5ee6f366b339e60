"""The outbox: the default delivery mode. Messages are stored exactly as they would be sent.

It needs no provider account, so a new install, the demo and most tests run the whole escalation
end to end; switching ``DUNNING_DELIVERY=live`` changes only where the rendered message goes.
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import Engine, insert, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from activities.channels import OutgoingMessage
from models.database import session
from models.records import Bundle, BundleMember, OutboxMessage, utcnow

_STORE = insert(OutboxMessage.__table__).returning(OutboxMessage.__table__.c.id)  # type: ignore[attr-defined]


class OutboxSender:
    """Stores each message once per ledger reference; returns ``outbox-<id>`` as message id."""

    provider = "outbox"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def send(self, message: OutgoingMessage) -> str:
        body = message.body if message.twiml is None else f"{message.body}\n\n{message.twiml}"
        row = {
            "reference": message.reference,
            "invoice_id": message.reference.split("/", 1)[0],
            "channel": message.channel.value,
            "recipient": message.recipient,
            "subject": message.subject,
            "body": body if message.payload is None else json.dumps(message.payload, indent=2,
                                                                     sort_keys=True),
            "html": message.html,
            # the letter itself is not kept (`dunning letter` renders it again): only its name
            "headers": message.headers | ({"X-Attachments": ", ".join(
                f"{a.filename} ({len(a.content)} bytes)" for a in message.attachments)}
                if message.attachments else {}),
            "created_at": utcnow(),
        }
        try:
            with self.engine.begin() as db:
                return f"outbox-{db.execute(_STORE, row).scalar_one()}"
        except IntegrityError:  # stored by an attempt that died before the ledger saw it
            with session(self.engine) as db:
                existing = db.exec(
                    select(OutboxMessage).where(OutboxMessage.reference == message.reference)
                ).one()
                return f"outbox-{existing.id}"

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        """``outbox-<id>`` of the row stored for this reference, else None.

        The reference is unique, so the row, not a time window, answers whether an attempt that
        died got as far as storing it; ``since`` is part of the Sender interface and unused here.
        """
        with session(self.engine) as db:
            existing = db.exec(
                select(OutboxMessage).where(OutboxMessage.reference == message.reference)
            ).first()
            return f"outbox-{existing.id}" if existing is not None else None


def messages_for(engine: Engine, invoice_id: str, *, shared: bool = False) -> list[OutboxMessage]:
    """The messages kept for an invoice, oldest first; with ``shared``, also each one message
    shared with the customer's other invoices that listed it (kept under the invoice that sent
    it, so a reader of this invoice's messages sees every one the customer got about it)."""
    with session(engine) as db:
        if not shared:
            return list(db.exec(select(OutboxMessage).where(OutboxMessage.invoice_id == invoice_id)
                                .order_by(OutboxMessage.id)).all())
        listed = [int(message_id.removeprefix("outbox-")) for message_id in db.exec(
            select(Bundle.provider_message_id).join(BundleMember, col(BundleMember.bundle_id) == Bundle.id)
            .where(BundleMember.invoice_id == invoice_id,
                   col(Bundle.provider_message_id).startswith("outbox-"))).all()
            if message_id and message_id.removeprefix("outbox-").isdigit()]
        return list(db.exec(select(OutboxMessage).where(
            or_(OutboxMessage.invoice_id == invoice_id, col(OutboxMessage.id).in_(listed)))
            .order_by(OutboxMessage.id)).all())
