"""Edges where features meet, each once a way to break the promise: a pay link waiting for the
contact window while a signal flood asks for a fresh history, a reminder in flight when the
customer pays on a run that charges fees, a partial write-off before the next message, a
payment time without an offset, an agency that took the account although the customer's notice
failed, a bankruptcy hold while the handoff is posted, a broken promise's SMS refused, and an
SMS refused days later whose fallback email becomes the notice the handoff counts from, and an
agency that refuses the handoff document."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from activities.channels import RejectedSendError
from activities.outbox import messages_for
from models.payment import PaymentReceived
from models.policy import Channel
from models.run import RunState
from settings import ROOT, Settings
from tests.conftest import ANY_TIME, Harness, running, sample_invoice
from tests.test_escalation import HeldSender, pay_while_held, until
from tests.test_runs import Outage, agency_messages
from workflows.dunning import InvoiceDunningWorkflow


def policy(steps: str, contact: str = ANY_TIME, extra: str = "") -> str:
    """A policy file with one policy, ``p``, of these steps."""
    return f'default = "p"\n[policies.p]\nversion = 1\n{extra}steps = [\n{steps}]\n{contact}'


def closed_window(steps: str) -> str:
    """A policy whose one-hour contact window opens three hours from now (New York time)."""
    start = (datetime.now(ZoneInfo("America/New_York")).hour + 3) % 24
    end = "24:00" if start == 23 else f"{start + 1:02d}:00"
    return policy(steps, f'[defaults]\ncontact_hours = "{start:02d}:00-{end}"\nconsolidate_within = "0s"\n')


@asynccontextmanager
async def on_policy(env: WorkflowEnvironment, settings: Settings, tmp_path: Path,
                    text: str) -> AsyncIterator[Harness]:
    """A worker whose policy file is ``text``."""
    path = tmp_path / "policy.toml"
    path.write_text(text)
    async with running(env, settings.model_copy(update={"policy_file": path})) as harness:
        yield harness


EMAIL_1D = '  { name = "friendly_reminder", after_due = "1d",  channel = "email" },\n'


async def test_a_flooded_run_with_a_pay_link_waiting_for_its_window_still_ends_when_paid(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """The pay link waits in its signal handler; continuing as new waits for every handler, so
    the wait must not try it itself (it once waited for itself, and the paid run never ended)."""
    text = closed_window(EMAIL_1D + '  { name = "sms_reminder", after_due = "15d", channel = "sms" },\n')
    async with on_policy(time_env, settings, tmp_path, text) as harness:
        invoice = sample_invoice(policy="p")
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
    held = harness.senders[Channel.EMAIL] = HeldSender(then=harness.senders[Channel.EMAIL])
    invoice = sample_invoice(policy="late_payment")
    final = await pay_while_held(harness, held, timedelta(days=2), invoice)
    assert final.state is RunState.PAID
    assert final.balance_due == 0, "a run that ended paid still owes a step fee"
    assert Decimal(harness.ledger.run(invoice["invoice_id"]).balance_due) == 0


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


def agency_events(harness: Harness, invoice_id: str) -> list[str]:
    """What the agency was told about an invoice, in order."""
    return [message["event"] for message in agency_messages(harness, invoice_id)]


async def test_the_agency_hears_of_a_payment_or_cancel_after_the_handoff_notice_failed(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """The agency took the account, then the customer's notice could not be rendered (the run
    waits for an operator). A cancel or payment meanwhile must still reach the agency."""
    for close in ("cancel", "pay"):
        templates = tmp_path / close
        shutil.copytree(ROOT / "templates", templates)
        async with running(time_env, settings.model_copy(update={"templates_dir": templates})) as harness:
            invoice = sample_invoice()
            invoice_id = invoice["invoice_id"]
            handle = await harness.start(invoice)
            (templates / "agency_handoff.j2").unlink()  # the customer's notice cannot be rendered
            await harness.advance(handle, timedelta(days=62))
            assert ("agency_handoff", "agency") in harness.sent(invoice_id)
            if close == "cancel":
                await harness.dunning.cancel(invoice_id, "invoice voided")
            else:
                await harness.dunning.pay(invoice_id, "1250.00", payment_id="paid-in-full")
            final = await handle.result()
            told = agency_events(harness, invoice_id)
            assert final.state is (RunState.CANCELLED if close == "cancel" else RunState.PAID)
            assert told[0] == "account.referred"
            assert ("account.recalled" if close == "cancel" else "account.payment") in told, told


async def test_a_bankruptcy_hold_while_the_handoff_is_posted_recalls_the_account(harness: Harness):
    held = HeldSender(then=harness.senders[Channel.AGENCY])
    harness.senders[Channel.AGENCY] = held
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    forward = asyncio.create_task(harness.advance(handle, timedelta(days=61)))
    assert await asyncio.to_thread(held.in_flight.wait, 60)
    await harness.dunning.hold_customer("C-1", "bankruptcy", "chapter 7 filed", actor="ops")
    await until(lambda: any(e.status == "customer_hold" for e in harness.ledger.trail(invoice_id)))
    held.release.set()
    await until(lambda: "account.recalled" in agency_events(harness, invoice_id))
    forward.cancel()
    await asyncio.gather(forward, return_exceptions=True)
    await harness.dunning.hold_customer("C-1", "bankruptcy", "", release=True)
    await harness.dunning.cancel(invoice_id, "test over")
    assert agency_events(harness, invoice_id)[0] == "account.referred"


async def test_a_refused_broken_promise_sms_is_no_notice_before_a_handoff(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """A customer reachable by SMS only promises and does not pay; the 'broken promise' SMS and
    the first reminder are both refused by the carrier: nothing reached them, so no agency."""
    text = policy(EMAIL_1D + '  { name = "agency_handoff", after_due = "30d", channel = "agency" },\n')
    async with on_policy(time_env, settings, tmp_path, text) as harness:
        invoice = sample_invoice(policy="p")
        invoice["customer"] = {k: v for k, v in invoice["customer"].items() if k != "email"}
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        by = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()
        await harness.dunning.act(invoice_id, "promise", {"amount": "1250.00", "by": by})
        await harness.advance(handle, timedelta(days=3, hours=12))
        await until(lambda: ("broken_promise_1", "sms") in harness.sent(invoice_id))
        await harness.dunning.delivery_refused(invoice_id, "broken_promise_1", "sms")
        await until(lambda: any(e.status == "not_retried" for e in harness.ledger.trail(invoice_id)))
        await harness.advance(handle, timedelta(days=4))
        await until(lambda: ("friendly_reminder", "sms") in harness.sent(invoice_id))
        await harness.dunning.delivery_refused(invoice_id, "friendly_reminder", "sms")
        await until(lambda: sum(e.status == "not_retried" for e in harness.ledger.trail(invoice_id)) == 2)
        final = await harness.finish(handle)
        assert ("agency_handoff", "agency") not in harness.sent(invoice_id)
        assert final.state is RunState.EXHAUSTED


async def test_a_fallback_notice_moves_the_handoff_to_a_full_notice_period_after_it(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """The SMS of day 1 is reported undelivered on day 10 and the email fallback goes out then:
    the agency may have the account 14 days after the email, not on day 15 as first planned."""
    text = policy('  { name = "sms_reminder", after_due = "1d", channel = "sms", fallback = ["email"] },\n'
                  '  { name = "agency_handoff", after_due = "15d", channel = "agency" },\n',
                  extra='agency_notice = "14d"\n')
    async with on_policy(time_env, settings, tmp_path, text) as harness:
        invoice = sample_invoice(policy="p")
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=10))
        assert harness.sent(invoice_id) == [("sms_reminder", "sms")]
        await harness.dunning.delivery_refused(invoice_id, "sms_reminder", "sms")
        await until(lambda: ("sms_reminder", "email") in harness.sent(invoice_id))
        await harness.advance(handle, timedelta(days=7))  # day 17: past the first plan
        early = ("agency_handoff", "agency") in harness.sent(invoice_id)
        await harness.advance(handle, timedelta(days=8))  # day 25: 15 days after the email
        await until(lambda: ("agency_handoff", "agency") in harness.sent(invoice_id))
        await harness.dunning.cancel(invoice_id, "test over")
        assert not early, "handed off before a full notice period after the notice that reached them"


async def test_a_refusal_signal_naming_an_unknown_channel_is_recorded_not_fatal(harness: Harness):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await handle.signal("delivery_refused", args=["friendly_reminder", "fax"])
    await until(lambda: any(e.status == "rejected" and "fax" in e.detail
                            for e in harness.ledger.trail(invoice_id)))
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="p")
    final = await harness.finish(handle)
    assert final.state is RunState.PAID
    assert not [e async for e in handle.fetch_history_events()
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]


def handoff_day_20() -> str:
    """A day-20 handoff whose customer's contact window is closed now (it opens in 3 hours)."""
    return closed_window(EMAIL_1D + '  { name = "agency_handoff", after_due = "20d", channel = "agency" },\n')


