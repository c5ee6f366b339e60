"""The rules of actions and holds as pure functions: no server, no database."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from models.action import (
    ActionInputError,
    Dispute,
    Escalate,
    Pause,
    Problem,
    Resume,
    RunView,
    WriteOff,
    build_action,
    refusal,
)
from models.hold import Hold, HoldKind, Instalment, MomentKind, covered, moments, next_moment
from models.payment import Account
from models.policy import Channel, Policy, Step
from models.run import CLOSED, HELD, RunState, ScheduledStep, advance
from models.schedule import Plan

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
POLICY = Policy(name="p", version=1, steps=(
    Step(name="friendly_reminder", after_due=timedelta(days=1), channel=Channel.EMAIL),
    Step(name="agency_handoff", after_due=timedelta(days=60), channel=Channel.AGENCY),
))


def view(state: RunState = RunState.ACTIVE, **changes: object) -> RunView:
    fields: dict[str, object] = dict(
        invoice_id="INV-1", state=state, balance_due=Decimal("100.00"), currency="USD", now=NOW,
        handing_off=False, next_step=None, last_notice_at=None, agency_notice=timedelta(days=14),
        promise_max=timedelta(days=30),
    )
    fields.update(changes)
    return RunView(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("state", sorted(CLOSED))
def test_a_closed_run_refuses_every_action(state: RunState):
    for action in (Pause(reason="x"), Resume(), Dispute(reason="x"), WriteOff(reason="x")):
        refused = refusal(action, view(state))
        assert refused is not None and refused.problem is Problem.CONFLICT
        assert "takes no more actions" in refused.reason


def test_holds_start_only_from_active_and_end_only_from_a_hold():
    for held in HELD:
        assert refusal(Pause(reason="x"), view(held)) is not None
    assert refusal(Pause(reason="x"), view()) is None
    assert refusal(Resume(), view()) is not None
    assert refusal(Resume(), view(RunState.PAUSED)) is None
    agency = refusal(Pause(reason="x"), view(RunState.HANDED_OFF))
    assert agency is not None and "agency holds the account" in agency.reason
    assert refusal(WriteOff(reason="x"), view(RunState.HANDED_OFF)) is None


def test_nothing_but_a_write_off_while_the_account_is_being_handed_off():
    busy = view(handing_off=True)
    assert refusal(Pause(reason="x"), busy) is not None
    assert refusal(WriteOff(reason="x"), busy) is None


def test_escalation_respects_the_agency_notice():
    handoff = ScheduledStep(step=POLICY.steps[1], at=NOW)
    never = refusal(Escalate(reason="x"), view(next_step=handoff))
    assert never is not None and "no message has reached" in never.reason
    early = refusal(Escalate(reason="x"), view(next_step=handoff, last_notice_at=NOW - timedelta(days=3)))
    assert early is not None and "agency notice period" in early.reason
    assert refusal(Escalate(reason="x"), view(next_step=handoff,
                                              last_notice_at=NOW - timedelta(days=15))) is None


def test_states_stay_monotone():
    for closed in CLOSED:
        for wanted in RunState:
            assert advance(closed, wanted) is closed
    for held in HELD:
        assert advance(held, RunState.FAILED) is held  # a failed send keeps the hold
        assert advance(held, RunState.ACTIVE) is RunState.ACTIVE
    assert advance(RunState.HANDED_OFF, RunState.PAUSED) is RunState.HANDED_OFF


def test_the_schedule_shifts_by_the_holds():
    schedule = tuple(ScheduledStep(step=s, at=NOW + s.after_due) for s in POLICY.steps)
    plan = Plan(schedule, timedelta(days=14), shift=timedelta(days=10))
    assert plan.time_of(0, None) == NOW + timedelta(days=11)
    # the agency notice counts from the last message, which is not shifted
    assert plan.time_of(1, NOW + timedelta(days=65)) == NOW + timedelta(days=79)
    assert plan.time_of(1, NOW) == NOW + timedelta(days=70)


def test_a_plan_reminds_before_and_on_each_date_then_checks():
    first = Instalment(due_on=date(2026, 12, 10), amount="40.00", remind_at=NOW + timedelta(days=6),
                       due_at=NOW + timedelta(days=9), breaks_at=NOW + timedelta(days=17))
    second = Instalment(due_on=date(2026, 12, 20), amount="60.00", remind_at=None,
                        due_at=NOW + timedelta(days=19), breaks_at=NOW + timedelta(days=27))
    order = [(m.kind, m.index) for m in moments((first, second))]
    assert order == [(MomentKind.REMIND, 0), (MomentKind.DUE, 0), (MomentKind.CHECK, 0),
                     (MomentKind.DUE, 1), (MomentKind.CHECK, 1)]
    hold = Hold(kind=HoldKind.PLAN, number=1, since=NOW, reason="", actor="", instalments=(first, second),
                paid_before=Decimal("0"), moments_done=3)
    moment = next_moment(hold)
    assert moment is not None and moment.step == "instalment_2_due"
    assert covered(hold, 0, Decimal("40.00")) and not covered(hold, 1, Decimal("99.99"))


def test_an_account_credits_and_write_offs_lower_what_is_owed():
    account = Account(currency="USD", amount_due=Decimal("100.00"), paid=Decimal("30.00"))
    account.adjust(Decimal("20.00"))
    assert account.balance_due == Decimal("50.00") and not account.settled
    account.adjust(Decimal("500.00"))  # never more than the balance
    assert account.adjusted == Decimal("70.00") and account.settled and account.credit == 0


def test_requests_are_read_at_the_edge_with_the_customer_day():
    zone = "America/New_York"
    promise = build_action("promise", {"amount": "50", "by": "2026-12-05"}, currency="USD",
                           timezone=zone, policy=POLICY, actor="ops", now=NOW)
    assert promise.deadline == datetime(2026, 12, 6, tzinfo=ZoneInfo(zone))  # type: ignore[attr-defined]
    plan = build_action("plan", {"instalments": [{"due_on": "2026-12-02", "amount": "100.00"}]},
                        currency="USD", timezone=zone, policy=POLICY, actor="ops", now=NOW)
    [item] = plan.instalments  # type: ignore[attr-defined]
    assert item.remind_at is None  # three days before was already past
    assert item.due_at == datetime(2026, 12, 2, 9, tzinfo=ZoneInfo(zone))
    assert item.breaks_at == datetime(2026, 12, 3, tzinfo=ZoneInfo(zone)) + timedelta(days=7)
    for name, fields, message in [
        ("promise", {"amount": 12.5, "by": "2026-12-05"}, "amount: give a decimal string"),
        ("promise", {"amount": "12.50"}, "by: the date"),
        ("resolve", {"outcome": "maybe"}, "outcome: must be"),
        ("plan", {"instalments": []}, "instalments: give a list"),
        ("pause", {"reason": "x" * 501}, "reason: at most 500"),
    ]:
        with pytest.raises(ActionInputError, match=message):
            build_action(name, fields, currency="USD", timezone=zone, policy=POLICY, actor="", now=NOW)


def test_who_reported_a_payment_never_gets_it_refused():
    from models.payment import read_payment

    payment, problem = read_payment({"payment_id": "p1", "amount": 5, "currency": "USD",
                                     "paid_at": "2026-12-01T00:00:00Z", "source": {"odd": 1}})
    assert payment is not None and problem == "" and payment.source == ""
    account = Account(currency="USD", amount_due=Decimal("10.00"))
    _, detail = account.apply(payment.model_copy(update={"source": "api:billing"}))
    assert detail.endswith("(reported by api:billing)")
