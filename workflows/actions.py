"""The actions a run takes from outside, as Temporal Updates with validators.

Pay, pause, resume, dispute, resolve, promise, plan, write off and escalate: the caller waits for
the run's status after the action, or gets the reason it was refused (``models.action`` holds the
rules; a refused request leaves no trace in the history). An accepted action is written to the
audit trail with who asked and why, and its records reach the database before the caller hears
yes, so a delivery about to send already sees a pause.

This is a mixin of :class:`workflows.dunning.InvoiceDunningWorkflow`: the escalation reads top to
bottom there; what the world can do to a run is here.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from models.action import (
        Action,
        Cancel,
        Dispute,
        Escalate,
        Pause,
        PaymentPlan,
        Promise,
        Resolve,
        Resume,
        Reversal,
        RunView,
        WriteOff,
        refusal,
        whole,
    )
    from models.audit import AuditKind
    from models.charges import Charges, Dated, FeeTerms
    from models.delivery import DeliveryResult, Purpose
    from models.hold import Hold, HoldKind
    from models.payment import Account, PaymentOutcome, PaymentReceived, payment_problem
    from models.policy import Channel, Policy
    from models.run import (
        CLOSED,
        AgencyNote,
        DunningStatus,
        PayOutcome,
        RunInvoice,
        RunState,
        ScheduledStep,
    )


class RunActions:
    """Update handlers; the state they act on belongs to the workflow class."""

    _invoice: RunInvoice
    _policy: Policy
    _schedule: tuple[ScheduledStep, ...]
    _state: RunState
    _account: Account
    _hold: Hold | None
    _holds: int
    _next: int
    _escalate_index: int | None
    _taking_step: int | None
    _reversals: dict[str, Decimal]
    _terms: FeeTerms | None
    _dated_payments: list[Dated]
    _customer_holds: set[str]
    _flushing: bool
    _last_notice_at: datetime | None
    _handing_off: bool
    _handoff_deferred: bool
    _agency_holds: bool
    _agency_queue: list[AgencyNote]
    _replan: bool
    _waived: bool

    # -- the actions ---------------------------------------------------------------------------

    @workflow.update(name="pay")
    async def pay(self, payment: PaymentReceived) -> PayOutcome:
        """A payment, answered with its outcome and the balance after it (the ``payment_received``
        signal stays for fire-and-forget callers)."""
        outcome, detail = await self._take_payment(payment)
        return PayOutcome(outcome=outcome.value, detail=detail, status=self.status())

    @pay.validator
    def _check_pay(self, payment: PaymentReceived) -> None:
        problem = payment_problem(payment, self._invoice.currency, self._invoice.minor_digits)
        if problem is not None:
            raise ApplicationError(problem, type="ActionInvalid", non_retryable=True)

    @workflow.update(name="pause")
    async def pause(self, action: Pause) -> DunningStatus:
        until = f" until {action.until.isoformat()}" if action.until else ""
        self._record(action, "pause", until)
        self._begin_hold(RunState.PAUSED, self._new_hold(HoldKind.PAUSE, action, until=action.until),
                         f"paused{until}: {action.reason}")
        return await self._acted()

    @workflow.update(name="resume")
    async def resume(self, action: Resume) -> DunningStatus:
        self._record(action, "resume", "")
        self._end_hold(f"resumed by {action.actor or 'an operator'}")
        return await self._acted()

    @workflow.update(name="dispute")
    async def dispute(self, action: Dispute) -> DunningStatus:
        amount = f" of {action.amount} {self._invoice.currency}" if action.amount else ""
        self._record(action, "dispute", amount)
        self._begin_hold(RunState.DISPUTED, self._new_hold(HoldKind.DISPUTE, action, amount=action.amount),
                         f"disputed{amount}: {action.reason}")
        return await self._acted()

    @workflow.update(name="resolve")
    async def resolve(self, action: Resolve) -> DunningStatus:
        hold = self._hold
        assert hold is not None
        self._record(action, "resolve", f"{action.outcome}{': ' + action.note if action.note else ''}")
        if action.outcome == "rejected":
            self._end_hold("dispute rejected: escalation resumes")
            return await self._acted()
        credited = self._account.balance_due if whole(hold.amount, self._account.balance_due) \
            else Decimal(hold.amount or 0)
        self._account.adjust(credited)
        if self._account.settled:
            self._waive_charges()
            self._change(RunState.CANCELLED, f"dispute upheld: {credited} {self._invoice.currency} "
                                             "credited; nothing left to collect")
            self._recall_from_agency(f"dispute upheld: {action.note}")
        else:
            self._end_hold(f"dispute upheld: {credited} {self._invoice.currency} credited; "
                           f"balance {self._account.balance_due}")
            self._tell_agency_of_change(f"dispute:{self._seq}", f"dispute upheld: {credited} "
                                        f"{self._invoice.currency} credited")
        return await self._acted()

    @workflow.update(name="promise")
    async def promise(self, action: Promise) -> DunningStatus:
        detail = f"{action.amount} {self._invoice.currency} by {action.by.isoformat()} ({action.source})"
        self._record(action, "promise", detail)
        self._begin_hold(RunState.PROMISED, self._new_hold(
            HoldKind.PROMISE, action, until=action.deadline, amount=action.amount,
            paid_before=self._account.paid), f"promised to pay {detail}")
        return await self._acted()

    @workflow.update(name="plan")
    async def plan(self, action: PaymentPlan) -> DunningStatus:
        parts = ", ".join(f"{i.amount} on {i.due_on.isoformat()}" for i in action.instalments)
        self._record(action, "plan", parts)
        self._begin_hold(RunState.ON_PLAN, self._new_hold(
            HoldKind.PLAN, action, instalments=action.instalments, paid_before=self._account.paid),
            f"on a payment plan: {parts}"[:1000])
        return await self._acted()

    @workflow.update(name="write-off")
    async def write_off(self, action: WriteOff) -> DunningStatus:
        balance = self._account.balance_due
        amount = balance if whole(action.amount, balance) else Decimal(action.amount or 0)
        self._account.adjust(amount)  # first: the entry's snapshot is what the next message quotes
        self._record(action, "write-off", f"{amount} {self._invoice.currency}")
        if self._account.settled:
            self._waive_charges()
            self._change(RunState.WRITTEN_OFF, f"written off: {action.reason}")
            self._recall_from_agency(f"written off: {action.reason}")
        else:
            self._tell_agency_of_change(f"write-off:{self._seq}", f"{amount} {self._invoice.currency} "
                                        f"written off: {action.reason}")
        return await self._acted()

    @workflow.update(name="escalate")
    async def escalate(self, action: Escalate) -> DunningStatus:
        index = self._escalation_target()
        self._record(action, "escalate", f"{self._schedule[index].step.name} now")
        self._escalate_index = index
        self._replan = True
        return await self._acted()

    def _escalation_target(self) -> int:
        """The step an escalation runs: the next one, or the one after a step being sent now."""
        return self._next + 1 if self._taking_step == self._next else self._next

    @workflow.update(name="reverse")
    async def reverse(self, action: Reversal) -> DunningStatus:
        """A payment taken back (a refund, a lost chargeback): the balance is owed again."""
        total = Decimal(action.total)
        taken = total - self._reversals.get(action.key, Decimal(0))
        if taken <= 0:
            return self.status()  # already applied: a provider's redelivery or a retried request
        self._reversals[action.key] = total
        self._account.paid -= taken
        if self._terms is not None:  # the principal is owed again from now
            self._dated_payments.append(Dated(at=workflow.now(), amount=-taken, what=action.key))
        self._record(action, "reverse", f"{taken} {self._invoice.currency} ({action.key})")
        self._tell_agency_of_change(f"reversal:{action.key}:{total}", f"{taken} {self._invoice.currency} "
                                    f"taken back ({action.key}): owed again")
        self._note(AuditKind.PAYMENT, "reversed", f"{taken} {self._invoice.currency} taken back "
                   f"({action.key}); balance {self._account.balance_due}", snapshot=True)
        return await self._acted()

    @workflow.update(name="cancel-run")
    async def cancel_run(self, action: Cancel) -> DunningStatus:
        """Stop dunning (the ``cancel`` signal stays for fire-and-forget callers): answered with
        the status after it, the agency recalled if it holds the account."""
        self._record(action, "cancel", "")
        await self._cancel(action.reason)
        return self.status()

    @cancel_run.validator
    def _check_cancel(self, action: Cancel) -> None:
        self._check(action)

    @workflow.signal(name="send_pay_link")
    async def send_pay_link(self, call_sid: str) -> None:
        """The customer pressed 1 during a call: text them the pay link, once per call (the
        ledger key names the call), unless the run has closed or is held meanwhile."""
        if self._state in CLOSED or not call_sid:
            return
        call = hashlib.sha256(call_sid.encode()).hexdigest()[:16]
        await self._deliver(f"pay_link_{call}", "pay_link", Purpose.REMINDER, (Channel.SMS,),
                            operator=False)

    @workflow.signal(name="customer_holds")
    async def customer_holds(self, kinds: list[str]) -> None:
        """The holds on this run's customer now (the whole set, so repeats and reordering are
        harmless). While any is on nothing is sent and nothing is handed off; payments still
        count. When the last is released the run goes on by the usual rule: no shift, overtaken
        reminders skipped, the agency notice period still applies."""
        # Signals can cross (two operators at once) or follow a stale stopped send: the run
        # reads the holds from the database rather than trusting the order they came in.
        await self._recheck_holds()

    @workflow.signal(name="delivery_refused")
    async def delivery_refused(self, step: str, channel: str) -> None:
        """Twilio reported an SMS it had accepted as undelivered, or a call nobody answered:
        the step falls back."""
        if self._state in CLOSED:
            return
        if channel not in {c.value for c in Channel}:  # a direct caller's typo must not fail the task
            self._note(AuditKind.COMMUNICATION, "rejected",
                       f"delivery_refused: unknown channel {channel!r:.40}", step=step[:64])
            await self._flush()
            return
        await self._fall_back(step, channel)

    # -- validators: one rule book (models.action) -------------------------------------------------

    @pause.validator
    def _check_pause(self, action: Pause) -> None:
        self._check(action)

    @resume.validator
    def _check_resume(self, action: Resume) -> None:
        self._check(action)

    @dispute.validator
    def _check_dispute(self, action: Dispute) -> None:
        self._check(action)

    @resolve.validator
    def _check_resolve(self, action: Resolve) -> None:
        self._check(action)

    @promise.validator
    def _check_promise(self, action: Promise) -> None:
        self._check(action)

    @plan.validator
    def _check_plan(self, action: PaymentPlan) -> None:
        self._check(action)

    @write_off.validator
    def _check_write_off(self, action: WriteOff) -> None:
        self._check(action)

    @escalate.validator
    def _check_escalate(self, action: Escalate) -> None:
        self._check(action)

    @reverse.validator
    def _check_reverse(self, action: Reversal) -> None:
        self._check(action)

    def _check(self, action: Action) -> None:
        refused = refusal(action, RunView(
            invoice_id=self._invoice.invoice_id, state=self._state,
            balance_due=self._account.balance_due, currency=self._invoice.currency,
            total_due=self._balance() if self._terms is not None else None,
            # a handoff waiting for the contact window has posted nothing: a dispute or pause
            # may still stop it (it can wait hours, a weekend on business days)
            now=workflow.now(), handing_off=self._handing_off and not self._handoff_deferred,
            next_step=(self._schedule[target] if (target := self._escalation_target()) < len(self._schedule)
                       else None),
            last_notice_at=self._last_notice_at, agency_notice=self._policy.agency_notice,
            promise_max=self._policy.promise_max, paid=self._account.paid, reversals=self._reversals,
        ))
        if refused is not None:
            raise ApplicationError(refused.reason, type=refused.problem.value, non_retryable=True)

    # -- helpers -------------------------------------------------------------------------------

    def _new_hold(self, kind: HoldKind, action: Action, **fields: object) -> Hold:
        return Hold(kind=kind, number=self._holds + 1, since=workflow.now(), reason=action.reason,
                    actor=action.actor, **fields)  # type: ignore[arg-type]

    def _record(self, action: Action, name: str, what: str) -> None:
        """The trail's entry for an action: who asked, what, and why."""
        who = action.actor or "unknown"
        why = f": {action.reason}" if action.reason else ""
        self._note(AuditKind.ACTION, name, f"{who}{' ' + what.strip() if what.strip() else ''}{why}"[:1000],
                   snapshot=True)

    def _recall_from_agency(self, reason: str) -> None:
        if self._agency_may_hold():
            self._agency_queue.append(AgencyNote(key="recall", purpose=Purpose.RECALL.value,
                                                 reason=reason[:500]))

    def _waive_charges(self) -> None:
        """The principal is written off or credited in whole: the fees and interest go with it
        (the run showed them still owed on a written-off invoice)."""
        if self._terms is None or not workflow.patched("write-off-waives-charges"):
            return
        left = self._charges()
        self._waived = True
        if left is not None and (left.fees or left.interest):
            self._note(AuditKind.PAYMENT, "fees_waived", f"fees {left.fees} and interest {left.interest} "
                       f"{self._invoice.currency} waived with the principal", snapshot=True)

    def _tell_agency_of_change(self, key: str, reason: str) -> None:
        """What the customer owes changed without a payment (a part written off, a payment taken
        back): an agency that holds the account is told the new balance, or it goes on
        collecting the old one."""
        if self._agency_may_hold() and workflow.patched("agency-told-of-adjustments"):
            self._agency_queue.append(AgencyNote(key=f"adjustment:{key}", purpose=Purpose.ADJUSTMENT.value,
                                                 reason=reason[:500]))

    async def _acted(self) -> DunningStatus:
        """Publish and write the action's records, then answer with the run's status. A flush
        already running may have started before these records: wait for it, then flush, so the
        database (which a delivery checks just before sending) has them before the caller hears."""
        self._publish()
        await workflow.wait_condition(lambda: not self._flushing)
        await self._flush()
        return self.status()

    if TYPE_CHECKING:  # provided by the workflow class
        def status(self) -> DunningStatus: ...
        def _publish(self) -> None: ...
        def _agency_may_hold(self) -> bool: ...
        def _balance(self) -> Decimal: ...
        def _charges(self) -> Charges | None: ...
        async def _flush(self) -> None: ...
        def _change(self, state: RunState, detail: str) -> None: ...
        def _note(self, kind: AuditKind, status: str, detail: str, *, step: str | None = None,
                  channel: str | None = None, snapshot: bool = False) -> None: ...
        def _begin_hold(self, state: RunState, hold: Hold, detail: str) -> None: ...
        def _end_hold(self, detail: str) -> None: ...
        async def _take_payment(self, payment: PaymentReceived) -> tuple[PaymentOutcome, str]: ...
        async def _fall_back(self, step_key: str, channel: str) -> None: ...
        async def _cancel(self, reason: str) -> None: ...
        async def _recheck_holds(self) -> None: ...
        async def _deliver(self, step: str, template: str, purpose: Purpose,
                           channels: tuple[Channel, ...], *, operator: bool = True,
                           ) -> DeliveryResult | None: ...
