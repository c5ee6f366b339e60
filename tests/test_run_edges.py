"""Edges where features meet, each once a way to break the promise: a pay link waiting for the
contact window while a signal flood asks for a fresh history, a reminder in flight when the
customer pays on a run that charges fees, a partial write-off before the next message, and a
payment time without an offset."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from activities.outbox import messages_for
from models.payment import PaymentReceived
from models.policy import Channel
from models.run import RunState
from settings import Settings
from tests.conftest import Harness, running, sample_invoice
from tests.test_escalation import HeldSender, until
from workflows.dunning import InvoiceDunningWorkflow


def closed_window_policy() -> str:
    """A policy whose one-hour contact window opens three hours from now (New York time)."""
    start = (datetime.now(ZoneInfo("America/New_York")).hour + 3) % 24
    end = "24:00" if start == 23 else f"{start + 1:02d}:00"
    return f'''default = "narrow"
[policies.narrow]
version = 1
contact_hours = "{start:02d}:00-{end}"
consolidate_within = "0s"
steps = [
  {{ name = "friendly_reminder", after_due = "1d",  channel = "email" }},
  {{ name = "sms_reminder",      after_due = "15d", channel = "sms" }},
]
'''


async def test_a_flooded_run_with_a_pay_link_waiting_for_its_window_still_ends_when_paid(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """The pay link waits in its signal handler; continuing as new waits for every handler, so
    the wait must not try it itself (it once waited for itself, and the paid run never ended)."""
    policy = tmp_path / "narrow.toml"
    policy.write_text(closed_window_policy())
    async with running(time_env, settings.model_copy(update={"policy_file": policy})) as harness:
        invoice = sample_invoice(policy="narrow")
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.dunning.send_pay_link(invoice_id, "CA0123456789")
        await until(lambda: any(e.status == "deferred" for e in harness.ledger.trail(invoice_id)))
        storm = PaymentReceived(payment_id="storm", amount="100.00", currency="USD",
                                paid_at=datetime.now(UTC))
        for _ in range(50):  # 5,000 copies of one payment: Temporal suggests a fresh history
            await asyncio.gather(*(handle.signal(InvoiceDunningWorkflow.payment_received, storm)  # type: ignore[arg-type]
                                   for _ in range(100)))
        await harness.dunning.pay(invoice_id, "1150.00", payment_id="rest")
        latest = harness.client.get_workflow_handle_for(InvoiceDunningWorkflow.run, handle.id)
        final = await asyncio.wait_for(latest.result(), 60)
        assert final.state is RunState.PAID
        assert final.paid == Decimal("1250.00")
        # the deferred pay link never went out: the customer had paid by the time it could
        assert messages_for(harness.ledger.engine, invoice_id) == []


async def test_no_step_fee_once_the_customer_paid_while_the_reminder_went_out(harness: Harness):
    held = HeldSender(then=harness.senders[Channel.EMAIL])
    harness.senders[Channel.EMAIL] = held
    invoice = sample_invoice(policy="late_payment")
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    forward = asyncio.create_task(harness.advance(handle, timedelta(days=2)))
    assert await asyncio.to_thread(held.in_flight.wait, 30)
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="all")
    await until(lambda: ("state", "paid", None, None) in harness.trail(invoice_id))
    held.release.set()
    final = await handle.result()
    forward.cancel()
    await asyncio.gather(forward, return_exceptions=True)
    assert final.state is RunState.PAID
    assert final.balance_due == 0, "a run that ended paid still owes a step fee"
    assert Decimal(harness.ledger.run(invoice_id).balance_due) == 0


async def test_the_message_after_a_partial_write_off_quotes_the_new_balance(harness: Harness):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))
    part = await harness.dunning.act(invoice_id, "write-off", {"reason": "goodwill", "amount": "50.00"})
    assert part.balance_due == Decimal("1200.00")
    assert Decimal(harness.ledger.run(invoice_id).balance_due) == Decimal("1200.00")
    await harness.advance(handle, timedelta(days=14))
    await until(lambda: ("sms_reminder", "sms") in harness.sent(invoice_id))
    sms = [m.body for m in messages_for(harness.ledger.engine, invoice_id) if m.channel == "sms"]
    await harness.dunning.cancel(invoice_id, "test over")
    assert "$1,200.00" in sms[0], sms[0]


async def test_a_payment_time_without_an_offset_is_taken_as_utc(harness: Harness):
    """On a run with fees the payment's time is compared with the run's clock: a naive one once
    failed every workflow task, so the run took no payment ever again."""
    invoice = sample_invoice(policy="late_payment")
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await handle.signal("payment_received", {"payment_id": "naive", "amount": "100.00",
                                             "currency": "USD", "paid_at": "2026-12-01T10:00:00"})
    await until(lambda: ("payment", "accepted", None, None) in harness.trail(invoice_id))
    status = await harness.dunning.status(invoice_id)
    failures = [e async for e in handle.fetch_history_events()
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    await harness.dunning.cancel(invoice_id, "test over")
    assert not failures
    assert status.paid == Decimal("100.00")
