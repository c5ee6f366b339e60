"""The database layer on SQLite and on the real PostgreSQL server, and the delivery activity's
no-duplicate guarantees across retries, crashes, fallbacks and payments.

Every test that touches a database runs twice (``db_url``): on a SQLite file and on a private
schema of the PostgreSQL server at 127.0.0.1:5432, which, unlike SQLite, refuses over-long text.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, text
from sqlmodel import SQLModel, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import models.records  # noqa: F401  (tables on the metadata)
from activities.channels import (
    AmbiguousSendError,
    OutgoingMessage,
    PermanentSendError,
    RejectedSendError,
    RetryableSendError,
)
from activities.delivery import DeliveryActivities
from activities.ledger import TRUNCATED, Decision, Ledger
from activities.outbox import OutboxSender, messages_for
from activities.rendering import Renderer
from models.audit import AuditEvent, AuditKind, audit_key
from models.database import check_schema, engine_for, migrate, session
from models.delivery import DeliveryRequest, DeliveryResult, DeliveryStatus, Purpose
from models.invoice import Invoice, plan_run
from models.money import format_money
from models.payment import PaymentReceived
from models.policy import Channel, load_policies
from models.records import AuditEntry, Delivery, OptOut, OutboxMessage
from models.run import RunInvoice, RunRecord, RunSnapshot, RunState
from settings import ROOT
from tests.conftest import sample_invoice

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POLICY = load_policies(ROOT / "policies" / "default.toml")["standard"]


def postgres_available() -> str | None:
    try:
        engine = create_engine(POSTGRES, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as c:
                c.execute(text("select 1"))
        finally:
            engine.dispose()
        return None
    except Exception as exc:
        return f"no PostgreSQL answers at 127.0.0.1:5432 ({exc.__class__.__name__})"


@contextmanager
def private_schema(prefix: str) -> Iterator[str]:
    """The URL of an empty schema of its own on the real PostgreSQL, dropped afterwards (the test
    is skipped when no server answers)."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"create schema {schema}"))
    url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        engine_for(url).dispose()
        with admin.connect() as c:
            c.execute(text(f"drop schema {schema} cascade"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly migrated database: a SQLite file, or a private schema on the real PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        migrate(url)
        yield url
        engine_for(url).dispose()
        return
    with private_schema("dunning_test") as url:
        migrate(url)
        yield url


# -- helpers ---------------------------------------------------------------------------------------


class ScriptedSender:
    """A provider whose answers the test scripts: ``sends`` for send(), ``finds`` for find_sent().

    An answer is a provider id (or None for find_sent) or an exception to raise. ``calls`` is every
    send the provider saw (even one that then timed out); ``sent`` those it acknowledged.
    """

    def __init__(self, provider: str, sends: Sequence[Exception | str] = (),
                 finds: Sequence[Exception | str | None] = ()) -> None:
        self.provider = provider
        self.sends = list(sends)
        self.finds = list(finds)
        self.calls: list[OutgoingMessage] = []
        self.sent: list[OutgoingMessage] = []
        self.lookups: list[tuple[str, datetime]] = []

    def send(self, message: OutgoingMessage) -> str:
        self.calls.append(message)
        outcome = self.sends.pop(0) if self.sends else f"{self.provider}-{len(self.calls)}"
        if isinstance(outcome, Exception):
            raise outcome
        self.sent.append(message)
        return outcome

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        self.lookups.append((message.reference, since))
        outcome = self.finds.pop(0) if self.finds else None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@dataclasses.dataclass
class World:
    """One database with a delivery activity wired to a scripted sender per channel."""

    url: str
    ledger: Ledger
    senders: dict[Channel, ScriptedSender]
    acts: DeliveryActivities

    @property
    def sms(self) -> ScriptedSender:
        return self.senders[Channel.SMS]

    @property
    def email(self) -> ScriptedSender:
        return self.senders[Channel.EMAIL]

    @property
    def agency(self) -> ScriptedSender:
        return self.senders[Channel.AGENCY]

    def start(self, invoice_id: str | None = None, **changes: Any) -> RunInvoice:
        """What starting a run does to the database: the customer stored, the mirror opened."""
        invoice = Invoice.model_validate(sample_invoice(invoice_id, **changes))
        run = plan_run(invoice, POLICY).invoice
        self.ledger.upsert_customer(invoice.customer)
        self.ledger.open_run(run)
        return run

    def rows(self, invoice: RunInvoice) -> dict[str, Delivery]:
        return {row.channel: row for row in self.ledger.deliveries(invoice.invoice_id)}

    def trail(self, invoice: RunInvoice) -> list[tuple[str, str | None]]:
        return [(e.status, e.channel) for e in self.ledger.trail(invoice.invoice_id)]


def renderer_for(templates: Path = ROOT / "templates") -> Renderer:
    return Renderer(templates_dir=templates, company="Example Billing", email_from="billing@example.com")


def world_for(db_url: str, renderer: Renderer | None = None, **senders: ScriptedSender) -> World:
    ledger = Ledger(engine_for(db_url))
    by_channel = {channel: senders.get(channel.value, ScriptedSender(channel.value)) for channel in Channel}
    return World(db_url, ledger, by_channel,
                 DeliveryActivities(ledger, by_channel, renderer or renderer_for()))


def request_for(invoice: RunInvoice, *channels: Channel, step: str = "sms_reminder",
                template: str | None = None, **changes: Any) -> DeliveryRequest:
    return DeliveryRequest(
        workflow_id=invoice.workflow_id, invoice=invoice, step=step, template=template or step,
        channels=channels or (Channel.SMS,), balance_due=invoice.amount_due,
        as_of=datetime.now(UTC), **changes,
    )


def handing_off(db_url: str, *answers: Exception | str) -> tuple[World, RunInvoice, DeliveryRequest]:
    """A world whose agency answers ``answers`` in turn, a run, and its handoff's request."""
    world = world_for(db_url, agency=ScriptedSender("agency", sends=answers))
    invoice = world.start()
    return world, invoice, request_for(invoice, Channel.AGENCY, step="agency_handoff",
                                       template="agency_handoff", purpose=Purpose.HANDOFF)


def deliver(world: World, request: DeliveryRequest, attempt: int = 1) -> DeliveryResult:
    """Run the activity as Temporal's ``attempt``-th try would."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt)
    return env.run(world.acts.deliver, request)


def failing(world: World, request: DeliveryRequest, attempt: int = 1) -> ApplicationError:
    with pytest.raises(ApplicationError) as raised:
        deliver(world, request, attempt)
    return raised.value


def fact(invoice: RunInvoice, status: str, detail: str = "", kind: AuditKind = AuditKind.STATE) -> AuditEvent:
    return AuditEvent(key=audit_key(invoice.workflow_id, kind.value, status, uuid.uuid4().hex),
                      workflow_id=invoice.workflow_id, invoice_id=invoice.invoice_id,
                      at=datetime.now(UTC), kind=kind, status=status, detail=detail)


def snapshot(seq: int, state: RunState = RunState.ACTIVE, balance: str = "1250.00",
             paid: str = "0") -> RunSnapshot:
    return RunSnapshot(seq=seq, state=state, stage=None, balance_due=Decimal(balance), paid=Decimal(paid))


@pytest.fixture
def world(db_url: str) -> World:
    return world_for(db_url)


# -- the schema ------------------------------------------------------------------------------------


def test_migrations_match_the_models(db_url: str):
    check_schema(db_url)  # at head: a worker would start on it
    with engine_for(db_url).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                SQLModel.metadata)
    assert diff == []


def test_audit_entries_are_recorded_once_per_key_and_keep_utc(db_url: str):
    ledger = Ledger(engine_for(db_url))
    at = datetime(2026, 11, 1, 9, 0, tzinfo=timezone(timedelta(hours=-5)))
    entry = AuditEvent(key=audit_key("dunning-INV-X", "payment", 1), workflow_id="dunning-INV-X",
                       invoice_id="INV-X", at=at, kind=AuditKind.PAYMENT, status="accepted",
                       detail="paid 10.00 USD")
    assert ledger.append(entry) is True
    assert ledger.append(entry) is False  # a retried activity
    invoice = plan_run(Invoice.model_validate(sample_invoice("INV-X")), POLICY).invoice
    ledger.record(invoice, [RunRecord(event=entry)])  # riding on a later delivery: still once
    [stored] = ledger.trail("INV-X")
    assert stored.at == at and stored.at.utcoffset() == timedelta(0)
    assert stored.at.hour == 14  # 09:00 at UTC-5, kept as the same instant in UTC
    assert stored.detail == "paid 10.00 USD"


def test_audit_keys_cannot_collide():
    assert audit_key("a:b", "c") != audit_key("a", "b:c")
    assert audit_key("a", "b") == audit_key("a", "b")


def test_outbox_keeps_one_message_per_reference(db_url: str):
    engine = engine_for(db_url)
    outbox = OutboxSender(engine)
    message = OutgoingMessage(channel=Channel.SMS, recipient="+14155550100", body="hello",
                              reference="INV-O/sms_reminder/sms")
    first = outbox.send(message)
    assert outbox.send(message) == first  # an attempt that died after storing it
    assert outbox.find_sent(message, datetime.now(UTC)) == first
    with session(engine) as db:
        assert len(db.exec(select(OutboxMessage)).all()) == 1


def test_money_is_never_stored_as_float(world: World):
    invoice = world.start(amount_due="0.30")
    balance = str(Decimal("0.10") + Decimal("0.20"))
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "accepted", kind=AuditKind.PAYMENT),
                                            snapshot=snapshot(1, balance=balance, paid="0.00"))])
    assert world.ledger.keep_payment("INV-M", "P-1", "0.30", "USD", datetime.now(UTC), "unmatched", "")
    with engine_for(world.url).connect() as c:
        amount, balance, paid = c.execute(
            text("select amount_due, balance_due, paid from runs where invoice_id = :i"),
            {"i": invoice.invoice_id}).one()
        [kept] = c.execute(text("select amount from payments")).one()
    assert (amount, balance, paid, kept) == ("0.30", "0.30", "0.00", "0.30")
    assert all(isinstance(v, str) for v in (amount, balance, paid, kept))


# -- the delivery activity: retries and crashes --------------------------------------------------


def test_retry_after_success_sends_nothing(world: World):
    invoice = world.start()
    request = request_for(invoice)
    first = deliver(world, request)
    again = deliver(world, request, attempt=2)  # the completion was lost: Temporal retries
    assert first.status is DeliveryStatus.SENT and first.provider_message_id == "sms-1"
    assert again.status is DeliveryStatus.SENT and again.repeated
    assert again.provider_message_id == "sms-1"
    assert len(world.sms.calls) == 1
    assert world.trail(invoice) == [("sent", "sms")]


def test_retryable_failure_is_recorded_then_sent_once(db_url: str):
    world = world_for(db_url, sms=ScriptedSender("sms", sends=[
        RetryableSendError("429 too many requests", status=429, retry_after=30), "SM2"]))
    invoice = world.start()
    request = request_for(invoice)
    error = failing(world, request)
    assert error.type == "ProviderUnavailable" and not error.non_retryable
    assert error.next_retry_delay == timedelta(seconds=30)  # the provider's Retry-After
    assert world.rows(invoice)["sms"].status == "retrying"
    result = deliver(world, request, attempt=2)
    assert result.status is DeliveryStatus.SENT and result.provider_message_id == "SM2"
    assert len(world.sms.sent) == 1 and len(world.sms.calls) == 2
    assert [status for status, _ in world.trail(invoice)] == ["retrying", "sent"]
    assert world.rows(invoice)["sms"].attempts == 2


def test_a_replanned_delivery_that_fails_again_is_recorded_as_retrying(db_url: str):
    world = world_for(db_url, sms=ScriptedSender("sms", sends=[
        RetryableSendError("503 service unavailable", status=503),
        RetryableSendError("503 service unavailable", status=503)]))
    invoice = world.start()
    request = request_for(invoice)
    assert failing(world, request, attempt=1).type == "ProviderUnavailable"
    assert failing(world, request, attempt=1).type == "ProviderUnavailable"  # a new activity
    assert world.rows(invoice)["sms"].status == "retrying"


def test_opted_out_sms_falls_back_to_email_and_later_sms_is_refused(db_url: str):
    world = world_for(db_url, sms=ScriptedSender("sms", sends=[
        PermanentSendError("21610: the recipient replied STOP", opted_out=True, code=21610)]))
    invoice = world.start()
    result = deliver(world, request_for(invoice, Channel.SMS, Channel.EMAIL))
    assert result.status is DeliveryStatus.SENT and result.channel is Channel.EMAIL
    assert len(world.email.sent) == 1 and world.sms.sent == []
    assert world.ledger.opted_out(invoice.customer_id, "sms")
    assert world.rows(invoice)["sms"].status == "failed"
    assert world.trail(invoice) == [("failed", "sms"), ("sent", "email")]

    later = world.start()  # another invoice of the same customer
    refused = deliver(world, request_for(later))
    assert refused.status is DeliveryStatus.FAILED
    assert "opted out of sms" in refused.detail
    assert len(world.sms.calls) == 1  # only the first, refused, call ever reached the provider


def test_customer_without_a_phone_is_emailed(world: World):
    invoice = world.start(customer={"id": "C-2", "name": "Grace Hopper", "email": "grace@example.com"})
    result = deliver(world, request_for(invoice, Channel.SMS, Channel.EMAIL))
    assert result.status is DeliveryStatus.SENT and result.channel is Channel.EMAIL
    assert world.sms.calls == [] and len(world.email.sent) == 1
    assert world.email.sent[0].recipient == "grace@example.com"
    rows = world.rows(invoice)
    assert rows["sms"].status == "failed" and rows["sms"].detail == "no phone number on file"
    [refusal] = [e for e in world.ledger.trail(invoice.invoice_id) if e.channel == "sms"]
    assert refusal.status == "failed" and refusal.detail == "no phone number on file"


@pytest.mark.parametrize("provider_has_it", ["SM-earlier", None, AmbiguousSendError("lookup timed out")],
                         ids=["found", "not-found", "cannot-tell"])
def test_sms_whose_earlier_attempt_died_mid_call_is_looked_up_first(
        db_url: str, provider_has_it: str | Exception | None):
    world = world_for(db_url, sms=ScriptedSender("sms", finds=[provider_has_it]))
    invoice = world.start()
    request = request_for(invoice)
    died = world.ledger.claim(request, Channel.SMS, guard=True)  # then the worker died mid-call
    assert died.decision is Decision.SEND and died.row is not None and died.row.status == "calling"
    result = deliver(world, request, attempt=2)
    [(reference, since)] = world.sms.lookups
    assert reference == f"{invoice.invoice_id}/sms_reminder/sms" and since == died.row.called_at
    row = world.rows(invoice)["sms"]
    if provider_has_it == "SM-earlier":
        assert result.status is DeliveryStatus.SENT and result.provider_message_id == "SM-earlier"
        assert world.sms.calls == []
        assert (row.status, row.provider_message_id) == ("sent", "SM-earlier")
    elif provider_has_it is None:
        assert result.status is DeliveryStatus.SENT and result.provider_message_id == "sms-1"
        assert len(world.sms.calls) == 1
    else:
        assert result.status is DeliveryStatus.UNKNOWN and world.sms.calls == []
        assert row.status == "unknown"
        assert [d.id for d in world.ledger.unknown_deliveries()] == [row.id]
        again = deliver(world, request, attempt=3)  # left for an operator: never re-sent
        assert again.repeated and again.status is DeliveryStatus.UNKNOWN
        assert world.sms.calls == [] and len(world.sms.lookups) == 1


def test_email_whose_earlier_attempt_died_mid_call_is_sent_again_as_possible_duplicate(world: World):
    invoice = world.start()
    request = request_for(invoice, Channel.EMAIL, step="friendly_reminder")
    world.ledger.claim(request, Channel.EMAIL, guard=True)  # then the worker died mid-call
    result = deliver(world, request, attempt=2)
    assert result.status is DeliveryStatus.SENT and len(world.email.sent) == 1
    assert "possible duplicate" in result.detail
    [entry] = world.ledger.trail(invoice.invoice_id)
    assert entry.status == "sent" and "possible duplicate" in entry.detail
    assert deliver(world, request, attempt=3).repeated and len(world.email.calls) == 1


def test_an_email_cut_off_stays_a_possible_duplicate_through_a_failed_resend(db_url: str):
    """SendGrid cannot be asked: after a cut-off attempt, a re-send that fails proves nothing
    about the first, so the send that finally goes out is still marked a possible duplicate."""
    world = world_for(db_url, email=ScriptedSender("email", sends=[RetryableSendError("503")]))
    invoice = world.start()
    request = request_for(invoice, Channel.EMAIL, step="friendly_reminder")
    world.ledger.claim(request, Channel.EMAIL, guard=True)  # then the worker died mid-call
    assert failing(world, request, attempt=2).type == "ProviderUnavailable"
    assert world.rows(invoice)["email"].status == "ambiguous"
    result = deliver(world, request, attempt=3)
    assert result.status is DeliveryStatus.SENT and "possible duplicate" in result.detail
    assert [status for status, _ in world.trail(invoice)] == ["retrying", "sent"]


def test_an_sms_cut_off_is_looked_up_again_after_a_failed_resend(db_url: str):
    """Twilio had nothing at the first lookup; the re-send was refused (503). The next attempt
    still looks first, from when the first call began, before sending."""
    world = world_for(db_url, sms=ScriptedSender("sms", sends=[RetryableSendError("503"), "SM-2"],
                                                 finds=[None, None]))
    invoice = world.start()
    request = request_for(invoice)
    first = world.ledger.claim(request, Channel.SMS, guard=True)  # then the worker died mid-call
    failing(world, request, attempt=2)
    assert deliver(world, request, attempt=3).status is DeliveryStatus.SENT
    assert [since for _, since in world.sms.lookups] == [first.row.called_at] * 2
    assert len(world.sms.sent) == 1


def test_an_agency_that_refuses_the_document_leaves_it_to_an_operator(db_url: str):
    """A 422 from the agency: retrying the same document cannot help. The delivery fails for
    good (the run shows ``failed``), and ``dunning retry`` posts it again once fixed."""
    world, invoice, handoff = handing_off(db_url, RejectedSendError(
        'agency refused the request: 422 {"error": "missing debtor country"}'))
    error = failing(world, handoff)
    assert error.type == "DeliveryBroken" and error.non_retryable and "missing debtor country" in str(error)
    assert world.rows(invoice)["agency"].status == "broken"
    assert [status for status, _ in world.trail(invoice)] == ["broken"]
    result = deliver(world, handoff)  # `dunning retry`: a new activity
    assert result.status is DeliveryStatus.SENT and len(world.agency.sent) == 1


def test_an_agency_post_cut_off_then_refused_still_counts_as_maybe_held(db_url: str):
    """The first post timed out (the agency may hold the account), the re-post was refused: the
    row stays ``ambiguous``, so a payment meanwhile does not stop the post that tells the run."""
    world, invoice, handoff = handing_off(db_url, AmbiguousSendError("agency may have received it, no "
                                                                      "answer: ReadTimeout"),
                                          RejectedSendError("agency refused the request: 422"))
    failing(world, handoff)
    assert failing(world, handoff, attempt=2).type == "DeliveryBroken"
    assert world.rows(invoice)["agency"].status == "ambiguous"
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "paid"),
                                            snapshot=snapshot(5, RunState.PAID, "0.00", "1250.00"))])
    assert deliver(world, handoff).status is DeliveryStatus.SENT


@pytest.mark.parametrize("found", ["SM-late", None], ids=["provider-has-it", "provider-has-nothing"])
def test_timeout_after_the_request_went_out_is_reconciled_not_resent(db_url: str, found: str | None):
    world = world_for(db_url, sms=ScriptedSender("sms", sends=[AmbiguousSendError("read timed out")],
                                                 finds=[found]))
    invoice = world.start()
    request = request_for(invoice)
    error = failing(world, request)
    assert error.type == "ProviderUnavailable" and not error.non_retryable
    assert world.rows(invoice)["sms"].status == "ambiguous"
    result = deliver(world, request, attempt=2)
    assert result.status is DeliveryStatus.SENT and len(world.sms.lookups) == 1
    if found:
        assert result.provider_message_id == "SM-late" and len(world.sms.calls) == 1  # no blind resend
    else:
        assert len(world.sms.calls) == 2 and len(world.sms.sent) == 1
    assert [status for status, _ in world.trail(invoice)] == ["ambiguous", "sent"]


# -- the guard and the balance at sending ----------------------------------------------------------


def test_paid_run_stops_reminders_but_reports_the_payment_to_the_agency(world: World):
    invoice = world.start()
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "paid"),
                                            snapshot=snapshot(3, RunState.PAID, "0.00", "1250.00"))])
    for purpose, channel in ((Purpose.REMINDER, Channel.SMS), (Purpose.HANDOFF, Channel.AGENCY)):
        stopped = deliver(world, request_for(invoice, channel, purpose=purpose))
        assert stopped.status is DeliveryStatus.STOPPED
    assert world.sms.calls == [] and world.agency.calls == []
    assert world.ledger.deliveries(invoice.invoice_id) == []

    payment = PaymentReceived(payment_id="P-1", amount="1250.00", currency="USD", paid_at=datetime.now(UTC))
    report = deliver(world, request_for(invoice, Channel.AGENCY, step="payment:P-1",
                                        template="agency_handoff", purpose=Purpose.PAYMENT_REPORT,
                                        payment=payment))
    assert report.status is DeliveryStatus.SENT and report.channel is Channel.AGENCY
    [message] = world.agency.sent
    assert message.payload is not None
    assert message.payload["event"] == "account.payment"
    assert message.payload["payment"]["payment_id"] == "P-1"
    assert message.payload["balance_due"] == "0.00"  # the mirror's balance, not the request's


def test_a_payment_riding_on_the_request_stops_it(world: World):
    invoice = world.start()
    paid = RunRecord(event=fact(invoice, "paid"), snapshot=snapshot(1, RunState.PAID, "0.00", "1250.00"))
    result = deliver(world, request_for(invoice, records=(paid,)))
    assert result.status is DeliveryStatus.STOPPED and world.sms.calls == []
    assert world.trail(invoice) == [("paid", None)]  # the records were written all the same
    run = world.ledger.run(invoice.invoice_id)
    assert run is not None and run.state == "paid"


def test_the_message_quotes_the_balance_at_sending(world: World):
    invoice = world.start()
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "accepted", kind=AuditKind.PAYMENT),
                                            snapshot=snapshot(1, balance="400.00", paid="850.00"))])
    request = request_for(invoice)  # scheduled when 1,250.00 was due
    assert request.balance_due == Decimal("1250.00")
    deliver(world, request)
    [message] = world.sms.sent
    assert format_money(Decimal("400.00"), "USD", "en_US") in message.body
    assert format_money(Decimal("1250.00"), "USD", "en_US") not in message.body


# -- compare-and-set -------------------------------------------------------------------------------


def test_a_stale_claim_cannot_overwrite_a_newer_outcome(world: World):
    invoice = world.start()
    request = request_for(invoice)
    a = world.ledger.claim(request, Channel.SMS, guard=True)
    b = world.ledger.claim(request, Channel.SMS, guard=True)  # a newer attempt takes the row over
    assert a.decision is Decision.SEND and b.decision is Decision.RECONCILE
    assert a.row is not None and b.row is not None and a.row.id == b.row.id
    assert world.ledger.complete(request, a, "failed", "A's late failure", channel=Channel.SMS) is None
    moved = world.ledger.complete(request, b, "sent", "B sent it", channel=Channel.SMS, provider="sms",
                                  message_id="SM-B")
    assert moved is not None and moved.status == "sent"
    assert world.ledger.complete(request, a, "retrying", "A again", channel=Channel.SMS) is None
    row = world.rows(invoice)["sms"]
    assert (row.status, row.provider_message_id, row.detail) == ("sent", "SM-B", "B sent it")
    assert world.trail(invoice) == [("sent", "sms")]  # A's outcomes left no entry either


def test_an_older_snapshot_never_overwrites_a_newer_one(world: World):
    invoice = world.start()
    ledger = world.ledger
    ledger.record(invoice, [RunRecord(event=fact(invoice, "paid"),
                                      snapshot=snapshot(5, RunState.PAID, "0.00", "1250.00"))])
    late = fact(invoice, "active", "an older state arriving late")
    ledger.record(invoice, [RunRecord(event=late, snapshot=snapshot(3, RunState.ACTIVE, "1250.00"))])
    run = ledger.run(invoice.invoice_id)
    assert run is not None and (run.seq, run.state, run.balance_due) == (5, "paid", "0.00")

    predicted = fact(invoice, "handed_off", "predicted, overtaken by the payment")
    ledger.record(invoice, [RunRecord(event=predicted, snapshot=snapshot(4, RunState.HANDED_OFF, "1250.00"),
                                      conditional=True)])
    fresh = fact(invoice, "paid", "a newer prediction")
    ledger.record(invoice, [RunRecord(event=fresh, snapshot=snapshot(6, RunState.PAID, "0.00", "1250.00"),
                                      conditional=True)])
    keys = {e.key for e in ledger.trail(invoice.invoice_id)}
    assert late.key in keys  # it happened: recorded, only the mirror ignores it
    assert predicted.key not in keys
    assert fresh.key in keys
    run = ledger.run(invoice.invoice_id)
    assert run is not None and (run.seq, run.state) == (6, "paid")


# -- long free text --------------------------------------------------------------------------------


def test_long_free_text_is_cut_to_its_column_not_refused(db_url: str):
    refusal = "21610: " + "the carrier refused the message for a reason it explains at length " * 80
    world = world_for(db_url, sms=ScriptedSender("sms", sends=[PermanentSendError(refusal, opted_out=True)]),
                      email=ScriptedSender("email", sends=["X" * 300]))
    invoice = world.start()
    reason = "c" * 5000
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "cancelled", f"cancelled: {reason}"),
                                            snapshot=snapshot(1, RunState.ACTIVE))])
    result = deliver(world, request_for(invoice, Channel.SMS, Channel.EMAIL))
    assert result.status is DeliveryStatus.SENT and result.channel is Channel.EMAIL

    def cut(value: str | None, size: int) -> None:
        assert value is not None and len(value) == size and value.endswith(TRUNCATED)

    entries = {e.status: e for e in world.ledger.trail(invoice.invoice_id)}
    cut(entries["cancelled"].detail, 2000)
    cut(entries["failed"].detail, 2000)
    rows = world.rows(invoice)
    cut(rows["sms"].detail, 2000)
    cut(rows["email"].provider_message_id, 200)  # a provider's 300-character answer
    with session(engine_for(db_url)) as db:
        [opt_out] = db.exec(select(OptOut)).all()
    cut(opt_out.reason, 500)


def test_a_nul_in_free_text_is_dropped_not_refused(world: World):
    """PostgreSQL refuses NUL in text; a record refused is retried for the run's life. A raw
    signal from a script is not checked at the edges, so the ledger drops it."""
    invoice = world.start()
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "cancelled", "cancelled: void\x00ed"),
                                            snapshot=snapshot(1, RunState.CANCELLED))])
    [entry] = world.ledger.trail(invoice.invoice_id)
    assert entry.detail == "cancelled: voided"


def test_a_webhook_naming_an_invoice_id_no_run_can_have_is_still_kept(db_url: str):
    """Stripe metadata is free text: an id longer than the column (PostgreSQL refused the whole
    event, and Stripe got a 500 on every redelivery) is kept without the match column."""
    from inbox import Inbox, Incoming

    inbox = Inbox(engine_for(db_url))
    assert inbox.store(Incoming("stripe", "evt_long", "payment_intent.succeeded", {"id": "evt_long"},
                                reference="pi_long", invoice_id="Rechnung " + "9" * 90))
    [row] = inbox.events("stripe")
    assert row.invoice_id is None and row.status == "pending"


def test_a_database_refusal_quoting_a_value_is_masked_in_the_trail_and_the_failure(world: World):
    from sqlalchemy.exc import DataError

    from activities.delivery import broken_on_bad_data

    invoice = world.start()
    request = request_for(invoice)
    with pytest.raises(ApplicationError) as raised, broken_on_bad_data(world.ledger, request):
        raise DataError("INSERT", {}, Exception('invalid input syntax: "ada@example.com" +14155550100'))
    [entry] = world.ledger.trail(invoice.invoice_id)
    for said in (str(raised.value), entry.detail):
        assert "invalid input syntax" in said and "ada@" not in said and "4155550100" not in said, said


# -- customers -------------------------------------------------------------------------------------


def test_forget_erases_contact_details_and_bodies_but_keeps_the_audit_trail(db_url: str):
    outbox = OutboxSender(engine_for(db_url))
    world = world_for(db_url, sms=outbox, email=outbox)  # type: ignore[arg-type]
    invoice = world.start()
    other = world.start(customer={"id": "C-9", "name": "Alan Turing", "email": "alan@example.com"})
    assert deliver(world, request_for(invoice)).status is DeliveryStatus.SENT
    assert deliver(world, request_for(invoice, Channel.EMAIL, step="friendly_reminder")).status \
        is DeliveryStatus.SENT
    assert deliver(world, request_for(other, Channel.EMAIL, step="friendly_reminder")).status \
        is DeliveryStatus.SENT
    trail_before = world.trail(invoice)

    assert world.ledger.forget(invoice.customer_id) == 2
    customer = world.ledger.customer(invoice.customer_id)
    assert customer is not None and customer.forgotten_at is not None
    assert (customer.name, customer.email, customer.phone) == ("[erased]", None, None)
    engine = engine_for(db_url)
    for message in messages_for(engine, invoice.invoice_id):
        assert message.body == "[erased]" and "Ada" not in (message.html or "")
        assert "ada@example.com" not in message.recipient and "+14155550100" not in message.recipient
    [kept] = messages_for(engine, other.invoice_id)
    assert "Alan Turing" in kept.body  # another customer's message is untouched
    assert world.trail(invoice) == trail_before

    refused = deliver(world, request_for(invoice, Channel.SMS, Channel.EMAIL, step="phone_call"))
    assert refused.status is DeliveryStatus.FAILED and "erased" in refused.detail
    assert len(messages_for(engine, invoice.invoice_id)) == 2


def test_forget_keeps_the_opt_outs_but_not_the_address_a_bounce_quoted(world: World):
    invoice = world.start()
    world.ledger.opt_out(invoice.customer_id, "email", "unreachable: SendGrid bounce: 550 <ada@example.com>")
    world.ledger.opt_out(invoice.customer_id, "sms", "replied STOP")
    world.ledger.forget(invoice.customer_id)
    with session(world.ledger.engine) as db:
        reasons = {o.channel: o.reason for o in db.exec(select(OptOut)).all()}
    assert reasons == {"email": "unreachable: [erased]", "sms": "replied STOP"}
    assert world.ledger.opted_out(invoice.customer_id, "email")  # still never emailed


# -- broken templates ------------------------------------------------------------------------------


def test_missing_template_is_broken_until_fixed(db_url: str, tmp_path: Path):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    world = world_for(db_url, renderer_for(templates))
    invoice = world.start()
    request = request_for(invoice, template="second_notice")
    error = failing(world, request)
    assert error.type == "DeliveryBroken" and error.non_retryable
    assert "second_notice" in str(error)
    assert world.rows(invoice)["sms"].status == "broken" and world.sms.calls == []

    shutil.copy(templates / "sms_reminder.j2", templates / "second_notice.j2")  # an operator fixes it
    result = deliver(world, request)  # `dunning retry`: a new activity
    assert result.status is DeliveryStatus.SENT and len(world.sms.sent) == 1


def test_a_template_still_missing_after_a_retry_is_broken_again(world: World):
    invoice = world.start()
    request = request_for(invoice, template="second_notice")
    assert failing(world, request).type == "DeliveryBroken"
    assert failing(world, request).type == "DeliveryBroken"  # `dunning retry` before the fix
    assert world.rows(invoice)["sms"].status == "broken"


# -- cost ------------------------------------------------------------------------------------------


def test_a_send_takes_at_most_two_transactions(world: World):
    invoice = world.start()
    request = request_for(invoice)
    begins: list[object] = []

    def count(connection: object) -> None:
        begins.append(connection)

    engine = engine_for(world.url)
    event.listen(engine, "begin", count)
    try:
        result = deliver(world, request)
    finally:
        event.remove(engine, "begin", count)
    assert result.status is DeliveryStatus.SENT and len(world.sms.sent) == 1
    assert 1 <= len(begins) <= 2, f"{len(begins)} transactions for one send"
    with session(engine) as db:
        assert len(db.exec(select(AuditEntry)).all()) == 1


class SlowSender(ScriptedSender):
    """A provider that takes its time (a slow API, a long TLS handshake)."""

    def send(self, message: OutgoingMessage) -> str:
        time.sleep(3.5)
        return super().send(message)


def test_a_slow_send_heartbeats_so_a_dead_worker_is_noticed_in_seconds(db_url: str):
    """A send that takes longer than a moment keeps the activity alive with heartbeats (the
    workflow's heartbeat timeout is 5 s); a quick one sends none (heartbeats are billable)."""
    beats: list[tuple[Any, ...]] = []
    slow = world_for(db_url, sms=SlowSender("sms"))
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    result = env.run(slow.acts.deliver, request_for(slow.start()))
    assert result.status is DeliveryStatus.SENT
    assert len(beats) >= 2  # every 1.5 s while the provider thinks
    beats.clear()
    quick = world_for(db_url)
    env.run(quick.acts.deliver, request_for(quick.start()))
    assert beats == []


def test_a_handoff_retried_after_a_payment_still_learns_the_agency_took_the_account(world: World):
    """The agency accepted the account, the attempt died before returning, the customer paid:
    the retry must report what happened (so the run tells the agency), not 'stopped'."""
    invoice = world.start()
    handoff = request_for(invoice, Channel.AGENCY, step="agency_handoff", template="agency_handoff",
                          purpose=Purpose.HANDOFF)
    claim = world.ledger.claim(handoff, Channel.AGENCY, guard=True)
    world.ledger.complete(handoff, claim, "sent", "agency accepted", channel=Channel.AGENCY,
                          message_id="AG-1")
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "paid"),
                                            snapshot=snapshot(5, RunState.PAID, "0.00", "1250.00"))])
    again = world.ledger.claim(handoff, Channel.AGENCY, guard=True)
    assert again.decision is Decision.DONE and again.row is not None
    assert again.row.provider_message_id == "AG-1"