async def handoff_waiting_for_the_window(harness: Harness) -> tuple[str, Any]:
    """A run whose day-20 handoff waits for the customer's contact window (nothing posted yet)."""
    invoice = sample_invoice(policy="p")
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=20, minutes=5))
    assert (await harness.dunning.status(invoice["invoice_id"])).deferred_until is not None
    return invoice["invoice_id"], handle


async def test_a_dispute_stops_a_handoff_that_waits_for_the_contact_window(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """Nothing is posted while the handoff waits for the customer's window (hours, a weekend on
    business days), so a dispute is taken then, and the account is not handed off."""
    async with on_policy(time_env, settings, tmp_path, handoff_day_20()) as harness:
        invoice_id, handle = await handoff_waiting_for_the_window(harness)
        disputed = await harness.dunning.act(invoice_id, "dispute", {"reason": "customer disputes it"})
        await harness.advance(handle, timedelta(hours=30))
        after = await harness.dunning.status(invoice_id)
        await harness.dunning.cancel(invoice_id, "test over")
        assert disputed.state is RunState.DISPUTED
        assert after.state is RunState.DISPUTED
        assert ("agency_handoff", "agency") not in harness.sent(invoice_id)


async def test_a_paid_run_with_fees_reopened_by_a_refund_owes_the_refund_only(harness: Harness):
    """A run with fees works its balance out from dated payments: the reopened run must carry
    the ones that stand, or it quotes the whole invoice and chases a customer who repaid."""
    invoice = sample_invoice(policy="late_payment")
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="pi_all")
    assert (await handle.result()).state is RunState.PAID
    reopened = await harness.dunning.reverse(invoice_id, "100.00", key="refund:r1", reason="partial refund")
    again = await harness.dunning.pay(invoice_id, "100.00", payment_id="pi_rest")
    assert reopened.state is RunState.ACTIVE
    assert reopened.balance_due == Decimal("100.00")
    assert again.status.state is RunState.PAID


