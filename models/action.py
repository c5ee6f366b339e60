"""What an operator, an agent or the billing system may ask of a run, and when a run says no.

Each action is a Temporal Update: the caller waits for a yes (the run's status after it) or a
refusal with the reason, and a refused request leaves no trace in the history. The rules live
here, as a pure function of the request and a view of the run, so the workflow's validators stay
one line each and the rules are tested without a server.

A refusal is either a *conflict* with the run's state (a dispute on a paid run: HTTP 409) or an
*invalid* request (a promise date in the past, instalments that do not add up: HTTP 422); the
reason names the field when there is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict

from models.hold import Instalment
from models.money import parse_amount
from models.policy import DEFAULT_SEND_TIME, Channel, Policy, format_offset
from models.run import CLOSED, RunState, ScheduledStep
from models.text import control_problem

REASON_MAX = 500


class Action(BaseModel):
    """Who asked and why; every action writes both to the audit trail."""

    model_config = ConfigDict(frozen=True)

    actor: str = ""
    reason: str = ""


class Pause(Action):
    until: datetime | None = None


class Resume(Action):
    pass


class Dispute(Action):
    amount: str | None = None  # None: the whole balance


class Resolve(Action):
    outcome: Literal["upheld", "rejected"]
    note: str = ""


class Promise(Action):
    amount: str
    by: date
    deadline: datetime  # the end of ``by`` in the customer's time zone, computed at the edge
    source: Literal["customer", "agent"] = "customer"


class PaymentPlan(Action):
    instalments: tuple[Instalment, ...]


class WriteOff(Action):
    amount: str | None = None  # None: the whole balance


class Escalate(Action):
    pass


class Cancel(Action):
    pass


class Reversal(Action):
    """Money paid and taken back (a refund, a lost chargeback). ``total`` is everything reversed
    under ``key`` so far, so a provider's cumulative refund total applies once, whenever it comes."""

    key: str
    total: str


class Problem(StrEnum):
    CONFLICT = "ActionConflict"  # the run's state does not allow it
    BUSY = "ActionBusy"  # not now, but in a moment (the account is being handed off)
    INVALID = "ActionInvalid"  # the request itself is wrong (a field)


@dataclass(frozen=True)
class Refusal:
    problem: Problem
    reason: str


@dataclass(frozen=True)
class RunView:
    """What the rules need to know about a run at the moment of asking."""

    invoice_id: str
    state: RunState
    balance_due: Decimal
    currency: str
    now: datetime
    handing_off: bool
    next_step: ScheduledStep | None  # the step not yet done, if any
    last_notice_at: datetime | None
    agency_notice: timedelta
    promise_max: timedelta
    paid: Decimal = Decimal(0)
    reversals: Mapping[str, Decimal] = field(default_factory=dict)
    # With fees or statutory interest: the total the customer is shown (principal, fees and
    # interest), the most a promise or a plan may cover; a dispute or write-off is of the invoice.
    total_due: Decimal | None = None

    @property
    def owed(self) -> Decimal:
        """The most a promise or a payment plan may cover."""
        return self.total_due if self.total_due is not None else self.balance_due


# The states each action may start from.
_FROM: dict[type[Action], frozenset[RunState]] = {
    Pause: frozenset({RunState.ACTIVE}),
    Dispute: frozenset({RunState.ACTIVE}),
    Promise: frozenset({RunState.ACTIVE}),
    PaymentPlan: frozenset({RunState.ACTIVE}),
    Escalate: frozenset({RunState.ACTIVE}),
    Reversal: frozenset(RunState) - CLOSED,
    Cancel: frozenset(RunState) - CLOSED,
    Resume: frozenset({RunState.PAUSED, RunState.DISPUTED, RunState.PROMISED}),
    Resolve: frozenset({RunState.DISPUTED}),
    WriteOff: frozenset(RunState) - CLOSED,
}
_NEEDS_REASON = (Pause, Dispute, WriteOff, Escalate, Cancel)


