"""Database operations behind the activities and the CLI: customers, the runs mirror, the
delivery ledger, the audit trail, opt-outs and payments no run took.

Every write here is keyed or compare-and-set, so the same call made twice (an activity retried
after a crash) finds the first row instead of writing a second, and a stale attempt can never
overwrite a newer outcome. Free text is cut to its column's size here (and the entry says so):
PostgreSQL refuses an over-long value, and a refused write retried forever wedges a run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import cache
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    update,
)
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from activities.bundle import OTHERS_PLANNED, Gathering, close, expected_window, gather, plan
from models.audit import AuditEvent, AuditKind, audit_key
from models.contact import Customer as ContactFacts
from models.contact import Deferral, defer
from models.database import session
from models.delivery import DeliveryRequest, Purpose, halts
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
    WebhookEvent,
    utcnow,
)
from models.run import CLOSED, RunInvoice, RunRecord, RunSnapshot, RunState
from models.text import storable

TRUNCATED = " [truncated]"
# An opt-out whose reason starts so is a provider's refusal of the address (a bounce), not the
# customer's wish: a new address in the customer's details clears it.
UNREACHABLE = "unreachable:"
# Who the customer is for choosing a policy: stored only when the billing system sends them, so
# an operator's exclusion or override is not undone by the next invoice import.
SEGMENT_FIELDS = frozenset({"type", "country", "region", "policy", "exclude"})
CONTACT_FIELDS = frozenset({"name", "email", "phone", "timezone", "locale"})
FINAL = frozenset({"sent", "failed", "unknown"})
INTERRUPTED = frozenset({"calling", "ambiguous"})  # the provider may have it: look before sending
UNSETTLED = frozenset({"retrying", "broken"})  # outcomes that say nothing of an earlier attempt
ERASED = "[erased]"
RETRY_FRESH = timedelta(minutes=15)  # longer than the deliveries' longest retry interval

# The send path runs a handful of short statements per message; they are built once here (and
# compiled once by SQLAlchemy's cache) rather than through the ORM for every call.
_D = Delivery.__table__  # type: ignore[attr-defined]
_R = RunRow.__table__  # type: ignore[attr-defined]
_C = CustomerRecord.__table__  # type: ignore[attr-defined]
_O = OptOut.__table__  # type: ignore[attr-defined]
_A = AuditEntry.__table__  # type: ignore[attr-defined]
_P = PaymentRow.__table__  # type: ignore[attr-defined]
_LEDGER_FIELDS = ("id", "invoice_id", "workflow_id", "step", "channel", "status", "provider",
                  "provider_message_id", "detail", "attempts", "version", "called_at", "contact_at")
_FIND_ROW = core_select(*(_D.c[name] for name in _LEDGER_FIELDS)).where(
    _D.c.invoice_id == bindparam("k_invoice"), _D.c.step == bindparam("k_step"),
    _D.c.channel == bindparam("k_channel"))
_ROW_BY_ID = core_select(*(_D.c[name] for name in _LEDGER_FIELDS)).where(_D.c.id == bindparam("k_id"))
_RUN_STATE = core_select(_R.c.state, _R.c.balance_due).where(_R.c.invoice_id == bindparam("k_invoice"))
_CUSTOMER = core_select(_C).where(_C.c.id == bindparam("k_customer"))
_OPTED_OUT = core_select(_O.c.id).where(_O.c.customer_id == bindparam("k_customer"),
                                        _O.c.channel == bindparam("k_channel")).limit(1)
# An address marked unreachable is worth trying again once the billing system sends a new one.
_RETRY_ADDRESS = delete(_O).where(_O.c.customer_id == bindparam("k_customer"),
                                  _O.c.channel == bindparam("k_channel"),
                                  _O.c.reason.startswith(UNREACHABLE))
# What a claim looks at, in one statement: the run's mirror, this attempt's ledger row, the
# customer, whether they opted out of the channel, and whether another of their invoices plans a
# message on it around now (consolidation). Each part may be missing (a left join from
# a one-row anchor), so the row always comes back.
_ANCHOR = core_select(literal(1).label("one")).subquery("anchor")
_CUSTOMER_FIELDS = tuple(column.name for column in _C.c)
_CLAIM_LOOK = core_select(
    _R.c.state.label("r_state"), _R.c.balance_due.label("r_balance_due"),
    *(_D.c[name].label(f"d_{name}") for name in _LEDGER_FIELDS),
    *(_C.c[name].label(f"c_{name}") for name in _CUSTOMER_FIELDS),
    exists().where(_O.c.customer_id == bindparam("k_customer"),
                   _O.c.channel == bindparam("k_channel")).label("opted_out"),
    OTHERS_PLANNED.label("others_planned"),  # consolidation: anything to share with around now
).select_from(
    _ANCHOR.outerjoin(_R, _R.c.invoice_id == bindparam("k_invoice"))
    .outerjoin(_D, and_(_D.c.invoice_id == bindparam("k_invoice"), _D.c.step == bindparam("k_step"),
                        _D.c.channel == bindparam("k_channel")))
    .outerjoin(_C, _C.c.id == bindparam("k_customer")))
_HAS_KEY = core_select(_A.c.id).where(_A.c.key == bindparam("k_key")).limit(1)
# A customer's contacts on a channel since a moment, across all their invoices (frequency caps).
_CONTACTS = core_select(_D.c.contact_at, _D.c.invoice_id).select_from(
    _D.join(_R, _R.c.invoice_id == _D.c.invoice_id)).where(
    _R.c.customer_id == bindparam("k_customer"), _D.c.channel == bindparam("k_channel"),
    _D.c.status.in_(("calling", "ambiguous", "sent", "unknown")), _D.c.contact_at > bindparam("k_since"))
# Serialises the cap checks of one customer's deliveries (a row lock; SQLite's write lock).
_LOCK_CUSTOMER = update(_C).where(_C.c.id == bindparam("k_customer")).values(id=_C.c.id)
_NEW_ROW = insert(_D).returning(_D.c.id)
_MOVE = update(_D).where(_D.c.id == bindparam("k_id"), _D.c.version == bindparam("k_version")).values(
    {name: bindparam(f"v_{name}") for name in (*_LEDGER_FIELDS[5:], "updated_at") if name != "id"})
_SNAPSHOT = update(_R).where(_R.c.invoice_id == bindparam("k_invoice"), _R.c.seq < bindparam("k_seq")).values(
    {name: bindparam(f"v_{name}") for name in ("seq", "state", "stage", "balance_due", "paid",
                                                "updated_at")})


@cache
def _insert_once(dialect: str, table: str) -> Executable:
    """INSERT ... ON CONFLICT DO NOTHING for ``table`` (runs, audit entries, opt-outs)."""
    target = {"runs": (_R, ["invoice_id"]), "audit": (_A, ["key"]),
              "opt_outs": (_O, ["customer_id", "channel"])}[table]
    build = sqlite_insert if dialect == "sqlite" else postgresql_insert
    return build(target[0]).on_conflict_do_nothing(index_elements=target[1])


@dataclass(frozen=True)
class LedgerRow:
    """A ledger row as the send path sees it (``models.records.Delivery`` is the table)."""

    id: int
    invoice_id: str
    workflow_id: str
    step: str
    channel: str
    status: str
    provider: str
    provider_message_id: str | None
    detail: str
    attempts: int
    version: int
    called_at: datetime | None
    contact_at: datetime | None = None


def fit(text: str | None, size: int) -> str:
    """``text`` cut to ``size`` characters, marked when cut, and storable (no NUL)."""
    text = storable(text or "")
    return text if len(text) <= size else text[: size - len(TRUNCATED)] + TRUNCATED


def _limit(column: object) -> int:
    return int(column.type.length)  # type: ignore[attr-defined]


DELIVERY_DETAIL = _limit(_D.c.detail)  # the column sizes free text is cut to
AUDIT_DETAIL = _limit(_A.c.detail)


class Decision(StrEnum):
    SEND = "send"  # nothing reached the provider yet: send
    RECONCILE = "reconcile"  # an earlier attempt may have reached it: ask the provider first
    DONE = "done"  # sent (or unknown) already: nothing to do
    REFUSED = "refused"  # this channel cannot reach the customer: try the next
    STOPPED = "stopped"  # the run is paid or cancelled: send nothing
    DEFERRED = "deferred"  # not now: outside the contact window, or over a frequency cap


@dataclass(frozen=True)
class Claim:
    """What the first transaction of a send decided, with what the send needs."""

    decision: Decision
    row: LedgerRow | None = None
    customer: Any = None  # the customer's row (CustomerRecord's columns), None if unknown
    balance_due: Decimal | None = None
    since: datetime | None = None  # RECONCILE: when the first provider call began
    holds: tuple[str, ...] = ()  # STOPPED by holds on the customer: which
    deferral: Deferral | None = None  # DEFERRED: until when, and why
    bundle: Gathering | None = None  # SEND of a shared message: its bundle and other invoices


def _kinds(holds: str | None) -> list[str]:
    return [k for k in (holds or "").split(",") if k]


def stoppers(customer: Any) -> list[str]:
    """What stops all contact with a customer (a row of ``customers``): their holds, and
    ``excluded`` if an operator or the billing system excluded them."""
    return sorted({*_kinds(customer.holds), *(["excluded"] if customer.exclude else [])})


def reachable(customer: Any, channel: Channel) -> str | None:
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

    def upsert_customer(self, customer: Customer, *, revive: bool = False) -> list[str]:
        """Store the billing system's current contact details (a corrected number reaches runs
        in flight: deliveries read it when they send). An erased customer stays erased when an
        invoice arrives again; only an explicit update (``revive``) brings details back. Returns
        the holds on the customer (a new run starts held)."""
        for _ in range(2):
            try:
                with self.engine.begin() as db:
                    row = db.execute(_CUSTOMER, {"k_customer": customer.id}).first()
                    if row is not None and row.forgotten_at is not None and not revive:
                        return stoppers(row)
                    for channel, field in (("email", "email"), ("sms", "phone")):
                        old, new = getattr(row, field) if row else None, getattr(customer, field)
                        if old and new != old and field in customer.model_fields_set:  # worth trying again
                            db.execute(_RETRY_ADDRESS, {"k_customer": customer.id, "k_channel": channel})
                    # Only the fields the billing system sent: an invoice without an email keeps
                    # the stored one (it erased it, for every running invoice of the customer),
                    # and an import keeps an operator's exclusion.
                    given = customer.model_fields_set if row is not None else set(type(customer).model_fields)
                    sent = (CONTACT_FIELDS & given) | (SEGMENT_FIELDS & customer.model_fields_set)
                    values = {name: getattr(customer, name) for name in sent}
                    values |= {"forgotten_at": None, "updated_at": utcnow()}
                    if row is None:
                        fresh = CustomerRecord(id=customer.id, **values)
                        db.execute(insert(_C), fresh.model_dump())
                        return stoppers(fresh)
                    db.execute(update(_C).where(_C.c.id == customer.id).values(values))
                    return stoppers(SimpleNamespace(holds=row.holds,
                                                    exclude=values.get("exclude", row.exclude)))
            except IntegrityError:  # inserted concurrently by another start: update it
                continue
        return []

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
            addresses = [a for a in (row.email, row.phone) if a]
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
            # What the customer wrote back (SMS replies on the trail), and the providers' events
            # about them (addresses, message texts): the fact stays, the content goes.
            replies = db.exec(select(AuditEntry).where(
                col(AuditEntry.invoice_id).in_(invoices), AuditEntry.status == "reply")
            ).all() if invoices else []
            for entry in replies:
                entry.detail = f"SMS reply {ERASED}"
                db.add(entry)
            events = list(db.exec(select(WebhookEvent).where(
                col(WebhookEvent.invoice_id).in_(invoices))).all()) if invoices else []
            for address in addresses:
                events += db.exec(select(WebhookEvent).where(
                    col(WebhookEvent.payload).contains(json.dumps(address)[1:-1]))).all()
            for event in events:
                event.payload = "{}"
                db.add(event)
            # The opt-outs stay (a forgotten customer is still not to be contacted); a bounce's
            # reason may quote the address, so only its kind is kept.
            for opt_out in db.exec(select(OptOut).where(OptOut.customer_id == customer_id,
                                                        col(OptOut.reason).startswith(UNREACHABLE))).all():
                opt_out.reason = f"{UNREACHABLE} {ERASED}"
                db.add(opt_out)
            return len(messages)

    # -- runs ----------------------------------------------------------------------------------

    def open_run(self, invoice: RunInvoice, event: AuditEvent | None = None,
                 planned: list[tuple[str, str, datetime]] | None = None) -> None:
        """Create the run's mirror row if it does not exist yet (and record its start, and the
        messages it plans: (step, channel, when), for consolidation)."""
        with self.engine.begin() as db:
            self._open(db, invoice)
            if event is not None:
                self._append(db, event)
            if planned:
                plan(db, invoice.customer_id, invoice.invoice_id, planned)

    def run(self, invoice_id: str) -> RunRow | None:
        with session(self.engine) as db:
            return db.get(RunRow, invoice_id)

    def record(self, invoice: RunInvoice, records: Iterable[RunRecord]) -> None:
        """Write the workflow's records in one transaction: audit entries once per key, and the
        run's snapshot unless a newer one is already there."""
        with self.engine.begin() as db:
            self._write(db, invoice, records)

    def _write(self, db: Connection, invoice: RunInvoice, records: Iterable[RunRecord]) -> None:
        for record in records:
            newest = self._apply(db, invoice, record.snapshot) if record.snapshot else True
            if record.event is not None and (newest or not record.conditional):
                self._append(db, record.event)

    @staticmethod
    def _open(db: Connection, invoice: RunInvoice) -> None:
        amount = str(invoice.amount_due)
        db.execute(_insert_once(db.dialect.name, "runs"), {
            "invoice_id": invoice.invoice_id, "workflow_id": invoice.workflow_id,
            "customer_id": invoice.customer_id, "currency": invoice.currency, "amount_due": amount,
            "balance_due": amount, "paid": "0", "state": RunState.ACTIVE.value, "stage": None,
            "seq": 0, "updated_at": utcnow()})

    def _apply(self, db: Connection, invoice: RunInvoice, snapshot: RunSnapshot) -> bool:
        """Compare-and-set the mirror row to ``snapshot``; False if a newer one is there."""
        params = {"k_invoice": invoice.invoice_id, "k_seq": snapshot.seq, "v_seq": snapshot.seq,
                  "v_state": snapshot.state.value, "v_stage": snapshot.stage,
                  "v_balance_due": str(snapshot.balance_due), "v_paid": str(snapshot.paid),
                  "v_updated_at": utcnow()}
        if db.execute(_SNAPSHOT, params).rowcount:
            return True
        if db.execute(_RUN_STATE, {"k_invoice": invoice.invoice_id}).first() is not None:
            return False  # a newer snapshot is there
        self._open(db, invoice)
        return bool(db.execute(_SNAPSHOT, params).rowcount)

    def retrying_runs(self, older_than: timedelta) -> int:
        """How many invoices have a delivery that has been retrying longer than ``older_than``."""
        cutoff = utcnow() - older_than
        with session(self.engine) as db:
            return int(db.exec(
                select(func.count(func.distinct(Delivery.invoice_id))).where(
                    col(Delivery.status).in_(("retrying", "ambiguous", "calling")),
                    Delivery.created_at < cutoff,
                    # still being tried (each attempt touches the row); an abandoned row drops out
                    Delivery.updated_at > utcnow() - RETRY_FRESH,
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
        window = request.contact.consolidate if request.contact is not None else timedelta(0)
        with self.engine.begin() as db:
            self._write(db, invoice, request.records)
            # The run's clock (the same as the wall clock in production; ahead of it when time is
            # skipped in tests): windows and caps are judged on it, contacts recorded at it.
            moment = max(utcnow(), request.as_of)
            look = db.execute(_CLAIM_LOOK, {"k_invoice": invoice.invoice_id, "k_step": request.step,
                                            "k_channel": channel.value, "k_customer": invoice.customer_id,
                                            **expected_window(moment, window)}).one()
            run = SimpleNamespace(state=look.r_state, balance_due=look.r_balance_due) \
                if look.r_state is not None else None
            row = LedgerRow(**{name: look._mapping[f"d_{name}"] for name in _LEDGER_FIELDS}) \
                if look.d_id is not None else None
            customer = SimpleNamespace(**{name: look._mapping[f"c_{name}"] for name in _CUSTOMER_FIELDS}) \
                if look.c_id is not None else None
            if row is not None and row.status in FINAL:  # what happened stands, paid or not
                return Claim(Decision.DONE if row.status != "failed" else Decision.REFUSED, row)
            # A closed (or, for reminders, a held) run sends nothing new; but an agency post cut
            # off mid-request is finished (the agency dedupes it), so the run learns the agency may
            # hold the account.
            agency_in_flight = channel is Channel.AGENCY and row is not None and row.status in INTERRUPTED
            if (guard and run is not None and halts(request.purpose, RunState(run.state))
                    and not agency_in_flight):
                return Claim(Decision.STOPPED)
            kinds = stoppers(customer) if customer is not None else []
            if guard and kinds and not agency_in_flight:
                # a hold on the customer (or their exclusion) stops every invoice's contact; the
                # run learns which
                return Claim(Decision.STOPPED, holds=tuple(kinds))
            refusal = reachable(customer, channel)
            if refusal is None and channel is not Channel.AGENCY and look.opted_out:
                refusal = f"the customer opted out of {channel}"
            balance = Decimal(run.balance_due) if run is not None else request.balance_due
            if (refusal is None and request.contact is not None
                    and (row is None or row.status not in INTERRUPTED)):
                deferral = self._deferral(db, request, channel, customer, moment)
                if deferral is not None:
                    detail = f"{deferral.reason}; until {deferral.until.isoformat(timespec='seconds')}"
                    self._append(db, _communication(request, channel, "deferred", detail,
                                                    deferral.until.isoformat()))
                    return Claim(Decision.DEFERRED, row, deferral=deferral)
            gathering = self._gather(db, request, channel, row, moment, bool(look.others_planned)) \
                if refusal is None else None
            if gathering is not None and gathering.kind == "wait":
                assert gathering.until is not None and gathering.bundle_id is not None
                row = self._bundled(db, request, channel, row, gathering.bundle_id)
                return Claim(Decision.DEFERRED, row, deferral=Deferral(
                    gathering.until, "consolidate: one message for the customer's invoices due now"))
            bundle = gathering if gathering is not None and gathering.kind == "send" else None
            if row is None:  # first attempt: the row is born claimed (or refused)
                now = utcnow()
                fields = {"invoice_id": invoice.invoice_id, "workflow_id": request.workflow_id,
                          "step": request.step, "channel": channel.value,
                          "status": "failed" if refusal else "calling", "provider": "",
                          "provider_message_id": None, "detail": fit(refusal, DELIVERY_DETAIL),
                          "attempts": 0 if refusal else 1, "version": 1,
                          "called_at": None if refusal else now,
                          "contact_at": None if refusal or channel is Channel.AGENCY else moment}
                new_id = db.execute(_NEW_ROW, {**fields, "created_at": now, "updated_at": now}).scalar_one()
                row = LedgerRow(id=new_id, **fields)
                if refusal is not None:
                    self._append(db, _communication(request, channel, "failed", refusal))
                    return Claim(Decision.REFUSED, row)
                return Claim(Decision.SEND, row, customer, balance, None, bundle=bundle)
            if refusal is not None:
                row = self._set(db, row, status="failed", detail=fit(refusal, DELIVERY_DETAIL))
                self._append(db, _communication(request, channel, "failed", refusal))
                return Claim(Decision.REFUSED, row)
            interrupted = row.status in INTERRUPTED
            since = row.called_at
            row = self._set(db, row, status="calling", attempts=row.attempts + 1,
                            called_at=row.called_at or utcnow(),
                            contact_at=row.contact_at if interrupted or channel is Channel.AGENCY else moment)
            return Claim(Decision.RECONCILE if interrupted else Decision.SEND, row, customer,
                         balance, since, bundle=bundle)

    def _deferral(self, db: Connection, request: DeliveryRequest, channel: Channel, customer: Any,
                  moment: datetime) -> Deferral | None:
        """Whether the contact rules make this message wait (inside the claim's transaction).

        A handoff checks the window only (the customer is told right after it). A capped channel
        locks the customer first, so two invoices' deliveries cannot both take the last slot.
        Rules that can never be met fail the delivery for an operator (``ContactError``)."""
        rules = request.contact
        assert rules is not None
        facts = ContactFacts(timezone=customer.timezone if customer else None,
                             phone=customer.phone if customer else None,
                             country=customer.country if customer else None,
                             region=customer.region if customer else None)
        contacts: list[tuple[datetime, bool]] = []
        local = rules.for_customer(facts.country, facts.region)
        if channel is not Channel.AGENCY and local.capped(channel.value):
            db.execute(_LOCK_CUSTOMER, {"k_customer": request.invoice.customer_id})
            since = moment - timedelta(days=400)
            contacts = [(at, invoice_id == request.invoice.invoice_id) for at, invoice_id in db.execute(
                _CONTACTS, {"k_customer": request.invoice.customer_id, "k_channel": channel.value,
                            "k_since": since}).all()]
        return defer(moment, rules, facts, None if channel is Channel.AGENCY else channel.value,
                     contacts, key=f"{request.invoice.invoice_id}/{request.step}")

    def _gather(self, db: Connection, request: DeliveryRequest, channel: Channel, row: LedgerRow | None,
                moment: datetime, others_planned: bool) -> Gathering | None:
        """Consolidation (``activities.bundle``) for a reminder on a customer channel, the
        customer's row locked. A letter goes alone; an attempt that may have reached the provider
        never waits (it only picks up its own shared message again). ``others_planned``: the
        claim's look found another invoice of the customer planning a message around now."""
        rules = request.contact
        if (rules is None or not rules.consolidate or request.purpose is not Purpose.REMINDER
                or request.letter or channel is Channel.AGENCY):
            return None
        if row is not None and row.status not in (*INTERRUPTED, "bundled", "retrying"):
            return None
        if (row is None or row.status == "retrying") and not others_planned:
            return None  # nothing to share with: no lock, no wait
        db.execute(_LOCK_CUSTOMER, {"k_customer": request.invoice.customer_id})
        gathering = gather(db, customer_id=request.invoice.customer_id, channel=channel.value,
                           invoice_id=request.invoice.invoice_id, step=request.step,
                           pay_url=request.invoice.payment_url, moment=moment, window=rules.consolidate)
        if gathering.kind == "wait" and row is not None and row.status in INTERRUPTED:
            return None
        return gathering

    def _bundled(self, db: Connection, request: DeliveryRequest, channel: Channel, row: LedgerRow | None,
                 bundle_id: int) -> LedgerRow:
        """The ledger row of a delivery waiting in a shared message (written once, with its entry)."""
        detail = (f"waits to go out in one message with the customer's other invoices "
                  f"(shared message {bundle_id})")
        if row is not None and row.status == "bundled":
            return row
        if row is not None:
            return self._set(db, row, status="bundled", detail=detail)
        now = utcnow()
        fields = {"invoice_id": request.invoice.invoice_id, "workflow_id": request.workflow_id,
                  "step": request.step, "channel": channel.value, "status": "bundled", "provider": "",
                  "provider_message_id": None, "detail": detail, "attempts": 0, "version": 1,
                  "called_at": None, "contact_at": None}
        new_id = db.execute(_NEW_ROW, {**fields, "created_at": now, "updated_at": now}).scalar_one()
        self._append(db, _communication(request, channel, "bundled", detail, str(bundle_id)))
        return LedgerRow(id=new_id, **fields)

    def _share(self, db: Connection, request: DeliveryRequest, channel: Channel, bundle: Gathering,
               status: str, message_id: str | None, provider: str) -> None:
        """A shared message's outcome on each member's ledger row and trail (the sender's own
        row is completed by the caller)."""
        assert bundle.bundle_id is not None
        close(db, bundle.bundle_id, status, message_id)
        if status not in ("sent", "unknown"):
            return
        for line in bundle.lines:
            found = db.execute(_FIND_ROW, {"k_invoice": line.invoice_id, "k_step": line.step,
                                           "k_channel": channel.value}).first()
            member = LedgerRow(**found._mapping) if found is not None else None
            if member is None or member.status != "bundled":
                continue
            detail = (f"in one message with invoice {request.invoice.invoice_id} "
                      f"({provider} {message_id or ''})".strip())
            if self._cas(db, member, status=status, provider=provider, detail=detail,
                         provider_message_id=message_id) is None:
                continue
            self._append(db, AuditEvent(
                key=audit_key(member.workflow_id, "delivery", line.step, channel.value, status, "shared"),
                workflow_id=member.workflow_id, invoice_id=line.invoice_id, at=utcnow(),
                kind=AuditKind.COMMUNICATION, status=status, step=line.step, channel=channel.value,
                detail=detail))

    def complete(self, request: DeliveryRequest, claim: Claim, status: str, detail: str, *,
                 channel: Channel, provider: str = "", message_id: str | None = None,
                 audit_suffix: str = "", opt_out: bool = False,
                 records: Iterable[RunRecord] = ()) -> LedgerRow | None:
        """The second transaction: the outcome, its audit entry, an opt-out, and ``records``,
        only if this attempt still holds the row. Returns None when a newer attempt took it."""
        assert claim.row is not None
        detail = fit(detail, DELIVERY_DETAIL)
        changes: dict[str, Any] = {"status": status, "detail": detail}
        if provider:
            changes["provider"] = provider
        if message_id:
            changes["provider_message_id"] = fit(message_id, 200)
        if status in UNSETTLED and claim.decision is Decision.RECONCILE:
            # An earlier attempt may have reached the provider, and this one settled nothing (a
            # lookup that found nothing is not proof for every provider: SendGrid and the agency
            # cannot be asked): the row stays ``ambiguous``, so the next attempt still looks
            # first, an email re-sent is still marked a possible duplicate, and a run whose
            # handoff was cut off still treats the agency as holding the account. The trail
            # says what this attempt met.
            changes["status"] = "ambiguous"
        if changes["status"] == "retrying":
            changes["called_at"] = None  # the provider has nothing: no lookup needed
        with self.engine.begin() as db:
            moved = self._cas(db, claim.row, **changes)
            if moved is None:
                return None
            if claim.bundle is not None and status in ("sent", "unknown", "failed"):
                self._share(db, request, channel, claim.bundle, status, message_id, provider)
            self._append(db, _communication(request, channel, status, detail, audit_suffix))
            if opt_out:
                self._add_opt_out(db, request.invoice.customer_id, channel.value, detail)
            self._write(db, request.invoice, records)
            return moved

    def _set(self, db: Connection, row: LedgerRow, **changes: Any) -> LedgerRow:
        moved = self._cas(db, row, **changes)
        if moved is None:  # another attempt moved it between our read and write
            raise StaleClaim(f"ledger row {row.id} changed under this attempt")
        return moved

    @staticmethod
    def _cas(db: Connection, row: LedgerRow, **changes: Any) -> LedgerRow | None:
        """The row moved on by ``changes``, if nobody moved it since ``row`` was read."""
        moved = dataclasses.replace(row, **changes, version=row.version + 1)
        params = {f"v_{name}": getattr(moved, name) for name in _LEDGER_FIELDS[5:]}
        params |= {"k_id": row.id, "k_version": row.version, "v_updated_at": utcnow()}
        return moved if db.execute(_MOVE, params).rowcount else None

    def settle(self, delivery_id: int, status: str, note: str, who: str = "operator") -> LedgerRow:
        """An operator's verdict on an ``unknown`` delivery: ``sent`` or ``failed``."""
        with self.engine.begin() as db:
            found = db.execute(_ROW_BY_ID, {"k_id": delivery_id}).first()
            row = LedgerRow(**found._mapping) if found is not None else None
            if row is None or row.status != "unknown":
                raise LookupError(f"no delivery {delivery_id} with an unknown outcome")
            detail = fit(f"settled by {who}: {note}", DELIVERY_DETAIL)
            moved = self._cas(db, row, status=status, detail=detail)
            if moved is None:
                raise LookupError(f"delivery {delivery_id} changed meanwhile; look again")
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

    def refused_later(self, provider_message_id: str, detail: str) -> list[Delivery]:
        """A message the provider accepted and later could not deliver (an SMS undelivered):
        every row it went out for becomes ``failed`` with the reason. A shared message carries
        several invoices, each with its own row, and none of them got its notice.

        Returns the rows this report refused, including those it already had (the same report
        processed again after only some of the runs were told), so every run can be told; empty
        when no row took that message or another report settled them."""
        detail = fit(detail, DELIVERY_DETAIL)
        refused: list[Delivery] = []
        with session(self.engine) as db:
            rows = db.exec(select(Delivery).where(Delivery.provider_message_id == provider_message_id)
                           .order_by(col(Delivery.id))).all()
            for row in rows:
                if row.status == "sent":
                    row.status, row.detail = "failed", detail
                    row.version, row.updated_at = row.version + 1, utcnow()
                    db.add(row)
                elif row.status != "failed" or row.detail != detail:
                    continue
                refused.append(row)
        return refused

    def delivery_by_message_id(self, provider_message_id: str) -> Delivery | None:
        with session(self.engine) as db:
            return db.exec(select(Delivery).where(
                Delivery.provider_message_id == provider_message_id)).first()

    def deliveries(self, invoice_id: str) -> Sequence[Delivery]:
        with session(self.engine) as db:
            return db.exec(
                select(Delivery).where(Delivery.invoice_id == invoice_id).order_by(col(Delivery.id))
            ).all()

    # -- the audit trail -----------------------------------------------------------------------

    def append(self, event: AuditEvent) -> bool:
        """Append an audit entry once; return False if an earlier attempt already had."""
        with self.engine.begin() as db:
            if db.execute(_HAS_KEY, {"k_key": event.key}).first() is not None:
                return False
            self._append(db, event)
            return True

    @staticmethod
    def _append(db: Connection, event: AuditEvent) -> None:
        """Insert an audit entry unless its key is there (an earlier or concurrent attempt)."""
        db.execute(_insert_once(db.dialect.name, "audit"), {
            "key": event.key, "workflow_id": event.workflow_id, "invoice_id": event.invoice_id,
            "at": event.at, "kind": event.kind.value, "status": fit(event.status, 32),
            "step": fit(event.step, 200) if event.step else None, "channel": event.channel,
            "detail": fit(event.detail, AUDIT_DETAIL), "recorded_at": utcnow()})

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
        with self.engine.begin() as db:
            found = db.execute(_OPTED_OUT, {"k_customer": customer_id, "k_channel": channel})
            return found.first() is not None

    def opt_out(self, customer_id: str, channel: str, reason: str) -> None:
        with self.engine.begin() as db:
            self._add_opt_out(db, customer_id, channel, reason)

    def holds_of(self, customer_id: str) -> list[str]:
        """What stops contact with a customer: their holds, and ``excluded`` if they are."""
        with session(self.engine) as db:
            row = db.get(CustomerRecord, customer_id)
            if row is None:
                return []
            return stoppers(row)

    def set_holds(self, customer_id: str, change: Callable[[set[str]], set[str]]) -> list[str]:
        """Change the customer's holds (kinds, e.g. bankruptcy); returns them after the change.
        The row is locked for the change, so two operators at once both count. Raises
        LookupError for an unknown customer."""
        with session(self.engine) as db:
            row = db.exec(select(CustomerRecord).where(CustomerRecord.id == customer_id)
                          .with_for_update()).first()
            if row is None:
                raise LookupError(f"no customer {customer_id}")
            kinds = sorted(change(set(_kinds(row.holds))))
            row.holds, row.updated_at = ",".join(kinds), utcnow()
            db.add(row)
            return kinds

    def opt_in(self, customer_id: str, channel: str) -> int:
        """The customer asked for the channel again (START): their opt-outs of it are removed."""
        with session(self.engine) as db:
            rows = db.exec(select(OptOut).where(OptOut.customer_id == customer_id,
                                                OptOut.channel == channel)).all()
            for row in rows:
                db.delete(row)
            return len(rows)

    def customers_with_phone(self, phone: str) -> list[str]:
        with session(self.engine) as db:
            return list(db.exec(select(CustomerRecord.id).where(CustomerRecord.phone == phone)).all())

    def open_invoices(self, customer_ids: Iterable[str]) -> list[str]:
        """Invoices of these customers whose runs have not closed (the mirror's view)."""
        with session(self.engine) as db:
            return list(db.exec(select(RunRow.invoice_id).where(
                RunRow.customer_id.in_(list(customer_ids)),  # type: ignore[attr-defined]
                RunRow.state.not_in([s.value for s in CLOSED]),  # type: ignore[attr-defined]
            ).order_by(RunRow.invoice_id)).all())

    @staticmethod
    def _add_opt_out(db: Connection, customer_id: str, channel: str, reason: str) -> None:
        db.execute(_insert_once(db.dialect.name, "opt_outs"), {
            "customer_id": customer_id, "channel": channel, "reason": fit(reason, 500),
            "created_at": utcnow()})

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

    def count_late_payment(self, invoice_id: str, amount: Decimal, event: AuditEvent) -> bool:
        """A payment kept after the run ended lowers the mirror's balance, so the next report to
        the agency quotes what is still owed (the ended run no longer updates it).

        Exactly once: ``event`` marks it counted and is written in the same transaction, after
        the run's row is locked, so a retry after a failure part-way, or two at once, find it.
        False when it was counted before."""
        with self.engine.begin() as db:
            row = db.execute(core_select(_R.c.seq, _R.c.balance_due, _R.c.paid, _R.c.state, _R.c.stage)
                             .where(_R.c.invoice_id == invoice_id).with_for_update()).first()
            if db.execute(_HAS_KEY, {"k_key": event.key}).first() is not None:
                return False
            if row is not None:
                balance = max(Decimal(row.balance_due) - amount, Decimal(0))
                db.execute(_SNAPSHOT, {
                    "k_invoice": invoice_id, "k_seq": row.seq + 1, "v_seq": row.seq + 1,
                    "v_state": row.state, "v_stage": row.stage,
                    "v_balance_due": str(balance), "v_paid": str(Decimal(row.paid) + amount),
                    "v_updated_at": utcnow()})
            self._append(db, event)
            return True

    def payments(self, status: str | None = None, invoice_id: str | None = None) -> Sequence[PaymentRow]:
        with session(self.engine) as db:
            query = select(PaymentRow).order_by(col(PaymentRow.id))
            if status is not None:
                query = query.where(PaymentRow.status == status)
            if invoice_id is not None:
                query = query.where(PaymentRow.invoice_id == invoice_id)
            return db.exec(query).all()

    def match_payment(self, invoice_id: str, payment_id: str, detail: str) -> bool:
        """An unmatched payment that a run took: off the unmatched list (kept, with ``detail``)."""
        with self.engine.begin() as db:
            return bool(db.execute(update(_P).where(
                _P.c.invoice_id == invoice_id, _P.c.payment_id == payment_id, _P.c.status == "unmatched",
            ).values(status="matched", detail=fit(detail, 500))).rowcount)


class StaleClaim(RuntimeError):
    """Another attempt moved the ledger row while this one held it (retried by Temporal)."""


def _communication(request: DeliveryRequest, channel: Channel, status: str, detail: str,
                   suffix: str = "") -> AuditEvent:
    """The audit entry for a delivery outcome (keyed so a retry cannot write it twice)."""
    return AuditEvent(
        key=audit_key(request.workflow_id, "delivery", request.step, channel.value, status, suffix),
        workflow_id=request.workflow_id, invoice_id=request.invoice.invoice_id, at=utcnow(),
        kind=AuditKind.COMMUNICATION, status=status, step=request.step, channel=channel.value,
        detail=detail,
    )