async def test_an_agency_that_refuses_the_handoff_shows_failed_until_an_operator_retries(harness: Harness):
    """Posting a refused document again cannot help: the run shows ``failed`` with the agency's
    words at once (not a day of silent retries), and ``dunning retry`` hands it off once fixed."""
    agency = harness.senders[Channel.AGENCY] = Outage(harness.senders[Channel.AGENCY], RejectedSendError(
        'agency refused the request: 422 {"error": "unknown debtor country"}'))
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=61))
    failed = await harness.dunning.status(invoice_id)
    assert failed.state is RunState.FAILED and "unknown debtor country" in failed.detail
    assert agency.tries == 1 and ("agency_handoff", "email") not in harness.sent(invoice_id)
    agency.down = False
    await harness.dunning.retry(invoice_id)
    await until(lambda: ("agency_handoff", "email") in harness.sent(invoice_id))
    assert (await harness.dunning.status(invoice_id)).state is RunState.HANDED_OFF
    assert agency_events(harness, invoice_id) == ["account.referred"]
    await harness.dunning.cancel(invoice_id, "test over")


FEE_SMS = policy('  { name = "sms_reminder", after_due = "1d", channel = "sms", fallback = ["email"] },\n'
                 '  { name = "phone_call", after_due = "20d", channel = "voice" },\n',
                 extra='fees = { step_fee = "5.00", statutory = "none" }\n')


