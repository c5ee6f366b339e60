"""What a dunning run starts with, what it records and what it reports.

The workflow's input is deliberately plain: strings, decimals and dates, checked once at the edge
(``models.invoice``) and never again. A run lives for months; if decoding its input re-ran
phone-number or locale validation, a library data update could make a running workflow
undecodable. For the same reason the schedule is computed once, when the run starts, and carried
in the input: a later change to the send time or the anchor never moves the timers of runs in
flight.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from models.audit import AuditEvent
from models.charges import Dated, FeeTerms, account_charges
from models.contact import ContactRules
from models.hold import Hold
from models.payment import PaymentReceived
from models.policy import Channel, Policy, Step


class RunState(StrEnum):
    ACTIVE = "active"
    PAID = "paid"
    HANDED_OFF = "handed_off"
    CANCELLED = "cancelled"
    EXHAUSTED = "exhausted"  # every step done, nothing paid, no agency (or none allowed)
    FAILED = "failed"  # a delivery cannot work without an operator (`dunning retry`)
    PAUSED = "paused"  # an operator's pause: nothing is sent or handed off
    DISPUTED = "disputed"  # the customer disputes the invoice: no contact, no handoff
    PROMISED = "promised"  # the customer promised to pay by a date
    ON_PLAN = "on_plan"  # paying in instalments: reminders of those instead of escalation
    WRITTEN_OFF = "written_off"  # the balance was written off: closed


CLOSED = frozenset({RunState.PAID, RunState.CANCELLED, RunState.WRITTEN_OFF})
HELD = frozenset({RunState.PAUSED, RunState.DISPUTED, RunState.PROMISED, RunState.ON_PLAN})

# Which state may follow which. Paid, cancelled and written off are final: nothing overwrites
# them. A held run goes back to active (or closes); it never fails (a failed delivery during a
# hold keeps the hold and says so in the trail).
_NEXT: dict[RunState, frozenset[RunState]] = {
    RunState.ACTIVE: frozenset(RunState) - {RunState.ACTIVE},
    RunState.FAILED: CLOSED | {RunState.ACTIVE},
    RunState.HANDED_OFF: CLOSED,
    RunState.EXHAUSTED: CLOSED,
    **{held: CLOSED | {RunState.ACTIVE} for held in HELD},
    **{closed: frozenset() for closed in CLOSED},
}


def advance(current: RunState, wanted: RunState) -> RunState:
    """The state after asking for ``wanted``: it, if allowed from ``current``; else ``current``."""
    return wanted if wanted in _NEXT[current] else current


class RunInvoice(BaseModel):
    """The invoice facts a run decides from. No contact details: those live in the database."""

    model_config = ConfigDict(frozen=True)

    invoice_id: str
    customer_id: str
    currency: str
    amount_due: Decimal
    issued_on: date
    due_on: date
    anchor: datetime  # the instant step offsets count from, fixed at start
    payment_url: str
    # The currency's decimal places as Babel had them at start: payments are checked against
    # these, never against the installed Babel on a replay (None: a run started before this).
    minor_digits: int | None = None

    @property
    def workflow_id(self) -> str:
        return f"dunning-{self.invoice_id}"


class ScheduledStep(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: Step
    at: datetime


class RunSnapshot(BaseModel):
    """The run as the database mirrors it. ``seq`` orders snapshots: an older one never wins."""

    model_config = ConfigDict(frozen=True)

    seq: int
    state: RunState
    stage: str | None
    balance_due: Decimal
    paid: Decimal


class RunRecord(BaseModel):
    """An audit entry the workflow wants written, with the run's snapshot after it.

    ``conditional``: a prediction (the state after a handoff the agency accepted); written only
    if no newer snapshot is already there, so a payment that overtook it is never overwritten.
    """

    model_config = ConfigDict(frozen=True)

    event: AuditEvent | None = None  # None: only the snapshot (a balance that grew by interest)
    snapshot: RunSnapshot | None = None
    conditional: bool = False


class AgencyNote(BaseModel):
    """Something the agency must hear about an account it holds: a payment, or a recall."""

    model_config = ConfigDict(frozen=True)

    key: str  # the ledger step: "payment:<id>" or "recall"
    purpose: str  # models.delivery.Purpose value
    payment: PaymentReceived | None = None
    reason: str = ""


class RecordBatch(BaseModel):
    """Records of one run written when no delivery can carry them (a local activity's input)."""

    model_config = ConfigDict(frozen=True)

    invoice: RunInvoice
    records: tuple[RunRecord, ...]


class Carried(BaseModel):
    """What a run hands to its next run when it continues as new (a long or busy history)."""

    state: RunState = RunState.ACTIVE
    stage: str | None = None
    next_index: int = 0
    paid: Decimal = Decimal(0)
    payment_ids: list[str] = []
    duplicates_recorded: list[str] = []
    seq: int = 0
    last_notice_at: datetime | None = None
    agency_holds: bool = False
    agency_queue: list[AgencyNote] = []
    closes_at: datetime | None = None
    published: dict[str, object] = {}
    pending: list[RunRecord] = []
    cancel_reason: str = ""
    adjusted: Decimal = Decimal(0)  # credited (an upheld dispute) or written off
    shift: float = 0.0  # seconds the schedule moved for holds that ended
    hold: Hold | None = None
    holds: int = 0
    escalate_index: int | None = None
    reversals: dict[str, Decimal] = {}  # what each reversal key (a refunded charge, a lost dispute) took back
    reopened_by: str | None = None  # the reversal that reopened a paid run (audit keys of its own)
    notice_step: str | None = None  # the step whose message is the latest notice
    notice_before: datetime | None = None  # the notice before it (if that message is refused later)
    fallbacks_sent: list[str] = []  # steps whose fallback reached the customer after a refusal
    costs: list[Dated] = []  # step fees charged (FeeTerms)
    dated_payments: list[Dated] = []  # payments and reversals with their dates (interest needs them)
    customer_holds: list[str] = []  # holds on the customer: no contact, no handoff


class DunningRun(BaseModel):
    """The workflow input: the invoice, the policy and the schedule resolved when the run started."""

    model_config = ConfigDict(frozen=True)

    invoice: RunInvoice
    policy: Policy
    schedule: tuple[ScheduledStep, ...]
    carried: Carried | None = None
    terms: FeeTerms | None = None  # fees and interest, resolved at start (None: none charged)


class CustomerNotice(BaseModel):
    """Input of the one-shot run that sends a customer the one message a hold allows (the
    confirmation that we stop contacting them), about one of their open invoices."""

    model_config = ConfigDict(frozen=True)

    invoice: RunInvoice
    step: str
    template: str
    balance_due: Decimal
    contact: ContactRules | None = None


class HoldStatus(BaseModel):
    """The hold a run is in, as `dunning status` shows it."""

    kind: str
    since: datetime
    until: datetime | None = None  # a pause's end, a promise's deadline, a plan's next moment
    reason: str = ""
    actor: str = ""
    amount: str | None = None
    # a plan: its instalments (date, amount) and what has been paid toward it since it began
    instalments: list[tuple[date, str]] = []
    paid_toward: Decimal | None = None


class NextStep(BaseModel):
    name: str
    channel: Channel
    at: datetime


class DunningStatus(BaseModel):
    """The live state of a run, as the ``status`` query and the CLI report it."""

    invoice_id: str
    workflow_id: str
    state: RunState
    stage: str | None
    balance_due: Decimal
    amount_due: Decimal
    paid: Decimal
    credit: Decimal
    currency: str
    next_step: NextStep | None
    policy: str
    policy_version: int
    customer_id: str
    detail: str = ""  # why a run is failed or waiting, in words
    awaiting_retry: bool = False  # a delivery failed for good: the run waits for `dunning retry`
    adjusted: Decimal = Decimal(0)  # credited or written off
    hold: HoldStatus | None = None
    payment_ids: list[str] = []  # the payments counted (a reopened run keeps counting each once)
    reversals: dict[str, Decimal] = {}  # payments taken back, by reversal key
    customer_holds: list[str] = []  # holds on the customer (bankruptcy, ...): nothing is sent
    deferred_until: datetime | None = None  # a message waiting for the contact window or a cap
    deferred_because: str = ""
    # With fees or statutory interest (``balance_due`` is then the total): each part still unpaid.
    as_of: datetime | None = None  # the run's time these figures are for (interest accrues daily)
    principal: Decimal | None = None
    fees: Decimal = Decimal(0)
    interest: Decimal = Decimal(0)
    interest_rate: Decimal | None = None  # percent per year
    total_due: Decimal | None = None
    # ... and what they are worked out from, so a paid run reopened by a reversal carries them,
    # and a reader can work them out for a later moment (``at``).
    dated_payments: list[Dated] = []
    costs: list[Dated] = []
    terms: FeeTerms | None = None
    waived: bool = False  # written off or credited in whole: the fees and interest went with it

    def at(self, moment: datetime) -> DunningStatus:
        """The figures as they stand at ``moment``: the run answers as of its last step, and
        interest accrues by the day while it sleeps between steps (weeks), so a status read
        today shows today's interest and total. Unchanged without fees and interest, and for a
        moment before the run's own."""
        if self.terms is None or self.as_of is None or moment <= self.as_of:
            return self
        return self.worked_out(moment)

    def worked_out(self, moment: datetime) -> DunningStatus:
        """The fee and interest figures worked out afresh from the terms, the dated payments and
        the costs, at ``moment`` (for a status whose payments were added to after the run)."""
        assert self.terms is not None
        charges = account_charges(self.terms, self.amount_due - self.adjusted,
                                  [(p.at, p.amount) for p in self.dated_payments],
                                  [(c.at, c.amount) for c in self.costs], moment)
        charges = charges.waived() if self.waived else charges
        total = max(charges.total_due, Decimal(0))
        return self.model_copy(update={
            "as_of": moment, "principal": charges.principal, "fees": charges.fees,
            "interest": charges.interest, "interest_rate": charges.interest_rate, "total_due": total,
            "balance_due": total, "credit": charges.credit})



class PayOutcome(BaseModel):
    """The answer to the ``pay`` update: what became of the payment, and the run after it."""

    outcome: str  # models.payment.PaymentOutcome value
    detail: str
    status: DunningStatus


class AgencyNoticeRun(BaseModel):
    """Input of the one-shot run that tells the agency of a payment or a recall after the
    invoice's own run has ended (it held the account when it ended)."""

    model_config = ConfigDict(frozen=True)

    invoice: RunInvoice
    note: AgencyNote
    balance_due: Decimal
