"""Holds: the times a run stops escalating on purpose, and what it does meanwhile.

A run is held by an operator's pause, a customer's dispute, a promise to pay or a payment plan.
While held nothing escalates (no reminder, no handoff); payments still count. When a hold ends
the schedule goes on shifted by the time it lasted, so the customer is never hit by the steps
that fell due meanwhile all at once.

Every instant here was computed at the edge, where the customer's time zone is known (the end of
the promised day, each instalment's reminder and deadline): the workflow only compares them with
its clock. Pure data and functions, tested without Temporal.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class HoldKind(StrEnum):
    PAUSE = "pause"
    DISPUTE = "dispute"
    PROMISE = "promise"
    PLAN = "plan"


class Instalment(BaseModel):
    """One instalment of a payment plan, with the instants the edge computed for it."""

    model_config = ConfigDict(frozen=True)

    due_on: date
    amount: str  # a decimal string in the invoice's currency
    remind_at: datetime | None  # the reminder before the date (None: already past when planned)
    due_at: datetime  # the reminder on the date
    breaks_at: datetime  # unpaid by then (the end of the date plus the policy's plan_grace): broken


class Hold(BaseModel):
    """The hold a run is in. ``number`` counts the run's holds, so every hold's messages have
    ledger keys of their own (a second plan never collides with the first)."""

    model_config = ConfigDict(frozen=True)

    kind: HoldKind
    number: int
    since: datetime
    reason: str
    actor: str
    until: datetime | None = None  # a pause's end, a promise's deadline
    amount: str | None = None  # disputed or promised amount (None: the whole balance)
    paid_before: Decimal = Decimal(0)  # what had been paid when a promise or plan began
    instalments: tuple[Instalment, ...] = ()
    moments_done: int = 0  # how many of the plan's moments have passed


class MomentKind(StrEnum):
    REMIND = "remind"  # a reminder before the instalment's date
    DUE = "due"  # a reminder on the date
    CHECK = "check"  # the grace is over: paid or broken


class Moment(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: datetime
    kind: MomentKind
    index: int  # which instalment

    @property
    def step(self) -> str:
        """The ledger step of this moment's message, unique within the hold."""
        return f"instalment_{self.index + 1}_{self.kind.value}"


def moments(instalments: tuple[Instalment, ...]) -> list[Moment]:
    """A plan's moments in time order: for each instalment a reminder before, one on the day,
    and the check after the grace."""
    found = [
        Moment(at=at, kind=kind, index=index)
        for index, item in enumerate(instalments)
        for at, kind in ((item.remind_at, MomentKind.REMIND), (item.due_at, MomentKind.DUE),
                         (item.breaks_at, MomentKind.CHECK))
        if at is not None
    ]
    order = {MomentKind.REMIND: 0, MomentKind.DUE: 1, MomentKind.CHECK: 2}
    return sorted(found, key=lambda m: (m.at, order[m.kind], m.index))


def next_moment(hold: Hold) -> Moment | None:
    """What the hold waits for next: a plan's next moment, a pause's or promise's end."""
    if hold.kind is HoldKind.PLAN:
        pending = moments(hold.instalments)[hold.moments_done:]
        return pending[0] if pending else None
    if hold.until is not None:
        return Moment(at=hold.until, kind=MomentKind.CHECK, index=0)
    return None


def owed_by(hold: Hold, index: int) -> Decimal:
    """What must have been paid since the plan began for instalments 0..``index`` to be met."""
    return sum((Decimal(item.amount) for item in hold.instalments[:index + 1]), Decimal(0))


def covered(hold: Hold, index: int, paid: Decimal) -> bool:
    """Instalments up to ``index`` are paid (payments count toward the earliest first)."""
    return paid - hold.paid_before >= owed_by(hold, index)


def promise_kept(hold: Hold, paid: Decimal) -> bool:
    return hold.amount is not None and paid - hold.paid_before >= Decimal(hold.amount)