def test_an_agency_post_cut_off_before_a_payment_is_finished_not_stopped(world: World):
    invoice = world.start()
    handoff = request_for(invoice, Channel.AGENCY, step="agency_handoff", template="agency_handoff",
                          purpose=Purpose.HANDOFF)
    world.ledger.claim(handoff, Channel.AGENCY, guard=True)  # the worker died mid-POST
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "paid"),
                                            snapshot=snapshot(5, RunState.PAID, "0.00", "1250.00"))])
    assert world.ledger.claim(handoff, Channel.AGENCY, guard=True).decision is Decision.RECONCILE
    email = request_for(invoice, Channel.EMAIL, step="agency_handoff", template="agency_handoff")
    assert world.ledger.claim(email, Channel.EMAIL, guard=True).decision is Decision.STOPPED


def test_an_agency_post_that_timed_out_stays_ambiguous_until_a_post_succeeds(db_url: str):
    """A read timeout may have handed the account over, and the agency cannot be asked: the row
    stays ``ambiguous`` through a re-post that fails as well, so the retry after a payment posts
    again (the agency dedupes it) and the run learns the agency holds the account."""
    world, invoice, handoff = handing_off(db_url, AmbiguousSendError("agency may have received it, no "
                                                                      "answer: ReadTimeout"),
                                          RetryableSendError("agency unreachable, nothing sent: "
                                                             "ConnectionError"))
    failing(world, handoff)
    assert world.rows(invoice)["agency"].status == "ambiguous"
    failing(world, handoff, attempt=2)
    assert world.rows(invoice)["agency"].status == "ambiguous"
    world.ledger.record(invoice, [RunRecord(event=fact(invoice, "paid"),
                                            snapshot=snapshot(5, RunState.PAID, "0.00", "1250.00"))])
    result = deliver(world, handoff, attempt=3)
    assert result.status is DeliveryStatus.SENT and result.channel is Channel.AGENCY
    reference = f"{invoice.invoice_id}/agency_handoff/agency"
    assert {message.reference for message in world.agency.calls} == {reference}  # one Idempotency-Key
    assert len(world.agency.calls) == 3 and len(world.agency.sent) == 1