def refusal(action: Action, run: RunView) -> Refusal | None:
    """Why ``action`` cannot be done on ``run`` now, or None when it can."""
    if run.handing_off and run.state not in CLOSED and not isinstance(action, WriteOff | Cancel):
        return Refusal(Problem.BUSY, "the account is being handed to the agency right now; ask again "
                                     "in a moment")
    conflict = _state_conflict(action, run)
    if conflict is not None:
        return Refusal(Problem.CONFLICT, conflict)
    invalid = _invalid(action, run)
    return Refusal(Problem.INVALID, invalid) if invalid is not None else None


def _state_conflict(action: Action, run: RunView) -> str | None:
    name = type(action).__name__.lower()
    if run.state in CLOSED:
        return f"the run for {run.invoice_id} is {run.state}: it takes no more actions"
    if run.state in _FROM[type(action)]:
        return None
    if run.state is RunState.HANDED_OFF:
        return "the agency holds the account (`dunning cancel` recalls it)"
    if run.state is RunState.FAILED:
        return "a delivery failed and waits for an operator: fix it, then `dunning retry` first"
    if run.state is RunState.EXHAUSTED:
        return "every step is done; there is nothing left to hold or escalate"
    if isinstance(action, PaymentPlan) and run.state is RunState.ON_PLAN:
        return "a payment plan is already running"
    if isinstance(action, Resume | Resolve):
        wanted = "disputed" if isinstance(action, Resolve) else "paused, disputed or promised"
        return f"the run is {run.state}, not {wanted}"
    return f"the run is {run.state}: {name} needs it active (resume it first)"


def _invalid(action: Action, run: RunView) -> str | None:
    if isinstance(action, _NEEDS_REASON) and not action.reason.strip():
        return "reason: say why"
    if len(action.actor) > 200:
        return "actor: at most 200 characters"
    problem = reason_problem(action.reason)
    if problem is not None:
        return problem
    if isinstance(action, Pause) and action.until is not None and action.until <= run.now:
        return f"until: {action.until.isoformat()} is in the past"
    if isinstance(action, Dispute | WriteOff | Promise) and action.amount is not None:
        of_invoice = not isinstance(action, Promise) and run.total_due is not None
        problem = _amount_problem(action.amount, run,
                                  limit=run.owed if isinstance(action, Promise) else run.balance_due,
                                  what="the invoice's unpaid amount" if of_invoice else "the balance")
        if problem is not None:
            return problem
    if isinstance(action, Promise):
        if action.deadline <= run.now:
            return f"by: {action.by.isoformat()} is in the past"
        if action.deadline > run.now + run.promise_max + timedelta(days=1):
            return (f"by: {action.by.isoformat()} is more than {format_offset(run.promise_max)} "
                    "ahead (the policy's promise_max)")
    if isinstance(action, PaymentPlan):
        return _plan_problem(action, run)
    if isinstance(action, Escalate):
        return _escalate_problem(run)
    if isinstance(action, Reversal):
        return reversal_problem(action.key, action.total, run.currency, run.paid,
                                run.reversals.get(action.key, Decimal(0)))
    return None


def reversal_problem(key: str, total: str, currency: str, paid: Decimal, before: Decimal) -> str | None:
    """Why a reversal cannot apply: a bad key or amount, or more taken back than was paid."""
    if not key.strip() or len(key) > 200:
        return "key: 1 to 200 characters (the refund, dispute or reversal id)"
    try:
        amount = parse_amount(total, currency, field="amount")
    except ValueError as exc:
        return str(exc)
    if amount - before > paid:
        return f"amount: {amount - before} {currency} is more than the {paid} {currency} paid"
    return None


def _amount_problem(text: str, run: RunView, limit: Decimal, field: str = "amount",
                    what: str = "the balance") -> str | None:
    try:
        amount = parse_amount(text, run.currency, field=field)
    except ValueError as exc:
        return f"{field}: {exc}" if not str(exc).startswith(field) else str(exc)
    if amount > limit:
        more = (f" (the total with fees and interest is {run.total_due}; clearing the unpaid amount "
                "waives them)") if what != "the balance" else ""
        return f"{field}: {amount} is more than {what} {limit} {run.currency}{more}"
    return None


