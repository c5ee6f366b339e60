"""One message for several of a customer's invoices: consolidation, decided inside a delivery's
claim transaction with the customer's row locked (so concurrent deliveries see one another).

When a reminder is about to go out on a channel and another active invoice of the same customer
plans a message on that channel within the policy's ``consolidate_within``, the first delivery
opens a *bundle* with a send time (the latest such plan, plus a minute for deliveries due at the
same moment, never more than the window ahead) and waits for it; the others join it when their
time comes and wait too. At the send time the first member to claim the bundle sends one message
listing every member still open (a payment before the send removes its invoice), and records the
outcome on every member's ledger row and trail; members that wake later find their row ``sent``
and move on as if they had sent it. A member that finds the bundle failed (or its sender gone
for ten minutes) sends its own message. A single invoice never waits: with nothing else planned
on the channel, the delivery sends at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Connection, and_, bindparam, insert, or_, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from models.records import Bundle, BundleMember, Delivery, PlannedContact, RunRow, utcnow
from models.run import RunState

GATHER = timedelta(minutes=1)  # how long a shared message waits for invoices due at the same moment
AFTER = timedelta(seconds=5)  # members other than the opener wake this long after the send time
BUSY = timedelta(seconds=30)  # a member finding the message being sent looks again after this
STALE = timedelta(minutes=10)  # a sender silent this long is presumed gone: members send alone

_B = Bundle.__table__  # type: ignore[attr-defined]
_M = BundleMember.__table__  # type: ignore[attr-defined]
_P = PlannedContact.__table__  # type: ignore[attr-defined]
_R = RunRow.__table__  # type: ignore[attr-defined]
_D = Delivery.__table__  # type: ignore[attr-defined]

_CURRENT = core_select(_B).where(
    _B.c.customer_id == bindparam("k_customer"), _B.c.channel == bindparam("k_channel"),
    _B.c.status.in_(("open", "sending"))).order_by(_B.c.id.desc()).limit(1)
_MEMBERS = core_select(_M.c.invoice_id, _M.c.step, _M.c.pay_url, _R.c.state, _R.c.balance_due,
                       _R.c.currency).select_from(_M.join(_R, _R.c.invoice_id == _M.c.invoice_id)).where(
    _M.c.bundle_id == bindparam("k_bundle")).order_by(_M.c.id)
# Other active invoices of the customer planning a message on the channel around now, whose step
# has no final outcome yet.
_EXPECTED = core_select(_P.c.at).select_from(
    _P.join(_R, _R.c.invoice_id == _P.c.invoice_id).outerjoin(
        _D, and_(_D.c.invoice_id == _P.c.invoice_id, _D.c.step == _P.c.step, _D.c.channel == _P.c.channel))
).where(_P.c.customer_id == bindparam("k_customer"), _P.c.channel == bindparam("k_channel"),
        _P.c.invoice_id != bindparam("k_invoice"), _P.c.at >= bindparam("k_from"),
        _P.c.at <= bindparam("k_to"), _R.c.state == RunState.ACTIVE.value,
        # spelt out rather than IN (...): a list would be expanded again at every execution
        or_(_D.c.status.is_(None), *(_D.c.status == status
                                      for status in ("bundled", "retrying", "calling", "ambiguous"))))

# Whether any such plan exists, read without the lock inside the claim's one look (most customers
# have one invoice at a time): two invoices that could share always see each other's plans
# (written when they started), and an open shared message has a member planning it, so one look
# at the plans is enough. Bound with ``expected_window``.
OTHERS_PLANNED = _EXPECTED.exists()


@dataclass(frozen=True)
class Line:
    """One invoice in a shared message."""

    invoice_id: str
    step: str
    pay_url: str
    balance_due: Decimal
    currency: str


@dataclass(frozen=True)
class Gathering:
    """What consolidation decided for one delivery: send alone, wait for the shared message, or
    send the shared message (``lines``: the other invoices in it)."""

    kind: str  # alone, wait, send
    bundle_id: int | None = None
    until: datetime | None = None
    lines: tuple[Line, ...] = ()


ALONE = Gathering("alone")


def expected_window(moment: datetime, window: timedelta) -> dict[str, datetime]:
    """The parameters of ``OTHERS_PLANNED`` (and of the plans ``gather`` reads): around ``moment``."""
    return {"k_from": moment - window, "k_to": moment + window}


def gather(db: Connection, *, customer_id: str, channel: str, invoice_id: str, step: str,
           pay_url: str, moment: datetime, window: timedelta) -> Gathering:
    """Join, open or send the customer's shared message on ``channel`` (the caller holds the
    customer's row lock)."""
    now = utcnow()
    found = db.execute(_CURRENT, {"k_customer": customer_id, "k_channel": channel}).first()
    if found is not None:
        bundle = found._mapping
        member = invoice_id in {m.invoice_id for m in _members(db, bundle["id"])}
        if bundle["status"] == "open":
            if not member:
                db.execute(insert(_M), {"bundle_id": bundle["id"], "invoice_id": invoice_id,
                                        "step": step, "pay_url": pay_url})
            if moment < bundle["send_at"]:
                return Gathering("wait", bundle["id"], bundle["send_at"] + min(AFTER, window / 2))
            db.execute(update(_B).where(_B.c.id == bundle["id"]).values(
                status="sending", sender_invoice_id=invoice_id, updated_at=now))
            return Gathering("send", bundle["id"], lines=_lines(db, bundle["id"], invoice_id))
        # sending
        if bundle["sender_invoice_id"] == invoice_id:  # this delivery's own retry
            db.execute(update(_B).where(_B.c.id == bundle["id"]).values(updated_at=now))
            return Gathering("send", bundle["id"], lines=_lines(db, bundle["id"], invoice_id))
        if bundle["updated_at"] > now - STALE:
            return Gathering("wait", bundle["id"], moment + BUSY) if member else ALONE
        db.execute(update(_B).where(_B.c.id == bundle["id"]).values(status="failed", updated_at=now))
        return ALONE
    expected = [at for (at,) in db.execute(_EXPECTED, {
        "k_customer": customer_id, "k_channel": channel, "k_invoice": invoice_id,
        **expected_window(moment, window)}).all()]
    if not expected:
        return ALONE
    send_at = min(moment + window, max(max(expected), moment) + min(GATHER, window))
    bundle_id = db.execute(insert(_B).returning(_B.c.id), {
        "customer_id": customer_id, "channel": channel, "status": "open", "send_at": send_at,
        "sender_invoice_id": None, "provider_message_id": None, "created_at": now, "updated_at": now,
    }).scalar_one()
    db.execute(insert(_M), {"bundle_id": bundle_id, "invoice_id": invoice_id, "step": step,
                            "pay_url": pay_url})
    return Gathering("wait", bundle_id, send_at)


