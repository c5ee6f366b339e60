"""The edges of a run on the time-skipping server: races with payments, cancellations and the
handoff, the agency notice rule, operator recovery, long histories, and what Temporal stores."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.channels import OutgoingMessage, RetryableSendError
from activities.outbox import messages_for
from codec import data_converter
from models.payment import PaymentReceived
from models.policy import Channel
from models.run import RunState
from settings import ROOT, Settings
from tests.conftest import Harness, running, sample_invoice
from tests.test_escalation import HeldSender, pay_while_held, until
from workflows.dunning import InvoiceDunningWorkflow

PERSONAL = ("Ada Lovelace", "ada@example.com", "+14155550100", "4155550100")


def agency_messages(harness: Harness, invoice_id: str) -> list[dict[str, Any]]:
    from activities.outbox import messages_for

    return [json.loads(m.body) for m in messages_for(harness.ledger.engine, invoice_id)
            if m.channel == "agency"]


class Outage:
    """A provider that refuses every send (503, or ``error``) until it is restored."""

    provider = "down"

    def __init__(self, then: Any, error: Exception | None = None) -> None:
        self.then, self.down, self.tries = then, True, 0
        self.error = error or RetryableSendError("503 service unavailable", status=503)

    def send(self, message: OutgoingMessage) -> str:
        self.tries += 1
        if self.down:
            raise self.error
        return self.then.send(message)

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        return self.then.find_sent(message, since)


async def test_payment_during_the_handoff_wins_and_the_agency_is_told(harness: Harness):
    """The agency accepts the account while the customer pays: no 'referred' notice goes to the
    customer, the run ends paid, and the agency gets the payment with its amount."""
    held = harness.senders[Channel.AGENCY] = HeldSender(then=harness.senders[Channel.AGENCY])
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    final = await pay_while_held(harness, held, timedelta(days=61), invoice)
    assert final.state is RunState.PAID
    sent = harness.sent(invoice_id)
    assert ("agency_handoff", "email") not in sent  # no "referred to collections" notice
    events = [m["event"] for m in agency_messages(harness, invoice_id)]
    assert events == ["account.referred", "account.payment"]
    report = agency_messages(harness, invoice_id)[1]
    assert report["payment"]["amount"] == "1250.00" and report["balance_due"] == "0.00"
    states = [s for k, s, _, _ in harness.trail(invoice_id) if k == "state"]
    assert "handed_off" not in states and states[-1] == "paid"


async def test_cancel_stops_a_delivery_that_is_retrying(harness: Harness):
    """SMS provider down; the run is cancelled meanwhile: the retries stop, and nothing goes out
    after the provider recovers."""
    outage = Outage(then=harness.senders[Channel.SMS])
    harness.senders[Channel.SMS] = outage
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    forward = asyncio.create_task(harness.advance(handle, timedelta(days=15, hours=1)))
    await until(lambda: outage.tries >= 2)
    await harness.dunning.cancel(invoice_id, "written off by finance")
    final = await handle.result()
    forward.cancel()
    tries = outage.tries
    outage.down = False
    await asyncio.sleep(3)  # a retry that survived the cancel would send now
    assert final.state is RunState.CANCELLED
    assert outage.tries == tries
    assert harness.sent(invoice_id) == [("friendly_reminder", "email")]


async def test_a_payment_while_the_final_state_is_recorded_is_not_abandoned(harness: Harness):
    """The run is writing 'exhausted' when a payment lands: it is processed before the run ends."""
    invoice = sample_invoice(policy="courteous")
    invoice_id = invoice["invoice_id"]
    original = harness.ledger.record
    writing, release = threading.Event(), threading.Event()

    def slow_record(run_invoice: Any, records: Any) -> None:
        records = tuple(records)
        if any(r.event.status == "exhausted" for r in records):
            writing.set()
            release.wait(timeout=30)
        original(run_invoice, records)

    harness.ledger.record = slow_record  # type: ignore[method-assign]
    handle = await harness.start(invoice)
    forward = asyncio.create_task(harness.finish(handle))
    assert await asyncio.to_thread(writing.wait, 60)
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="at-the-end")
    await asyncio.sleep(0.5)
    release.set()
    final = await forward
    assert final.state is RunState.PAID and final.paid == Decimal("1250.00")
    states = [s for k, s, _, _ in harness.trail(invoice_id) if k in ("state", "payment")]
    assert states[-3:] == ["exhausted", "accepted", "paid"]


async def test_late_enrolment_past_the_last_step_warns_before_the_agency(harness: Harness):
    """Enrolled 70 days late: the latest customer step goes out at once, and the handoff waits
    the policy's 14-day notice after it (status shows the real handoff time)."""
    due = datetime.now(UTC) - timedelta(days=70)
    invoice = sample_invoice(due_at=due.isoformat())
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(hours=1))
    assert harness.sent(invoice_id) == [("phone_call", "voice")]
    status = await harness.dunning.status(invoice_id)
    assert status.state is RunState.ACTIVE and status.next_step is not None
    assert status.next_step.name == "agency_handoff"
    assert status.next_step.at >= datetime.now(UTC) + timedelta(days=13, hours=23)
    await harness.advance(handle, timedelta(days=13))
    assert not [s for s in harness.sent(invoice_id) if s[1] == "agency"]
    await harness.advance(handle, timedelta(days=2))
    assert ("agency_handoff", "agency") in harness.sent(invoice_id)
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="p")
    await harness.finish(handle)