@pytest.mark.parametrize("has_email", [False, True])
async def test_the_fee_of_an_sms_never_delivered_is_taken_off_unless_its_fallback_reached_them(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path, has_email: bool):
    """Twilio accepted the SMS, so its fee was charged, then reported it undelivered: with no
    email on file nothing reached the customer and the fee comes off the total; when the email
    fallback goes out instead, the step did reach them and the fee stands."""
    async with on_policy(time_env, settings, tmp_path, FEE_SMS) as harness:
        invoice = sample_invoice(policy="p")
        if not has_email:
            invoice["customer"] = {k: v for k, v in invoice["customer"].items() if k != "email"}
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=3))
        charged = await harness.dunning.status(invoice_id)
        await harness.dunning.delivery_refused(invoice_id, "sms_reminder", "sms")
        if has_email:
            await until(lambda: ("sms_reminder", "email") in harness.sent(invoice_id))
        else:
            await until(lambda: any(e.channel == "email" and e.status == "failed"
                                    for e in harness.ledger.trail(invoice_id)))
        await harness.advance(handle, timedelta(hours=1))
        after = await harness.dunning.status(invoice_id)
        mirror = Decimal(harness.ledger.run(invoice_id).balance_due)
        trail = [e.status for e in harness.ledger.trail(invoice_id)]
        await harness.dunning.cancel(invoice_id, "test over")
    assert charged.balance_due == Decimal("1255.00")
    expected = Decimal("1255.00") if has_email else Decimal("1250.00")
    fees = expected - Decimal("1250.00")
    assert (after.balance_due, after.fees, mirror) == (expected, fees, expected), trail
    assert ("fee_waived" in trail) is not has_email, trail


# The shipped contact hours (08:00-21:00), so a message due at midnight waits for the morning.
TWO_STEPS_DAYTIME = policy(EMAIL_1D + '  { name = "sms_reminder", after_due = "25d", channel = "sms" },\n',
                           contact='[defaults]\nconsolidate_within = "0s"\n')


def _day(days: int) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).date().isoformat()


async def test_a_broken_promise_message_due_at_midnight_goes_out_in_the_morning(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """A promise runs to the end of its day, midnight where the customer is, outside the contact
    hours: the 'broken promise' message waits for the morning (it was dropped, without a word)."""
    async with on_policy(time_env, settings, tmp_path, TWO_STEPS_DAYTIME) as harness:
        invoice = sample_invoice(policy="p")
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=2))
        await harness.dunning.act(invoice_id, "promise", {"amount": "1250.00", "by": _day(4)})
        await harness.advance(handle, timedelta(days=6))
        status = await harness.dunning.status(invoice_id)
        sent = harness.sent(invoice_id)
        await harness.dunning.cancel(invoice_id, "test over")
    assert status.state is RunState.ACTIVE
    assert ("broken_promise_1", "email") in sent, sent


async def plan_reminders(env: WorkflowEnvironment, settings: Settings, tmp_path) -> tuple[set[str], int]:
    """A plan's two reminders before its first instalment, each waiting for a narrow contact
    window: the plan messages sent, and how many histories the run used."""
    text = policy(EMAIL_1D, '[defaults]\ncontact_hours = "10:00-12:00"\nconsolidate_within = "0s"\n')
    async with on_policy(env, settings, tmp_path, text) as harness:
        invoice = sample_invoice(policy="p")
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=2))
        await harness.dunning.act(invoice_id, "plan", {"instalments": [
            {"due_on": _day(10), "amount": "625.00"}, {"due_on": _day(20), "amount": "625.00"}]})
        await harness.advance(handle, timedelta(days=10))
        sent = {step for step, _ in harness.sent(invoice_id) if step.startswith("plan_")}
        runs = [e async for e in harness.client.list_workflows(f"WorkflowId = '{handle.id}'")]
        await harness.dunning.cancel(invoice_id, "test over")
    return sent, len(runs)