def _members(db: Connection, bundle_id: int) -> list[object]:
    return list(db.execute(_MEMBERS, {"k_bundle": bundle_id}).all())


def _lines(db: Connection, bundle_id: int, sender: str) -> tuple[Line, ...]:
    """The other members still to be reminded: open and owing (a payment removes an invoice)."""
    return tuple(Line(m.invoice_id, m.step, m.pay_url, Decimal(m.balance_due), m.currency)
                 for m in _members(db, bundle_id)
                 if m.invoice_id != sender and m.state == RunState.ACTIVE.value
                 and Decimal(m.balance_due) > 0)


def close(db: Connection, bundle_id: int, status: str, message_id: str | None) -> None:
    """The shared message's outcome: ``sent`` (or ``unknown``), or ``failed`` (members send alone)."""
    db.execute(update(_B).where(_B.c.id == bundle_id).values(
        status="sent" if status in ("sent", "unknown") else "failed", provider_message_id=message_id,
        updated_at=utcnow()))


def plan(db: Connection, customer_id: str, invoice_id: str, planned: list[tuple[str, str, datetime]]) -> None:
    """Record the contacts a new run plans: (step, channel, when); once per step."""
    build = sqlite_insert if db.dialect.name == "sqlite" else postgresql_insert
    db.execute(build(_P).on_conflict_do_nothing(index_elements=["invoice_id", "step"]), [
        {"customer_id": customer_id, "invoice_id": invoice_id, "step": step, "channel": channel, "at": at}
        for step, channel, at in planned])