async def test_no_handoff_when_no_message_ever_reached_the_customer(harness: Harness):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    for channel in ("email", "sms", "voice"):
        harness.ledger.opt_out("C-1", channel, "asked us to stop")
    handle = await harness.start(invoice)
    final = await harness.finish(handle)
    assert final.state is RunState.EXHAUSTED
    assert harness.sent(invoice_id) == []
    assert ("state", "exhausted", None, None) in harness.trail(invoice_id)
    assert not agency_messages(harness, invoice_id)


async def test_cancel_after_the_handoff_recalls_the_account(harness: Harness):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=61))
    await harness.dunning.cancel(invoice_id, "invoice voided")
    final = await handle.result()
    assert final.state is RunState.CANCELLED
    recall = agency_messages(harness, invoice_id)[-1]
    assert recall["event"] == "account.recalled" and recall["reason"] == "invoice voided"


async def test_payments_after_the_run_ended_are_recorded_and_reported(harness: Harness):
    """After the run closed with the agency holding the account, a payment is still recorded and
    reported; a payment for an invoice with no run is kept as unmatched."""
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    assert (await harness.finish(handle)).state is RunState.HANDED_OFF
    result = await harness.dunning.pay(invoice_id, "1000.00", payment_id="late-1")
    assert result.outcome == "after_close"
    await until(lambda: ("payment:late-1", "agency") in harness.sent(invoice_id))
    report = agency_messages(harness, invoice_id)[-1]
    assert report["payment"]["payment_id"] == "late-1" and report["balance_due"] == "250.00"
    assert ("payment", "after_close", None, None) in harness.trail(invoice_id)
    after = await harness.dunning.status(invoice_id)  # the ended run, with what came after it
    assert (after.state, after.paid, after.balance_due) == (RunState.HANDED_OFF, Decimal("1000.00"),
                                                            Decimal("250.00"))
    again = await harness.dunning.pay(invoice_id, "1000.00", payment_id="late-1")
    assert again.outcome == "duplicate"  # and counted once
    assert (await harness.dunning.status(invoice_id)).balance_due == Decimal("250.00")
    await harness.dunning.pay(invoice_id, "250.00", payment_id="late-2")
    await until(lambda: ("payment:late-2", "agency") in harness.sent(invoice_id))
    assert agency_messages(harness, invoice_id)[-1]["balance_due"] == "0.00"  # what is still owed
    assert (await harness.dunning.status(invoice_id)).balance_due == 0
    assert [s for s in harness.sent(invoice_id) if s[0] == "payment:late-1"] == [
        ("payment:late-1", "agency")]

    stray = await harness.dunning.pay("INV-NOBODY-KNOWS", "99.00", currency="USD", payment_id="s1")
    assert stray.outcome == "unmatched"
    assert [(p.invoice_id, p.amount) for p in harness.dunning.unmatched()] == [("INV-NOBODY-KNOWS", "99.00")]


async def test_a_payment_the_run_counted_repeated_after_it_ended_is_a_duplicate(harness: Harness):
    """The run counted the payment and ended paid; the same payment again (a webhook resent) is
    a duplicate, not a second payment kept after the run ended."""
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="all")
    assert (await handle.result()).state is RunState.PAID
    again = await harness.dunning.pay(invoice_id, "1250.00", payment_id="all")
    assert again.outcome == "duplicate"
    assert harness.ledger.payments(invoice_id=invoice_id) == []
    assert (await harness.dunning.status(invoice_id)).paid == Decimal("1250.00")


