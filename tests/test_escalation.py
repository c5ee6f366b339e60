"""The whole dunning story on the time-skipping server: 60 days of escalation in seconds."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from activities.channels import OutgoingMessage, PermanentSendError, Sender
from models.payment import PaymentReceived
from models.policy import Channel
from models.run import DunningStatus, RunState
from tests.conftest import Harness, sample_invoice
from workflows.dunning import InvoiceDunningWorkflow

STANDARD = [
    ("friendly_reminder", "email"),
    ("sms_reminder", "sms"),
    ("phone_call", "voice"),
    ("agency_handoff", "agency"),
    ("agency_handoff", "email"),  # the customer is told the account was referred
]


async def test_unpaid_invoice_escalates_through_every_step_to_the_agency(harness: Harness):
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=61))
    status = await handle.query(InvoiceDunningWorkflow.status)
    assert status.state is RunState.HANDED_OFF
    assert status.stage == "agency_handoff"
    assert harness.sent(invoice["invoice_id"]) == STANDARD
    final = await harness.finish(handle)
    assert final.state is RunState.HANDED_OFF
    assert final.balance_due == Decimal("1250.00")


def payment(payment_id: str, amount: str, currency: str = "USD") -> PaymentReceived:
    return PaymentReceived(payment_id=payment_id, amount=amount, currency=currency,
                           paid_at=datetime.now(UTC))


async def test_payment_before_the_first_step_sends_nothing(harness: Harness):
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    await harness.dunning.pay(invoice["invoice_id"], "1250.00", payment_id="pay-1")
    final = await harness.finish(handle)
    assert final.state is RunState.PAID
    assert final.balance_due == 0
    assert harness.sent(invoice["invoice_id"]) == []
    kinds = harness.trail(invoice["invoice_id"])
    assert ("payment", "accepted", None, None) in kinds
    assert kinds[-1] == ("state", "paid", None, None)


async def test_payment_between_steps_stops_the_escalation(harness: Harness):
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=16))
    assert harness.sent(invoice["invoice_id"]) == STANDARD[:2]
    await harness.dunning.pay(invoice["invoice_id"], "1250.00", payment_id="pay-1")
    final = await harness.finish(handle)
    assert final.state is RunState.PAID
    assert final.stage == "sms_reminder"
    assert harness.sent(invoice["invoice_id"]) == STANDARD[:2]


async def test_partial_payment_lowers_the_balance_and_escalation_goes_on(harness: Harness):
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))
    await harness.dunning.pay(invoice["invoice_id"], "250.00", payment_id="pay-1")
    await harness.advance(handle, timedelta(days=14))
    status = await harness.dunning.status(invoice["invoice_id"])
    assert status.state is RunState.ACTIVE
    assert status.balance_due == Decimal("1000.00")
    assert status.stage == "sms_reminder"
    assert status.next_step is not None and status.next_step.name == "phone_call"
    # the SMS quoted the balance left, not the original amount
    outbox = harness.ledger.deliveries(invoice["invoice_id"])
    assert [d.step for d in outbox if d.status == "sent"] == ["friendly_reminder", "sms_reminder"]
    await harness.dunning.pay(invoice["invoice_id"], "1000.00", payment_id="pay-2")
    final = await harness.finish(handle)
    assert final.state is RunState.PAID
    assert final.paid == Decimal("1250.00")
    assert harness.sent(invoice["invoice_id"]) == STANDARD[:2]


async def test_duplicate_payment_ids_count_once_and_overpayment_becomes_credit(harness: Harness):
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    await harness.dunning.pay(invoice["invoice_id"], "1000.00", payment_id="webhook-7")
    await harness.dunning.pay(invoice["invoice_id"], "1000.00", payment_id="webhook-7")
    await harness.advance(handle, timedelta(days=2))
    status = await harness.dunning.status(invoice["invoice_id"])
    assert status.paid == Decimal("1000.00")
    assert status.state is RunState.ACTIVE
    await harness.dunning.pay(invoice["invoice_id"], "300.00", payment_id="webhook-8")
    final = await harness.finish(handle)
    assert final.state is RunState.PAID
    assert final.credit == Decimal("50.00")
    statuses = [s for k, s, _, _ in harness.trail(invoice["invoice_id"]) if k == "payment"]
    assert statuses == ["accepted", "duplicate", "accepted"]


async def test_bad_payment_reaching_the_workflow_is_recorded_as_rejected(harness: Harness):
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    # bypass the client API's checks, as a misbehaving integration might
    await handle.signal(InvoiceDunningWorkflow.payment_received, payment("p-eur", "10.00", "EUR"))
    await handle.signal(InvoiceDunningWorkflow.payment_received, payment("p-neg", "-5"))
    await handle.signal(InvoiceDunningWorkflow.payment_received, payment("p-junk", "lots"))
    await harness.advance(handle, timedelta(days=2))
    status = await handle.query(InvoiceDunningWorkflow.status)
    assert status.state is RunState.ACTIVE
    assert status.paid == 0
    rejected = [s for k, s, _, _ in harness.trail(invoice["invoice_id"]) if k == "payment"]
    assert rejected == ["rejected", "rejected", "rejected"]


async def test_late_enrolment_skips_past_steps_and_sends_only_the_latest(harness: Harness):
    due = datetime.now(UTC) - timedelta(days=20)
    invoice = sample_invoice(due_at=due.isoformat())
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(hours=1))
    assert harness.sent(invoice["invoice_id"]) == [("sms_reminder", "sms")]
    trail = harness.trail(invoice["invoice_id"])
    assert ("communication", "skipped", "friendly_reminder", "email") in trail
    status = await handle.query(InvoiceDunningWorkflow.status)
    assert status.next_step is not None and status.next_step.name == "phone_call"
    assert status.next_step.at == due + timedelta(days=30)


async def test_pre_due_steps_run_before_the_due_date(harness: Harness):
    due = datetime.now(UTC) + timedelta(days=5)
    invoice = sample_invoice(due_at=due.isoformat(), policy="courteous")
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=3))
    assert harness.sent(invoice["invoice_id"]) == [("upcoming_due", "email")]
    await harness.advance(handle, timedelta(days=34))
    assert [s for s, _ in harness.sent(invoice["invoice_id"])] == [
        "upcoming_due", "friendly_reminder", "firm_reminder", "final_notice"]
    final = await harness.finish(handle)
    assert final.state is RunState.EXHAUSTED


async def test_opted_out_channel_falls_back_to_the_next_one(harness: Harness):
    invoice = sample_invoice()
    harness.ledger.opt_out("C-1", "sms", "replied STOP")
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=16))
    deliveries = {(d.step, d.channel): d.status for d in harness.ledger.deliveries(invoice["invoice_id"])}
    assert deliveries[("sms_reminder", "sms")] == "failed"
    assert deliveries[("sms_reminder", "email")] == "sent"
    await harness.dunning.cancel(invoice["invoice_id"], "voided by finance")
    final = await harness.finish(handle)
    assert final.state is RunState.CANCELLED


async def test_customer_without_phone_gets_email_for_phone_steps(harness: Harness):
    invoice = sample_invoice()
    invoice["customer"] = {**invoice["customer"], "phone": None}
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=31))
    assert harness.sent(invoice["invoice_id"]) == [
        ("friendly_reminder", "email"), ("sms_reminder", "email"), ("phone_call", "email")]
    await harness.dunning.pay(invoice["invoice_id"], "1250", payment_id="p")
    assert (await harness.finish(handle)).state is RunState.PAID


async def test_payment_after_handoff_is_recorded_and_reported_to_the_agency(harness: Harness):
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=61))
    await harness.dunning.pay(invoice["invoice_id"], "1250.00", payment_id="agency-collected")
    final = await harness.finish(handle)
    assert final.state is RunState.PAID
    assert ("payment:agency-collected", "agency") in harness.sent(invoice["invoice_id"])


async def test_operators_can_filter_runs_by_search_attributes(harness: Harness):
    invoice = sample_invoice(customer={**sample_invoice()["customer"], "id": "C-SEARCH-1"})
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))
    described = await handle.describe()
    attributes = {k.name: v for k, v in described.typed_search_attributes}
    assert attributes["DunningStage"] == "friendly_reminder"
    assert attributes["DunningState"] == "active"
    assert attributes["DunningCustomerId"] == "C-SEARCH-1"
    assert attributes["DunningCurrency"] == "USD"
    assert attributes["DunningAmountDue"] == 1250.0
    personal = {"Ada Lovelace", "ada@example.com", "+14155550100"}
    assert not personal & {str(v) for v in attributes.values()}
    await harness.dunning.pay(invoice["invoice_id"], "1250.00", payment_id="p")
    await harness.finish(handle)


async def until(condition, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds (what the run records reaches the database in moments)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


class HeldSender:
    """Holds a send in flight until the test has done its part, then sends or fails."""

    provider = "held"

    def __init__(self, then: Sender | Exception) -> None:
        self.then = then
        self.in_flight = threading.Event()
        self.release = threading.Event()

    def send(self, message: OutgoingMessage) -> str:
        self.in_flight.set()
        self.release.wait(timeout=30)
        if isinstance(self.then, Exception):
            raise self.then
        return self.then.send(message)


async def pay_while_held(harness: Harness, held: HeldSender | AnswerHeld, advance: timedelta,
                         invoice: dict[str, Any] | None = None) -> DunningStatus:
    """Run until the held send is in flight, pay in full, and release it once the run has taken
    the payment (the moment from which nothing may be sent); return the final status."""
    invoice = invoice or sample_invoice()
    handle = await harness.start(invoice)
    forward = asyncio.create_task(harness.advance(handle, advance))
    assert await asyncio.to_thread(held.in_flight.wait, 30)
    await harness.dunning.pay(invoice["invoice_id"], "1250.00", payment_id="while-sending")
    await until(lambda: ("state", "paid", None, None) in harness.trail(invoice["invoice_id"]))
    held.release.set()
    final = await handle.result()  # settled: the run ends without waiting out its timers
    forward.cancel()
    await asyncio.gather(forward, return_exceptions=True)
    return final


async def test_payment_arriving_while_a_step_is_being_sent_is_not_lost(harness: Harness):
    """The email is in flight when the payment lands: the payment counts, nothing more is sent."""
    harness.senders[Channel.EMAIL] = HeldSender(then=harness.senders[Channel.EMAIL])
    final = await pay_while_held(harness, harness.senders[Channel.EMAIL], timedelta(days=2))
    assert final.state is RunState.PAID
    assert harness.sent(final.invoice_id) == [("friendly_reminder", "email")]
    assert ("payment", "accepted", None, None) in harness.trail(final.invoice_id)


async def test_payment_during_a_refused_send_stops_the_fallback(harness: Harness):
    """SMS is refused for good while the customer pays: the email fallback is not sent."""
    harness.senders[Channel.SMS] = HeldSender(then=PermanentSendError("21614: not a mobile number"))
    final = await pay_while_held(harness, harness.senders[Channel.SMS], timedelta(days=16))
    assert final.state is RunState.PAID
    assert harness.sent(final.invoice_id) == [("friendly_reminder", "email")]


class AnswerHeld:
    """Sends the first message through ``then`` and holds its outcome (an answer or an error)
    until the test has done its part; later messages go straight through."""

    def __init__(self, then: Sender) -> None:
        self.then, self.provider, self.calls = then, then.provider, 0
        self.in_flight, self.release = threading.Event(), threading.Event()  # in flight: answered

    def send(self, message: OutgoingMessage) -> str:
        self.calls += 1
        if self.calls > 1:
            return self.then.send(message)
        try:
            return self.then.send(message)
        finally:
            self.in_flight.set()
            self.release.wait(timeout=30)

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        return self.then.find_sent(message, since)


async def test_payment_after_a_handoff_whose_answer_timed_out_is_reported(
        time_env, settings, fake_provider):
    """The agency takes the handoff POST but its answer never comes (a read timeout), and the
    customer pays before the retry: the agency may hold the account, so the handoff is posted
    again under the same Idempotency-Key (the agency keeps one) and the payment is reported."""
    from tests.conftest import running
    from tests.test_providers import live_settings

    live = live_settings(settings, fake_provider).model_copy(update={"provider_timeout_seconds": 0.5})
    fake_provider.script("/handoff", 200, {"id": "agency-late"}, delay=1.5)  # read timeout
    async with running(time_env, live) as harness:
        held = AnswerHeld(then=harness.senders[Channel.AGENCY])
        harness.senders[Channel.AGENCY] = held
        final = await pay_while_held(harness, held, timedelta(days=61))
    invoice_id = final.invoice_id
    posts = fake_provider.to("/handoff")
    events = [post.json["event"] for post in posts]
    assert final.state is RunState.PAID
    assert "account.payment" in events, f"the agency was never told of the payment: {events}"
    assert held.calls >= 2 and events[0] == "account.referred", events
    referred = [post for post in posts if post.json["event"] == "account.referred"]
    assert {post.headers["Idempotency-Key"] for post in referred} == {f"{invoice_id}/agency_handoff/agency"}
    assert {post.json["reference"] for post in referred} == {f"{invoice_id}/agency_handoff/agency"}


async def test_payments_are_accepted_while_no_worker_runs(time_env, settings, monkeypatch):
    """Billing webhooks keep working through a worker outage: the signal waits durably."""
    import pytest

    import starter
    from tests.conftest import running

    monkeypatch.setattr(starter, "QUERY_TIMEOUT", timedelta(seconds=2))
    dunning = starter.DunningClient(time_env.client, settings)
    invoice = sample_invoice()
    await dunning.start(invoice)
    await dunning.pay(invoice["invoice_id"], "1250.00", payment_id="during-outage")
    with pytest.raises(starter.PaymentRefused):
        await dunning.pay(invoice["invoice_id"], "1.00", currency="EUR")
    with pytest.raises(starter.ServerUnavailable, match="is `dunning worker` running"):
        await dunning.status(invoice["invoice_id"])
    async with running(time_env, settings) as harness:
        handle = time_env.client.get_workflow_handle_for(InvoiceDunningWorkflow.run,
                                                         f"dunning-{invoice['invoice_id']}")
        final = await harness.finish(handle)
    assert final.state is RunState.PAID
    assert harness.sent(invoice["invoice_id"]) == []