PLAN_REMINDERS = {"plan_1_instalment_1_remind", "plan_1_instalment_1_due"}


async def test_plan_reminders_wait_for_the_contact_window(time_env: WorkflowEnvironment,
                                                          settings: Settings, tmp_path):
    sent, _ = await plan_reminders(time_env, settings, tmp_path)
    assert sent >= PLAN_REMINDERS, sent


async def test_plan_reminders_waiting_for_the_window_survive_a_fresh_history(
        short_history_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """A run that would continue as new while a plan reminder waits for its window (the
    server suggests it after 40 events here) still sends each of them: it waits to start the
    fresh history until the message is out (the reminder was lost)."""
    sent, runs = await plan_reminders(short_history_env, settings, tmp_path)
    assert runs > 1, "the run never continued as new: the test proves nothing"
    assert sent >= PLAN_REMINDERS, sent


async def handed_off(harness: Harness) -> tuple[str, object]:
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=61))
    assert (await harness.dunning.status(invoice["invoice_id"])).state is RunState.HANDED_OFF
    return invoice["invoice_id"], handle


async def test_the_agency_is_told_of_a_part_written_off_after_the_handoff(harness: Harness):
    """The agency collects the balance of its last message: a part written off after the
    handoff reaches it, or it goes on collecting the written-off money from the customer."""
    invoice_id, _ = await handed_off(harness)
    await harness.dunning.act(invoice_id, "write-off", {"reason": "goodwill credit", "amount": "1000.00"})
    await until(lambda: len(agency_messages(harness, invoice_id)) == 2)
    told = agency_messages(harness, invoice_id)[-1]
    await harness.dunning.cancel(invoice_id, "test over")
    assert (told["event"], told["balance_due"]) == ("account.adjusted", "250.00"), told
    assert "written off: goodwill credit" in told["reason"], told


async def test_the_agency_is_told_of_a_payment_taken_back_after_the_handoff(harness: Harness):
    """A chargeback of a payment the agency was told of: it learns the money is owed again."""
    invoice_id, handle = await handed_off(harness)
    await harness.dunning.pay(invoice_id, "1000.00", payment_id="pi_after_handoff")
    await until(lambda: len(agency_messages(harness, invoice_id)) == 2)
    back = await harness.dunning.reverse(invoice_id, "1000.00", key="chargeback:du_1", reason="chargeback")
    await until(lambda: len(agency_messages(harness, invoice_id)) == 3)
    again = await harness.dunning.reverse(invoice_id, "1000.00", key="chargeback:du_1", reason="chargeback")
    await harness.advance(handle, timedelta(hours=1))
    events = [(m["event"], m["balance_due"]) for m in agency_messages(harness, invoice_id)]
    await harness.dunning.cancel(invoice_id, "test over")
    assert back.state is RunState.HANDED_OFF and again.balance_due == Decimal("1250.00")
    assert events == [("account.referred", "1250.00"), ("account.payment", "250.00"),
                      ("account.adjusted", "1250.00")], events