async def test_a_payment_kept_as_unmatched_goes_to_the_run_when_it_starts(harness: Harness):
    """The customer paid before the invoice was enrolled: the payment was kept as unmatched, and
    the run that starts later counts it (it chased a customer who had paid, by phone). One in
    another currency stays on the list for an operator."""
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    assert (await harness.dunning.pay(invoice_id, "1250.00", currency="USD", payment_id="early")).outcome \
        == "unmatched"
    await harness.dunning.pay(invoice_id, "10.00", currency="EUR", payment_id="euros")
    started = await harness.dunning.start(invoice)
    assert started.started and "1250.00 USD (early)" in started.detail, started.detail
    handle = harness.client.get_workflow_handle_for(InvoiceDunningWorkflow.run, started.workflow_id)
    final = await handle.result()
    assert final.state is RunState.PAID and messages_for(harness.ledger.engine, invoice_id) == []
    assert [p.payment_id for p in harness.dunning.unmatched()] == ["euros"]
    again = await harness.dunning.start(invoice)  # the run has ended: nothing more to take
    assert not again.started and "took" not in again.detail


async def test_a_late_payment_retried_after_a_failure_part_way_is_counted_once(
        harness: Harness, monkeypatch: pytest.MonkeyPatch):
    """The payment was kept, then the run could not be read (the server went away): the billing
    system's retry still lowers the balance, records the trail entry and reports it to the agency;
    a further repeat counts it no more."""
    from starter import DunningClient, ServerUnavailable

    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    assert (await harness.finish(handle)).state is RunState.HANDED_OFF
    real_read = DunningClient._with_late_payments

    async def unreachable(self: DunningClient, invoice_id: str, final: Any) -> Any:
        raise ServerUnavailable("Temporal server at 127.0.0.1:7233: unavailable")

    monkeypatch.setattr(DunningClient, "_with_late_payments", unreachable)
    with pytest.raises(ServerUnavailable):
        await harness.dunning.pay(invoice_id, "1000.00", payment_id="late-retried")
    monkeypatch.setattr(DunningClient, "_with_late_payments", real_read)
    retried = await harness.dunning.pay(invoice_id, "1000.00", payment_id="late-retried")
    assert retried.outcome == "after_close"  # the retry finished the recording
    repeated = await harness.dunning.pay(invoice_id, "1000.00", payment_id="late-retried")
    assert repeated.outcome == "duplicate"
    await until(lambda: ("payment:late-retried", "agency") in harness.sent(invoice_id))
    assert agency_messages(harness, invoice_id)[-1]["balance_due"] == "250.00"
    assert [s for k, s, _, _ in harness.trail(invoice_id) if k == "payment"] == ["after_close"]
    mirror = harness.ledger.run(invoice_id)
    assert mirror is not None and (mirror.balance_due, mirror.paid) == ("250.00", "1000.00")


async def test_unreadable_payment_signals_are_recorded_as_rejected(harness: Harness):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    paid_at = datetime.now(UTC).isoformat()
    await handle.signal("payment_received", {"payment_id": "num", "amount": 100, "currency": "USD",
                                             "paid_at": paid_at})
    await handle.signal("payment_received", {"payment_id": "x" * 300, "amount": "5",
                                             "currency": "USD", "paid_at": paid_at})
    await handle.signal("payment_received", "not a payment")
    await until(lambda: len([k for k, *_ in harness.trail(invoice_id) if k == "payment"]) == 3)
    status = await harness.dunning.status(invoice_id)
    assert status.paid == Decimal("100.00")  # the number was read, not dropped
    outcomes = [s for k, s, _, _ in harness.trail(invoice_id) if k == "payment"]
    assert sorted(outcomes) == ["accepted", "rejected", "rejected"]
    await harness.dunning.pay(invoice_id, "1150.00", payment_id="rest")
    assert (await harness.finish(handle)).state is RunState.PAID


async def test_a_delivery_outage_longer_than_a_step_skips_the_stale_step(
        time_env: WorkflowEnvironment, settings: Settings):
    """The SMS provider is down past the call's time: the SMS gives up at the call's time (not
    sent late, right before the call), the run re-plans and the call goes out on time."""
    settings = settings.model_copy(update={"policy_file": ROOT / "policies" / "demo.toml"})
    async with running(time_env, settings) as harness:
        outage = Outage(then=harness.senders[Channel.SMS])
        harness.senders[Channel.SMS] = outage
        invoice = sample_invoice(policy="demo")
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(seconds=31))
        await until(lambda: ("phone_call", "voice") in harness.sent(invoice_id))
        outage.down = False
        sent = harness.sent(invoice_id)
        assert outage.tries >= 3
        assert ("sms_reminder", "sms") not in sent and ("phone_call", "voice") in sent
        assert ("communication", "skipped", "sms_reminder", "sms") in harness.trail(invoice_id)
        await harness.dunning.pay(invoice_id, "1250.00", payment_id="p")
        await harness.finish(handle)


