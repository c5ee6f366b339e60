"""The database layer on SQLite and on the real PostgreSQL server, and the delivery activity's
no-duplicate guarantees across retries and crashes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlmodel import SQLModel, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import models.records  # noqa: F401  (tables on the metadata)
from activities.channels import AmbiguousSendError, OutgoingMessage, PermanentSendError, RetryableSendError
from activities.delivery import DeliveryActivities
from activities.ledger import Ledger, communication
from activities.outbox import OutboxSender
from activities.rendering import Renderer
from models.audit import AuditEvent, AuditKind
from models.database import check_schema, engine_for, migrate, session
from models.delivery import DeliveryRequest, DeliveryStatus
from models.invoice import Invoice
from models.policy import Channel
from models.records import OutboxMessage
from settings import ROOT
from tests.conftest import sample_invoice

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_available() -> str | None:
    try:
        with create_engine(POSTGRES, connect_args={"connect_timeout": 3}).connect() as c:
            c.execute(text("select 1"))
        return None
    except Exception as exc:
        return f"no PostgreSQL answers at 127.0.0.1:5432 ({exc.__class__.__name__})"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A freshly migrated database: a SQLite file, or a private schema on the real PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        migrate(url)
        yield url
        return
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    schema = f"dunning_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"create schema {schema}"))
    url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    try:
        migrate(url)
        yield url
    finally:
        engine_for(url).dispose()
        with admin.connect() as c:
            c.execute(text(f"drop schema {schema} cascade"))
        admin.dispose()


def request_for(channel: Channel = Channel.SMS, step: str = "sms_reminder", **invoice) -> DeliveryRequest:
    parsed = Invoice.model_validate(sample_invoice(**invoice))
    return DeliveryRequest(workflow_id=parsed.workflow_id, invoice=parsed, step=step,
                           template=step, channel=channel, balance_due=parsed.amount_due,
                           as_of=datetime.now(UTC))


def test_migrations_match_the_models(db_url: str):
    check_schema(db_url)  # at head
    with engine_for(db_url).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                SQLModel.metadata)
    assert diff == []


def test_claim_is_one_row_per_invoice_step_channel(db_url: str):
    ledger = Ledger(engine_for(db_url))
    request = request_for()
    first, created = ledger.claim(request)
    second, created_again = ledger.claim(request)
    assert created and not created_again
    assert first.id == second.id
    other, created_other = ledger.claim(request.model_copy(update={"channel": Channel.EMAIL}))
    assert created_other and other.id != first.id


def test_audit_entries_are_recorded_once_per_key_and_keep_utc(db_url: str):
    ledger = Ledger(engine_for(db_url))
    at = datetime(2026, 11, 1, 9, 0, tzinfo=timezone(timedelta(hours=-5)))
    event = AuditEvent(key=f"k-{uuid.uuid4()}", workflow_id="dunning-X", invoice_id="INV-X", at=at,
                       kind=AuditKind.PAYMENT, status="accepted", detail="paid 10.00 USD")
    assert ledger.record(event) is True
    assert ledger.record(event) is False  # a retried activity
    [entry] = ledger.trail("INV-X")
    assert entry.at == at and entry.at.tzinfo is not None
    assert entry.detail == "paid 10.00 USD"


def test_outbox_keeps_one_message_per_reference(db_url: str):
    engine = engine_for(db_url)
    outbox = OutboxSender(engine)
    message = OutgoingMessage(channel=Channel.SMS, recipient="+14155550100", body="hello",
                              reference="INV-O/sms_reminder/sms")
    assert outbox.send(message) == outbox.send(message)
    with session(engine) as db:
        assert len(db.exec(select(OutboxMessage)).all()) == 1


class ScriptedSender:
    """A sender whose outcomes the test scripts; counts what actually went out."""

    provider = "scripted"

    def __init__(self, *outcomes: Exception | str) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[OutgoingMessage] = []

    def send(self, message: OutgoingMessage) -> str:
        outcome = self.outcomes.pop(0) if self.outcomes else "msg-ok"
        if isinstance(outcome, Exception):
            raise outcome
        self.sent.append(message)
        return outcome


def activities_with(db_url: str, sender: ScriptedSender) -> DeliveryActivities:
    renderer = Renderer(templates_dir=ROOT / "templates", company="Example Billing",
                        email_from="billing@example.com")
    return DeliveryActivities(Ledger(engine_for(db_url)), dict.fromkeys(Channel, sender), renderer)


def test_retry_after_success_sends_nothing(db_url: str):
    sender = ScriptedSender("SM1")
    acts = activities_with(db_url, sender)
    request = request_for()
    first = ActivityEnvironment().run(acts.deliver, request)
    again = ActivityEnvironment().run(acts.deliver, request)
    assert first.status is DeliveryStatus.SENT and first.provider_message_id == "SM1"
    assert again.repeated and again.provider_message_id == "SM1"
    assert len(sender.sent) == 1


def test_retryable_failure_is_recorded_then_sent_once(db_url: str):
    sender = ScriptedSender(RetryableSendError("429 too many requests", status=429), "SM2")
    acts = activities_with(db_url, sender)
    request = request_for()
    with pytest.raises(ApplicationError) as raised:
        ActivityEnvironment().run(acts.deliver, request)
    assert raised.value.type == "ProviderUnavailable" and not raised.value.non_retryable
    result = ActivityEnvironment().run(acts.deliver, request)
    assert result.status is DeliveryStatus.SENT and len(sender.sent) == 1
    statuses = [e.status for e in acts.ledger.trail(request.invoice.invoice_id)]
    assert statuses == ["retrying", "sent"]


def test_permanent_failure_is_non_retryable_and_stays_failed(db_url: str):
    sender = ScriptedSender(PermanentSendError("21610: recipient replied STOP", opted_out=True))
    acts = activities_with(db_url, sender)
    request = request_for()
    for _ in range(2):  # a second attempt finds the failure in the ledger
        with pytest.raises(ApplicationError) as raised:
            ActivityEnvironment().run(acts.deliver, request)
        assert raised.value.type == "DeliveryRejected" and raised.value.non_retryable
    assert acts.ledger.opted_out(request.invoice.customer.id, "sms")
    assert sender.sent == []


def test_sms_whose_earlier_attempt_died_mid_call_is_not_resent(db_url: str):
    sender = ScriptedSender()
    acts = activities_with(db_url, sender)
    request = request_for()
    acts.ledger.claim(request)  # an attempt claimed the row, then the worker died
    result = ActivityEnvironment().run(acts.deliver, request)
    assert result.status is DeliveryStatus.UNKNOWN
    assert sender.sent == []


def test_email_whose_earlier_attempt_died_mid_call_is_sent(db_url: str):
    sender = ScriptedSender("EM1")
    acts = activities_with(db_url, sender)
    request = request_for(Channel.EMAIL, "friendly_reminder")
    acts.ledger.claim(request)
    result = ActivityEnvironment().run(acts.deliver, request)
    assert result.status is DeliveryStatus.SENT and len(sender.sent) == 1


def test_sms_timeout_after_sending_is_unknown_not_retried(db_url: str):
    sender = ScriptedSender(AmbiguousSendError("read timed out"))
    acts = activities_with(db_url, sender)
    request = request_for()
    result = ActivityEnvironment().run(acts.deliver, request)
    assert result.status is DeliveryStatus.UNKNOWN
    again = ActivityEnvironment().run(acts.deliver, request)
    assert again.repeated and sender.sent == []


def test_communication_keys_differ_per_outcome():
    request = request_for()
    keys = {communication(request, status, "x").key for status in ("sent", "failed", "retrying")}
    assert len(keys) == 3


def test_money_is_never_stored_as_float(db_url: str):
    ledger = Ledger(engine_for(db_url))
    event = AuditEvent(key=f"m-{uuid.uuid4()}", workflow_id="w", invoice_id="INV-M",
                       at=datetime.now(UTC), kind=AuditKind.PAYMENT, status="accepted",
                       detail=f"paid {Decimal('0.10') + Decimal('0.20')} USD")
    ledger.record(event)
    assert ledger.trail("INV-M")[0].detail == "paid 0.30 USD"
