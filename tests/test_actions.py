"""Actions on a run through the time-skipping server: pause, resume, dispute, resolve, promise,
plan, write-off, escalate and pay as Updates, each accepted or refused with its reason.

The standard policy: email at day 1, SMS at day 15, call at day 30, agency at day 60.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType

from models.run import RunState
from starter import ActionRefused
from tests.conftest import Harness, sample_invoice
from tests.test_escalation import until


def day(n: int) -> str:
    """An ISO date ``n`` days from now (the run's clock starts at the real clock)."""
    return (datetime.now(UTC) + timedelta(days=n)).date().isoformat()


async def started(harness: Harness, **changes: Any) -> tuple[Any, str]:
    invoice = sample_invoice(**changes)
    return await harness.start(invoice), invoice["invoice_id"]


def actions(harness: Harness, invoice_id: str) -> list[str]:
    return [status for kind, status, _, _ in harness.trail(invoice_id) if kind == "action"]


def states(harness: Harness, invoice_id: str) -> list[str]:
    return [status for kind, status, _, _ in harness.trail(invoice_id) if kind == "state"]


async def test_a_plan_for_the_total_with_fees_is_taken_and_kept_without_wedging_the_run(harness: Harness):
    """A run with fees and interest: a plan may cover the total the customer is shown (it had to
    equal the invoice alone), and once every instalment is met the run goes on for what is left
    (it failed every workflow task from then on)."""
    start = datetime.now(UTC)
    handle, invoice_id = await started(harness, policy="late_payment", currency="EUR", amount_due="1000.00",
                                       due_on=start.date().isoformat(), due_at=start.isoformat(),
                                       issued_on="2026-01-01",
                                       customer={**sample_invoice()["customer"], "country": "DE",
                                                 "type": "business", "timezone": "Europe/Berlin"})
    await harness.advance(handle, timedelta(days=10))
    total = (await harness.dunning.status(invoice_id)).balance_due
    assert total > Decimal("1045.00")  # compensation 40, a 5.00 fee, interest
    with pytest.raises(ActionRefused, match=r"must cover the invoice's 1000\.00 EUR and at most"):
        await harness.dunning.act(invoice_id, "plan", {"instalments": [
            {"due_on": day(20), "amount": "999.00"}]})
    # the total as the status showed it (interest has accrued since its moment): taken
    planned = await harness.dunning.act(invoice_id, "plan", {"instalments": [
        {"due_on": day(20), "amount": str(total)}]})
    assert planned.state is RunState.ON_PLAN
    await harness.advance(handle, timedelta(days=9))
    when = (await harness.dunning.status(invoice_id)).as_of  # the run's clock (time is skipped)
    await harness.dunning.pay(invoice_id, str(total), payment_id="plan-all", paid_at=when)
    await harness.advance(handle, timedelta(days=15))  # past the instalment's check
    after = await harness.dunning.status(invoice_id)
    failed = [e async for e in handle.fetch_history_events()
              if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert failed == []
    details = [e.detail for e in harness.ledger.trail(invoice_id)]
    assert after.state is RunState.ACTIVE and any("the payment plan ended" in d for d in details), after
    assert Decimal(0) < after.balance_due < Decimal("10.00")


async def test_a_pause_stops_contact_and_shifts_the_schedule(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    assert harness.sent(invoice_id) == [("friendly_reminder", "email")]
    paused = await harness.dunning.act(invoice_id, "pause", {"reason": "customer on holiday"},
                                      actor="ops:kim")
    assert paused.state is RunState.PAUSED and paused.hold is not None
    assert paused.next_step is None
    await harness.advance(handle, timedelta(days=20))  # day 22: the SMS (day 15) stays unsent
    assert harness.sent(invoice_id) == [("friendly_reminder", "email")]
    resumed = await harness.dunning.act(invoice_id, "resume", {}, actor="ops:kim")
    assert resumed.state is RunState.ACTIVE and resumed.next_step is not None
    # paused for 20 days: the SMS moves from day 15 to day 35
    assert resumed.next_step.name == "sms_reminder"
    shift = resumed.next_step.at - (datetime.now(UTC) + timedelta(days=35))
    assert abs(shift) < timedelta(hours=1)
    await harness.advance(handle, timedelta(days=12))  # day 34
    assert ("sms_reminder", "sms") not in harness.sent(invoice_id)
    await harness.advance(handle, timedelta(days=2))  # day 36
    assert ("sms_reminder", "sms") in harness.sent(invoice_id)
    assert actions(harness, invoice_id) == ["pause", "resume"]
    assert states(harness, invoice_id)[-2:] == ["paused", "active"]
    trail = harness.ledger.trail(invoice_id)
    pause_entry = next(e for e in trail if e.kind == "action" and e.status == "pause")
    assert "ops:kim" in pause_entry.detail and "customer on holiday" in pause_entry.detail


async def test_a_pause_until_a_time_resumes_by_itself(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    until = datetime.now(UTC) + timedelta(days=7)  # the run's clock is 2 days ahead: 5 days on it
    await harness.dunning.act(invoice_id, "pause", {"reason": "checking", "until": until.isoformat()})
    await harness.advance(handle, timedelta(days=4))
    assert (await harness.dunning.status(invoice_id)).state is RunState.PAUSED
    await harness.advance(handle, timedelta(days=2))
    status = await harness.dunning.status(invoice_id)
    assert status.state is RunState.ACTIVE
    assert ("state", "active", None, None) in harness.trail(invoice_id)


async def test_a_promise_kept_holds_escalation_until_the_day_ends(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    promised = await harness.dunning.act(invoice_id, "promise", {"amount": "500.00", "by": day(20)})
    assert promised.state is RunState.PROMISED
    await harness.dunning.pay(invoice_id, "500.00", payment_id="kept-1")
    await harness.advance(handle, timedelta(days=15))  # day 17: SMS (day 15) held back
    assert ("sms_reminder", "sms") not in harness.sent(invoice_id)
    await harness.advance(handle, timedelta(days=5))  # day 22: the promise was kept
    status = await harness.dunning.status(invoice_id)
    assert status.state is RunState.ACTIVE and status.balance_due == Decimal("750.00")
    assert not [s for s in harness.sent(invoice_id) if s[0].startswith("broken_promise")]
    assert any("promise kept" in e.detail for e in harness.ledger.trail(invoice_id))
    assert status.next_step is not None and status.next_step.name == "sms_reminder"


async def test_a_broken_promise_resumes_at_once_with_a_message(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    await harness.dunning.act(invoice_id, "promise", {"amount": "1250.00", "by": day(5),
                                                      "source": "agent"})
    await harness.advance(handle, timedelta(days=3))
    assert (await harness.dunning.status(invoice_id)).state is RunState.PROMISED
    await harness.advance(handle, timedelta(days=3))  # day 8: the promised day is over, unpaid
    await until(lambda: ("broken_promise_1", "email") in harness.sent(invoice_id))
    status = await harness.dunning.status(invoice_id)
    assert status.state is RunState.ACTIVE
    assert any("promise broken" in e.detail for e in harness.ledger.trail(invoice_id))


async def test_a_payment_plan_kept_ends_paid(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    planned = await harness.dunning.act(invoice_id, "plan", {"instalments": [
        {"due_on": day(12), "amount": "625.00"}, {"due_on": day(42), "amount": "625.00"}]})
    assert planned.state is RunState.ON_PLAN
    await harness.advance(handle, timedelta(days=11))  # day 13: reminded before and on the date
    sent = harness.sent(invoice_id)
    assert ("plan_1_instalment_1_remind", "email") in sent
    assert ("plan_1_instalment_1_due", "email") in sent
    await harness.dunning.pay(invoice_id, "625.00", payment_id="inst-1")
    hold = (await harness.dunning.status(invoice_id)).hold  # what the plan is, and where it stands
    assert hold is not None and [amount for _, amount in hold.instalments] == ["625.00", "625.00"]
    assert hold.paid_toward == Decimal("625.00")
    await harness.advance(handle, timedelta(days=20))  # day 33: no escalation while on plan
    assert ("sms_reminder", "sms") not in harness.sent(invoice_id)
    await harness.dunning.pay(invoice_id, "625.00", payment_id="inst-2")
    final = await handle.result()
    assert final.state is RunState.PAID
    assert not [s for s in harness.sent(invoice_id) if s[0].startswith("plan_1_instalment_2")]


async def test_a_missed_instalment_breaks_the_plan_and_escalation_resumes(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    await harness.dunning.act(invoice_id, "plan", {"instalments": [
        {"due_on": day(10), "amount": "250.00"}, {"due_on": day(20), "amount": "1000.00"}]})
    await harness.dunning.pay(invoice_id, "250.00", payment_id="inst-1")
    await harness.advance(handle, timedelta(days=25))  # day 27: instalment 2 still in its grace
    assert (await harness.dunning.status(invoice_id)).state is RunState.ON_PLAN
    assert ("plan_1_instalment_2_due", "email") in harness.sent(invoice_id)
    await harness.advance(handle, timedelta(days=2))  # day 29: grace (7d) over
    status = await harness.dunning.status(invoice_id)
    assert status.state is RunState.ACTIVE and status.balance_due == Decimal("1000.00")
    assert any("plan broken" in e.detail for e in harness.ledger.trail(invoice_id))
    assert status.next_step is not None and status.next_step.name == "sms_reminder"


async def test_a_dispute_holds_everything_and_upheld_credits_the_amount(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    disputed = await harness.dunning.act(invoice_id, "dispute", {"reason": "one item never arrived",
                                                                 "amount": "250.00"})
    assert disputed.state is RunState.DISPUTED
    await harness.advance(handle, timedelta(days=70))  # past the handoff's time: nothing happens
    assert harness.sent(invoice_id) == [("friendly_reminder", "email")]
    await harness.dunning.pay(invoice_id, "100.00", payment_id="during-dispute")  # still counts
    resolved = await harness.dunning.act(invoice_id, "resolve",
                                         {"outcome": "upheld", "note": "credit note 7"})
    assert resolved.state is RunState.ACTIVE
    assert resolved.balance_due == Decimal("900.00") and resolved.adjusted == Decimal("250.00")


async def test_a_rejected_dispute_resumes_and_a_whole_upheld_one_closes(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    await harness.dunning.act(invoice_id, "dispute", {"reason": "says it was paid"})
    rejected = await harness.dunning.act(invoice_id, "resolve", {"outcome": "rejected"})
    assert rejected.state is RunState.ACTIVE and rejected.balance_due == Decimal("1250.00")
    await harness.dunning.act(invoice_id, "dispute", {"reason": "wrong customer"})
    upheld = await harness.dunning.act(invoice_id, "resolve", {"outcome": "upheld"})
    assert upheld.state is RunState.CANCELLED and upheld.balance_due == 0
    final = await handle.result()
    assert final.state is RunState.CANCELLED


async def test_write_off_in_part_lowers_the_balance_and_in_whole_closes(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    part = await harness.dunning.act(invoice_id, "write-off", {"reason": "goodwill", "amount": "50.00"})
    assert part.state is RunState.ACTIVE and part.balance_due == Decimal("1200.00")
    whole = await harness.dunning.act(invoice_id, "write-off", {"reason": "uncollectable"})
    assert whole.state is RunState.WRITTEN_OFF and whole.balance_due == 0
    final = await handle.result()
    assert final.state is RunState.WRITTEN_OFF
    assert actions(harness, invoice_id) == ["write-off", "write-off"]


async def test_write_off_after_the_handoff_tells_the_agency(harness: Harness):
    from tests.test_runs import agency_messages

    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=61))
    await harness.dunning.act(invoice_id, "write-off", {"reason": "sold the debt"})
    final = await handle.result()
    assert final.state is RunState.WRITTEN_OFF
    recall = agency_messages(harness, invoice_id)[-1]
    assert recall["event"] == "account.recalled" and "sold the debt" in recall["reason"]


async def test_escalate_runs_the_next_step_now(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))
    await harness.dunning.act(invoice_id, "escalate", {"reason": "customer stopped answering"})
    await until(lambda: ("sms_reminder", "sms") in harness.sent(invoice_id))
    status = await harness.dunning.status(invoice_id)
    assert status.next_step is not None and status.next_step.name == "phone_call"
    # the call keeps its own time (day 30), and the agency cannot be escalated to early
    await harness.advance(handle, timedelta(days=30))
    with pytest.raises(ActionRefused, match="agency notice period") as refused:
        await harness.dunning.act(invoice_id, "escalate", {"reason": "now"})
    assert refused.value.conflict is False


async def test_pay_answers_the_outcome_and_the_new_balance(harness: Harness):
    handle, invoice_id = await started(harness)
    result = await harness.dunning.pay(invoice_id, "200.00", payment_id="pi_1")
    assert result.outcome == "accepted" and result.status is not None
    assert result.status.balance_due == Decimal("1050.00")
    again = await harness.dunning.pay(invoice_id, "200.00", payment_id="pi_1")  # a retried request
    assert again.outcome == "duplicate" and again.status is not None
    assert again.status.balance_due == Decimal("1050.00")
    last = await harness.dunning.pay(invoice_id, "1050.00", payment_id="pi_2")
    assert last.status is not None and last.status.state is RunState.PAID
    await handle.result()


@pytest.mark.parametrize("action, fields, conflict, reason", [
    ("pause", {"reason": "x", "until": "2020-01-01T00:00:00"}, False, "until: .* in the past"),
    ("pause", {"until": "2099-01-01"}, False, "reason: say why"),
    ("promise", {"amount": "100.00", "by": "2020-01-01"}, False, "by: 2020-01-01 is in the past"),
    ("promise", {"amount": "100.00", "by": day(45)}, False, "promise_max"),
    ("promise", {"amount": "2000.00", "by": day(5)}, False, "more than the balance"),
    ("promise", {"amount": "12.345", "by": day(5)}, False, "decimal places"),
    ("dispute", {"reason": "x", "amount": "1250.01"}, False, "more than the balance"),
    ("plan", {"instalments": [{"due_on": day(5), "amount": "600.00"}]}, False, "add up to 600.00"),
    ("plan", {"instalments": [{"due_on": day(9), "amount": "600.00"},
                              {"due_on": day(5), "amount": "650.00"}]}, False, "not after"),
    ("plan", {"instalments": [{"due_on": "soon", "amount": "1250.00"}]}, False,
     r"instalments\[0\].due_on: 'soon' is not an ISO 8601 date"),
    ("resolve", {"outcome": "upheld"}, True, "not disputed"),
    ("resume", {}, True, "not paused, disputed or promised"),
    ("pause", {"reason": "x", "colour": "red"}, False, "colour: not a field of pause"),
    ("shout", {}, False, "unknown action 'shout'"),
])
async def test_refusals_name_the_reason_and_change_nothing(harness: Harness, action: str,
                                                           fields: dict[str, Any], conflict: bool,
                                                           reason: str):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(hours=1))
    before = await harness.dunning.status(invoice_id)
    events = len([e async for e in handle.fetch_history_events()])
    with pytest.raises(ActionRefused, match=reason) as refused:
        await harness.dunning.act(invoice_id, action, fields)
    assert refused.value.conflict is conflict
    assert await harness.dunning.status(invoice_id) == before
    history = [e async for e in handle.fetch_history_events()]
    assert len(history) == events  # a refused update leaves no trace
    assert not [e for e in history if e.event_type in (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED)]
    assert actions(harness, invoice_id) == []


async def test_a_second_plan_and_actions_on_a_closed_run_are_refused(harness: Harness):
    handle, invoice_id = await started(harness)
    plan = {"instalments": [{"due_on": day(10), "amount": "1250.00"}]}
    await harness.dunning.act(invoice_id, "plan", plan)
    with pytest.raises(ActionRefused, match="a payment plan is already running"):
        await harness.dunning.act(invoice_id, "plan", plan)
    with pytest.raises(ActionRefused, match="resume it first"):
        await harness.dunning.act(invoice_id, "pause", {"reason": "x"})
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="all")
    await handle.result()
    with pytest.raises(ActionRefused, match="has ended") as refused:
        await harness.dunning.act(invoice_id, "dispute", {"reason": "late"})
    assert refused.value.conflict is True


def test_iso_dates_read_without_an_offset_are_utc():
    from models.action import parse_datetime

    assert parse_datetime("2026-12-01T09:00:00", "until") == datetime(2026, 12, 1, 9, tzinfo=UTC)
    assert parse_datetime("2026-12-01", "until").date() == date(2026, 12, 1)


async def test_a_reversal_makes_the_amount_owed_again_once(harness: Harness):
    _, invoice_id = await started(harness)
    await harness.dunning.pay(invoice_id, "400.00", payment_id="pi_r")
    after = await harness.dunning.reverse(invoice_id, "100.00", key="refund:ch_1", reason="partial refund")
    assert after.balance_due == Decimal("950.00") and after.reversals == {"refund:ch_1": Decimal("100.00")}
    again = await harness.dunning.reverse(invoice_id, "100.00", key="refund:ch_1")  # redelivered
    assert again.balance_due == Decimal("950.00")
    more = await harness.dunning.reverse(invoice_id, "150.00", key="refund:ch_1")  # cumulative total
    assert more.balance_due == Decimal("1000.00")
    with pytest.raises(ActionRefused, match=r"more than the 250\.00 USD paid") as refused:
        await harness.dunning.reverse(invoice_id, "300.00", key="dispute:du_9")
    assert refused.value.conflict is False
    reversed_ = [e for e in harness.ledger.trail(invoice_id) if e.status == "reversed"]
    assert len(reversed_) == 2


async def test_a_reversal_reopens_a_paid_run(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(days=2))  # the first reminder went out
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="pi_all")
    assert (await handle.result()).state is RunState.PAID
    reopened = await harness.dunning.reverse(invoice_id, "1250.00", key="dispute:du_1",
                                             reason="chargeback lost")
    assert reopened.state is RunState.ACTIVE and reopened.balance_due == Decimal("1250.00")
    assert reopened.payment_ids == ["pi_all"] and reopened.paid == 0
    assert ("state", "reopened", None, None) in harness.trail(invoice_id)
    same = await harness.dunning.reverse(invoice_id, "1250.00", key="dispute:du_1")
    assert same.state is RunState.ACTIVE and same.balance_due == Decimal("1250.00")
    # a payment counted before is not counted again; the reminder already sent is not sent again
    dup = await harness.dunning.pay(invoice_id, "1250.00", payment_id="pi_all")
    assert dup.outcome == "duplicate"
    new = harness.client.get_workflow_handle(f"dunning-{invoice_id}")
    await harness.advance(new, timedelta(days=16))  # the new run's clock starts at the real one
    # the reopened run's messages have ledger keys of their own (its clock here restarted at
    # the real one, so it reminds from day 1 again)
    sent = [(step.split("@")[0], channel, "@" in step) for step, channel in harness.sent(invoice_id)]
    assert sent == [("friendly_reminder", "email", False), ("friendly_reminder", "email", True),
                    ("sms_reminder", "sms", True)]
    final = await harness.dunning.pay(invoice_id, "1250.00", payment_id="pi_again")
    assert final.status is not None and final.status.state is RunState.PAID
    states = [s for k, s, _, _ in harness.trail(invoice_id) if k == "state"]
    assert states.count("paid") == 2 and states.count("reopened") == 1  # (skipped clocks: order aside)


async def test_a_reversal_does_not_reopen_a_written_off_run(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.dunning.pay(invoice_id, "100.00", payment_id="pi_w")
    await harness.dunning.act(invoice_id, "write-off", {"reason": "closing the books"})
    await handle.result()
    with pytest.raises(ActionRefused, match="ended written_off"):
        await harness.dunning.reverse(invoice_id, "100.00", key="refund:ch_w")


async def test_refunding_an_overpayment_does_not_reopen_a_settled_run(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.dunning.pay(invoice_id, "1350.00", payment_id="pi_over")
    assert (await handle.result()).state is RunState.PAID
    first_run = (await handle.describe()).run_id
    after = await harness.dunning.reverse(invoice_id, "100.00", key="refund:ch_over")
    assert after.state is RunState.PAID
    described = await harness.client.get_workflow_handle(f"dunning-{invoice_id}").describe()
    assert described.run_id == first_run  # no new run
    assert ("payment", "reversed", None, None) in harness.trail(invoice_id)


async def test_a_reversal_counts_payments_recorded_after_the_run_ended(harness: Harness):
    handle, invoice_id = await started(harness)
    await harness.dunning.pay(invoice_id, "1250.00", payment_id="pi_a")
    await handle.result()
    late = await harness.dunning.pay(invoice_id, "50.00", payment_id="pi_late")
    assert late.outcome == "after_close"
    reopened = await harness.dunning.reverse(invoice_id, "300.00", key="refund:ch_a")
    assert reopened.state is RunState.ACTIVE and reopened.balance_due == Decimal("250.00")
    assert "pi_late" in reopened.payment_ids


async def test_a_send_stopped_by_the_database_is_tried_again_not_skipped(harness: Harness):
    """The mirror says the run is held (a hold that ended a moment ago, not yet written): the
    send stops, and the step is tried again shortly instead of being skipped or spun on."""
    from models.database import session
    from models.records import RunRow

    handle, invoice_id = await started(harness)
    await harness.advance(handle, timedelta(hours=1))
    with session(harness.ledger.engine) as db:
        row = db.get(RunRow, invoice_id)
        assert row is not None
        row.state, row.seq = "paused", row.seq + 1000
        db.add(row)
    await harness.advance(handle, timedelta(hours=23, minutes=1))  # a minute past the first step
    assert harness.sent(invoice_id) == []
    with session(harness.ledger.engine) as db:
        row = db.get(RunRow, invoice_id)
        assert row is not None
        row.state = "active"
        db.add(row)
    await harness.advance(handle, timedelta(seconds=15))
    await until(lambda: harness.sent(invoice_id) == [("friendly_reminder", "email")])
    assert not [e for e in harness.ledger.trail(invoice_id) if e.status == "skipped"]
    history = [e async for e in handle.fetch_history_events()]
    assert len(history) < 200  # a few tries a minute, not a spin


async def test_an_action_no_worker_answers_is_pending_not_failed(harness: Harness,
                                                                  monkeypatch: pytest.MonkeyPatch):
    """With no worker running, an action is neither done nor refused: it stays with the run and
    applies when a worker runs. The CLI said "error" and exited 1, so a script took it for a
    failure; it now says "pending" and exits 3 (the API answers 202)."""
    import typer

    import starter
    from cli import PENDING, handled
    from starter import DunningClient, Pending

    monkeypatch.setattr(starter, "UPDATE_TIMEOUT", timedelta(seconds=1))
    unserved = DunningClient(harness.client, harness.dunning.settings.model_copy(
        update={"task_queue": "no-worker-polls-this"}))
    invoice = sample_invoice()
    assert (await unserved.start(invoice)).started
    with pytest.raises(Pending, match="no worker answered"):
        await unserved.act(invoice["invoice_id"], "pause", {"reason": "customer called"})

    @handled
    def pause() -> None:
        raise Pending("no worker answered")

    with pytest.raises(typer.Exit) as exited:
        pause()
    assert exited.value.exit_code == PENDING == 3
    await unserved.cancel(invoice["invoice_id"], "test over")