async def test_a_broken_template_fails_the_run_visibly_until_an_operator_retries(
        time_env: WorkflowEnvironment, settings: Settings, tmp_path: Path):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    settings = settings.model_copy(update={"templates_dir": templates})
    async with running(time_env, settings) as harness:
        invoice = sample_invoice()
        invoice_id = invoice["invoice_id"]
        handle = await harness.start(invoice)
        saved = (templates / "sms_reminder.j2").read_text()
        (templates / "sms_reminder.j2").unlink()
        await harness.advance(handle, timedelta(days=16))
        status = await harness.dunning.status(invoice_id)
        assert status.state is RunState.FAILED and "sms_reminder" in status.detail
        described = await handle.describe()
        assert {k.name: v for k, v in described.typed_search_attributes}["DunningState"] == "failed"
        (templates / "sms_reminder.j2").write_text(saved)
        await harness.dunning.retry(invoice_id)
        await until(lambda: ("sms_reminder", "sms") in harness.sent(invoice_id))
        assert (await harness.dunning.status(invoice_id)).state is RunState.ACTIVE
        await harness.dunning.pay(invoice_id, "1250.00", payment_id="p")
        assert (await harness.finish(handle)).state is RunState.PAID


async def test_a_corrected_phone_number_reaches_a_run_in_flight(harness: Harness):
    from activities.outbox import messages_for

    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))
    harness.dunning.update_customer({**invoice["customer"], "phone": "+14155550199"})
    await harness.advance(handle, timedelta(days=14))
    sms = [m for m in messages_for(harness.ledger.engine, invoice_id) if m.channel == "sms"]
    assert [m.recipient for m in sms] == ["+14155550199"]
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="p")
    await harness.finish(handle)


async def test_thousands_of_duplicate_payment_signals_leave_the_run_working(harness: Harness):
    """A webhook storm: 5,000 copies of one payment. The run continues as new when its history
    grows, counts the payment once, records one duplicate, and still takes the final payment."""
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    payment = PaymentReceived(payment_id="storm", amount="100.00", currency="USD",
                              paid_at=datetime.now(UTC))
    for _batch in range(50):
        await asyncio.gather(*(handle.signal(InvoiceDunningWorkflow.payment_received, payment)  # type: ignore[arg-type]
                               for _ in range(100)))
    latest = harness.client.get_workflow_handle(handle.id)
    deadline = asyncio.get_running_loop().time() + 120
    while (await latest.describe()).run_id == handle.result_run_id:  # it works through the flood
        assert asyncio.get_running_loop().time() < deadline, "the run never continued as new"
        await asyncio.sleep(0.5)
    status = await harness.dunning.status(invoice_id)
    assert status.state is RunState.ACTIVE and status.paid == Decimal("100.00")
    outcomes = [s for k, s, _, _ in harness.trail(invoice_id) if k == "payment"]
    assert outcomes == ["accepted", "duplicate"]
    await harness.dunning.pay(invoice_id, "1150.00", payment_id="rest")
    final = await harness.client.get_workflow_handle_for(InvoiceDunningWorkflow.run, handle.id).result()
    assert final.state is RunState.PAID and final.paid == Decimal("1250.00")


def _history_text(history_json: str, *, search_attributes: bool = True) -> str:
    """Everything a history holds, with every base64 payload decoded, as one string.

    ``search_attributes=False`` leaves them out: they are never encrypted (Temporal indexes them)
    and by design hold the balance, state and customer id an operator filters on."""
    parts = [history_json] if search_attributes else []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "searchAttributes" and not search_attributes:
                    continue
                if key in ("data", "details", "encoding") and isinstance(value, str):
                    with contextlib.suppress(ValueError):
                        parts.append(base64.b64decode(value).decode("utf-8", "replace"))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(history_json))
    return "\n".join(parts)