def test_a_shared_message_refused_later_fails_every_invoice_it_carried(world: World):
    """One SMS carried two invoices: the carrier's refusal fails both rows. The same report
    processed again (its runs only partly told) names them again; another report changes nothing."""
    invoices = [world.start(), world.start()]
    for invoice in invoices:
        request = request_for(invoice)
        claim = world.ledger.claim(request, Channel.SMS, guard=True)
        world.ledger.complete(request, claim, "sent", "twilio accepted", channel=Channel.SMS,
                              provider="twilio", message_id="SM-shared")
    refused = world.ledger.refused_later("SM-shared", "carrier: undelivered (error 30003)")
    assert sorted(row.invoice_id for row in refused) == sorted(i.invoice_id for i in invoices)
    for invoice in invoices:
        assert world.rows(invoice)["sms"].status == "failed"
    again = world.ledger.refused_later("SM-shared", "carrier: undelivered (error 30003)")
    assert [row.id for row in again] == [row.id for row in refused]
    assert world.ledger.refused_later("SM-shared", "carrier: failed (error 30003)") == []
    assert world.ledger.refused_later("SM-unknown", "carrier: failed") == []


def test_an_erased_customer_stays_erased_when_an_invoice_arrives_again(world: World):
    invoice = world.start()
    world.ledger.forget(invoice.customer_id)
    world.start()  # the billing system sends another invoice of the same customer
    customer = world.ledger.customer(invoice.customer_id)
    assert customer is not None and customer.email is None and customer.forgotten_at is not None


def test_an_invoice_that_leaves_a_contact_detail_out_keeps_the_stored_one(world: World):
    """The billing system sends what it has: an invoice without the customer's email (or
    locale) left out of its export once erased the stored one, for every running invoice of the
    customer, and undid an operator's `customer update`."""
    first = sample_invoice("INV-A")
    first["customer"] |= {"locale": "de_DE"}
    world.ledger.upsert_customer(Invoice.model_validate(first).customer)
    second = sample_invoice("INV-B")
    del second["customer"]["email"], second["customer"]["locale"]
    second["customer"]["phone"] = "+14155550199"
    world.ledger.upsert_customer(Invoice.model_validate(second).customer)
    stored = world.ledger.customer(first["customer"]["id"])
    assert stored is not None
    assert (stored.email, stored.locale, stored.phone) == ("ada@example.com", "de_DE", "+14155550199")