def _plan_problem(plan: PaymentPlan, run: RunView) -> str | None:
    if not plan.instalments:
        return "instalments: give at least one DATE:AMOUNT"
    total = Decimal(0)
    for index, item in enumerate(plan.instalments):
        field = f"instalments[{index}]"
        try:
            total += parse_amount(item.amount, run.currency, field=f"{field}.amount")
        except ValueError as exc:
            return str(exc)
        if item.due_at <= run.now:
            return f"{field}.due_on: {item.due_on.isoformat()} is in the past"
        if index and item.due_on <= plan.instalments[index - 1].due_on:
            return f"{field}.due_on: {item.due_on.isoformat()} is not after the instalment before it"
    if run.owed == run.balance_due and total != run.balance_due:
        return (f"instalments: they add up to {total} {run.currency}, but the balance is "
                f"{run.balance_due} {run.currency}")
    if not run.balance_due <= total <= run.owed:  # the invoice alone, up to fees and interest too
        return (f"instalments: they add up to {total} {run.currency}, but must cover the invoice's "
                f"{run.balance_due} {run.currency} and at most the {run.owed} {run.currency} due now "
                "with fees and interest (what is left after the plan is chased as before)")
    return None


def _escalate_problem(run: RunView) -> str | None:
    if run.next_step is None:
        return "every step is done; there is no next step to run"
    if run.next_step.step.channel is Channel.AGENCY:
        if run.last_notice_at is None:
            return "no message has reached the customer yet: the agency cannot take the account"
        ready = run.last_notice_at + run.agency_notice
        if ready > run.now:
            return (f"the agency notice period runs until {ready.isoformat()} (the policy's "
                    "agency_notice)")
    return None


def whole(amount: str | None, balance: Decimal) -> bool:
    """A write-off or dispute of ``amount`` covers the whole balance."""
    return amount is None or Decimal(amount) >= balance


# -- at the edge: requests as the CLI and the API receive them ----------------------------------


class ActionInputError(ValueError):
    """A malformed action request; the message names the field."""


def parse_datetime(value: object, field: str) -> datetime:
    """ISO 8601, with or without an offset (without one it is read as UTC)."""
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ActionInputError(f"{field}: {value!r} is not an ISO 8601 date-time "
                                   "(e.g. 2026-12-01T09:00:00+01:00)") from None
    return parsed if parsed.utcoffset() is not None else parsed.replace(tzinfo=UTC)


def parse_date(value: object, field: str) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise ActionInputError(f"{field}: {value!r} is not an ISO 8601 date (e.g. 2026-12-01)") from None