async def test_a_part_payment_while_the_handoff_waits_for_the_window_is_in_the_referral_only(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """Nothing is posted while the handoff waits for the customer's window: the referral, when
    it goes, quotes the balance after a payment made meanwhile, and that payment is not reported
    besides it (an agency could take it off twice)."""
    async with on_policy(time_env, settings, tmp_path, handoff_day_20()) as harness:
        invoice_id, handle = await handoff_waiting_for_the_window(harness)
        await harness.dunning.pay(invoice_id, "500.00", payment_id="pi_while_waiting")
        await harness.advance(handle, timedelta(hours=30))
        await until(lambda: bool(agency_messages(harness, invoice_id)))
        await harness.advance(handle, timedelta(hours=1))
        told = [(m["event"], m["balance_due"]) for m in agency_messages(harness, invoice_id)]
        await harness.dunning.cancel(invoice_id, "test over")
    assert told == [("account.referred", "750.00")], told


async def test_a_refusal_reported_again_later_keeps_the_fee_its_fallback_earned(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """Twilio's report processed again (the inbox retries, a second callback) after the email
    fallback reached the customer and the run moved on: the SMS step's fee stands."""
    async with on_policy(time_env, settings, tmp_path, FEE_SMS) as harness:
        invoice = sample_invoice(policy="p")
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=3))
        await harness.dunning.delivery_refused(invoice_id, "sms_reminder", "sms")
        await until(lambda: ("sms_reminder", "email") in harness.sent(invoice_id))
        await harness.advance(handle, timedelta(days=18))  # day 21: the call went out
        await until(lambda: ("phone_call", "voice") in harness.sent(invoice_id))
        await harness.dunning.delivery_refused(invoice_id, "sms_reminder", "sms")
        await until(lambda: sum(e.status == "not_retried" for e in harness.ledger.trail(invoice_id)) == 1)
        await harness.advance(handle, timedelta(hours=1))
        status = await harness.dunning.status(invoice_id)
        trail = [e.status for e in harness.ledger.trail(invoice_id)]
        await harness.dunning.cancel(invoice_id, "test over")
    assert (status.balance_due, status.fees) == (Decimal("1260.00"), Decimal("10.00")), trail
    assert "fee_waived" not in trail, trail


@pytest.mark.parametrize("how", ["write-off", "dispute upheld"])
async def test_clearing_the_principal_waives_the_fees_and_interest_with_it(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path, how: str):
    """A run written off in whole (or whose dispute is upheld in whole) owes nothing: it showed
    the step fee still owed on a closed invoice, in the status and the runs table."""
    async with on_policy(time_env, settings, tmp_path, FEE_SMS) as harness:
        invoice = sample_invoice(policy="p")
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=3))
        await harness.dunning.pay(invoice_id, "500.00", payment_id="pi_part")
        if how == "write-off":
            closed = await harness.dunning.act(invoice_id, "write-off", {"reason": "uncollectable"})
        else:
            await harness.dunning.act(invoice_id, "dispute", {"reason": "never delivered"})
            closed = await harness.dunning.act(invoice_id, "resolve", {"outcome": "upheld"})
        final = await handle.result()
        after = await harness.dunning.status(invoice_id)
        mirror = Decimal(harness.ledger.run(invoice_id).balance_due)
        trail = [(e.status, e.detail) for e in harness.ledger.trail(invoice_id)]
    assert closed.state in (RunState.WRITTEN_OFF, RunState.CANCELLED)
    for status in (closed, final, after):
        assert (status.balance_due, status.fees, status.interest) == (0, 0, 0), status
    assert mirror == 0
    assert ("fees_waived", "fees 5.00 and interest 0.00 USD waived with the principal") in trail, trail


async def test_a_write_off_above_the_unpaid_amount_says_which_amount_limits_it(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path):
    """The status shows the total with the fee (1255.00); a write-off is of the invoice's unpaid
    amount (1250.00), and the refusal says so instead of calling that 'the balance'."""
    from starter import ActionRefused

    async with on_policy(time_env, settings, tmp_path, FEE_SMS) as harness:
        invoice = sample_invoice(policy="p")
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=3))
        shown = await harness.dunning.status(invoice_id)
        with pytest.raises(ActionRefused) as refused:
            await harness.dunning.act(invoice_id, "write-off",
                                      {"reason": "x", "amount": str(shown.balance_due)})
        await harness.dunning.cancel(invoice_id, "test over")
    assert shown.balance_due == Decimal("1255.00")
    assert "more than the invoice's unpaid amount 1250.00 USD (the total with fees and interest is " \
           "1255.00" in str(refused.value), str(refused.value)