async def _story(harness: Harness, invoice: dict[str, Any], *, search_attributes: bool = True) -> str:
    """A run with every kind of event: steps, a refusal, payments, a handoff, a late payment."""
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))
    await harness.dunning.pay(invoice_id, "50.00", payment_id="part")
    await handle.signal("payment_received", {"payment_id": "bad", "amount": "lots",
                                             "currency": "USD", "paid_at": "2026-01-01T00:00:00Z"})
    await harness.advance(handle, timedelta(days=60))
    rest = Decimal(invoice["amount_due"]) - Decimal("50.00")
    await harness.dunning.pay(invoice_id, str(rest), payment_id="rest")
    await harness.finish(handle)
    history = await harness.client.get_workflow_handle(handle.id).fetch_history()
    return _history_text(history.to_json(), search_attributes=search_attributes)


async def test_no_personal_data_in_temporal_histories(harness: Harness):
    invoice = sample_invoice()
    text = await _story(harness, invoice)
    assert invoice["invoice_id"] in text  # the scan does read the payloads
    for personal in PERSONAL:
        assert personal not in text


async def test_with_payload_keys_amounts_and_failures_are_encrypted_too(
        time_env: WorkflowEnvironment, settings: Settings):
    keys = "k1:" + base64.b64encode(b"k" * 32).decode()
    settings = settings.model_copy(update={"payload_keys": keys})
    plain = time_env.client
    encrypted = Client(plain.service_client, namespace=plain.namespace,
                       data_converter=data_converter(keys))

    class KeyedEnv:  # the time-skipping environment, seen through the encrypting client
        client = encrypted

        async def fast_forward(self, handle: Any, duration: Any = None) -> Any:
            return await time_env.fast_forward(plain.get_workflow_handle(handle.id), duration)

    async with running(KeyedEnv(), settings) as harness:  # type: ignore[arg-type]
        invoice = sample_invoice(amount_due="4321.09")
        text = await _story(harness, invoice, search_attributes=False)
    assert "binary/encrypted" in text  # the payloads were encrypted, not just absent
    for secret in (*PERSONAL, "4321.09", "billing.example.com/pay"):
        assert secret not in text
    final = await encrypted.get_workflow_handle_for(InvoiceDunningWorkflow.run,
                                                    f"dunning-{invoice['invoice_id']}").result()
    assert final.state is RunState.PAID
    # The key the run was written with taken out of the settings: one line naming the missing
    # key and the setting, the documented exit code, no traceback.
    from tests.test_cli import dunning

    other = "k2:" + base64.b64encode(b"j" * 32).decode()
    env = {**os.environ, "DUNNING_PAYLOAD_KEYS": other, "DUNNING_DATABASE_URL": settings.database(),
           "DUNNING_TEMPORAL_ADDRESS": plain.service_client.config.target_host,
           "DUNNING_TASK_QUEUE": settings.task_queue}
    result = await asyncio.to_thread(dunning, env, "status", invoice["invoice_id"])
    assert result.returncode == 1, result.stderr
    assert "cannot read the run: payload was encrypted with key id 'k1', which is not in " \
           "DUNNING_PAYLOAD_KEYS" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("count", [1])
def test_history_scan_finds_what_is_there(count: int):
    """The scanner itself works: a payload holding a name is found after base64 decoding."""
    encoded = base64.b64encode(b'{"name": "Ada Lovelace"}').decode()
    assert "Ada Lovelace" in _history_text(json.dumps({"events": [{"data": encoded}]}))


class SlowSender:
    """A provider that takes longer than the deliveries' 5 s heartbeat timeout to answer."""

    provider = "slow"

    def __init__(self, then: Any, seconds: float) -> None:
        self.then, self.seconds, self.calls = then, seconds, 0

    def send(self, message: OutgoingMessage) -> str:
        self.calls += 1
        threading.Event().wait(self.seconds)
        return self.then.send(message)

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        return self.then.find_sent(message, since)


async def test_a_send_slower_than_the_heartbeat_timeout_is_kept_alive(harness: Harness):
    """The worker heartbeats a slow send, so the server does not take it for a dead worker's
    and retry it (which would look the message up, or send an email twice)."""
    slow = SlowSender(harness.senders[Channel.EMAIL], seconds=7)
    harness.senders[Channel.EMAIL] = slow
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    forward = asyncio.create_task(harness.advance(handle, timedelta(days=2)))
    await until(lambda: ("friendly_reminder", "email") in harness.sent(invoice_id), timeout=30)
    forward.cancel()
    [row] = [d for d in harness.ledger.deliveries(invoice_id) if d.channel == "email"]
    assert (slow.calls, row.attempts, row.status) == (1, 1, "sent")
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="p")
    await harness.finish(handle)