def _amount(value: object, currency: str, field: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ActionInputError(f"{field}: give a decimal string such as '120.00'")
    try:
        return str(parse_amount(value, currency, field=field))
    except ValueError as exc:
        raise ActionInputError(str(exc)) from None


def reason_problem(reason: str, field: str = "reason") -> str | None:
    """Why a person's reason or note cannot be taken (too long, control characters), or None."""
    if len(reason) > REASON_MAX:
        return f"{field}: at most {REASON_MAX} characters"
    return control_problem(field, reason)


def _text(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ActionInputError(f"{name}: must be text")
    problem = reason_problem(value, name)
    if problem is not None:
        raise ActionInputError(problem)
    return value.strip()


def _end_of(day: date, zone: ZoneInfo) -> datetime:
    """The first instant after ``day`` in ``zone``."""
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)


ACTIONS: dict[str, type[Action]] = {
    "pause": Pause, "resume": Resume, "dispute": Dispute, "resolve": Resolve, "promise": Promise,
    "plan": PaymentPlan, "write-off": WriteOff, "escalate": Escalate, "reverse": Reversal,
}
_FIELDS: dict[str, frozenset[str]] = {
    "pause": frozenset({"reason", "until"}), "resume": frozenset({"reason"}),
    "dispute": frozenset({"reason", "amount"}), "resolve": frozenset({"outcome", "note", "reason"}),
    "promise": frozenset({"amount", "by", "source", "reason"}),
    "plan": frozenset({"instalments", "reason"}), "write-off": frozenset({"reason", "amount"}),
    "escalate": frozenset({"reason"}), "reverse": frozenset({"key", "total", "reason"}),
}


def build_action(name: str, fields: dict[str, Any], *, currency: str, timezone: str,
                 policy: Policy, actor: str, now: datetime) -> Action:
    """The update's input from a request's fields, or ActionInputError naming the field.

    Instants that depend on the customer's day (the end of a promised day, each instalment's
    reminder and deadline) are computed here, where the time zone is known; the workflow only
    compares them with its clock.
    """
    if name not in ACTIONS:
        raise ActionInputError(f"action: unknown action {name!r} (known: {', '.join(ACTIONS)})")
    unknown = sorted(set(fields) - _FIELDS[name] - {"actor"})
    if unknown:
        raise ActionInputError(f"{unknown[0]}: not a field of {name} "
                               f"(fields: {', '.join(sorted(_FIELDS[name]))})")
    zone = ZoneInfo(timezone)
    common: dict[str, Any] = {"actor": actor[:200], "reason": _text(fields, "reason")}
    amount = fields.get("amount")
    if name == "pause":
        until = fields.get("until")
        return Pause(**common, until=parse_datetime(until, "until") if until not in (None, "") else None)
    if name in ("dispute", "write-off"):
        kind = Dispute if name == "dispute" else WriteOff
        return kind(**common, amount=_amount(amount, currency, "amount") if amount is not None else None)
    if name == "resolve":
        outcome = fields.get("outcome")
        if outcome not in ("upheld", "rejected"):
            raise ActionInputError("outcome: must be 'upheld' or 'rejected'")
        return Resolve(**common, outcome=outcome, note=_text(fields, "note"))
    if name == "promise":
        if "by" not in fields:
            raise ActionInputError("by: the date the customer promised to pay by")
        by = parse_date(fields["by"], "by")
        source = fields.get("source") or "customer"
        if source not in ("customer", "agent"):
            raise ActionInputError("source: must be 'customer' or 'agent'")
        return Promise(**common, amount=_amount(amount, currency, "amount"), by=by,
                       deadline=_end_of(by, zone), source=source)
    if name == "reverse":
        key = fields.get("key")
        if not isinstance(key, str) or not key.strip() or len(key) > 200:
            raise ActionInputError("key: 1 to 200 characters (the refund, dispute or reversal id)")
        return Reversal(**common, key=key.strip(), total=_amount(fields.get("total"), currency, "amount"))
    if name == "plan":
        return PaymentPlan(**common, instalments=_instalments(fields.get("instalments"), currency, zone,
                                                               policy, now))
    return ACTIONS[name](**common)


def _instalments(raw: object, currency: str, zone: ZoneInfo, policy: Policy,
                 now: datetime) -> tuple[Instalment, ...]:
    if not isinstance(raw, list | tuple) or not raw:
        raise ActionInputError('instalments: give a list of {"due_on", "amount"}')
    items = []
    for index, entry in enumerate(raw):
        field = f"instalments[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"due_on", "amount"}:
            raise ActionInputError(f'{field}: expected {{"due_on": DATE, "amount": AMOUNT}}')
        due_on = parse_date(entry["due_on"], f"{field}.due_on")
        due_at = datetime.combine(due_on, DEFAULT_SEND_TIME, tzinfo=zone)
        remind_at = due_at - policy.plan_reminder
        items.append(Instalment(
            due_on=due_on, amount=_amount(entry["amount"], currency, f"{field}.amount"),
            remind_at=remind_at if remind_at > now else None, due_at=due_at,
            breaks_at=_end_of(due_on, zone) + policy.plan_grace,
        ))
    return tuple(items)
