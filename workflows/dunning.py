"""The escalation of one overdue invoice, read top to bottom like the policy it follows.

For each step of the schedule fixed when the run started, in order: wait until the step's time,
or until the invoice is paid or the run cancelled; skip the step if a later reminder is already
due (a late enrolment or a long outage must not cause a burst of old reminders); otherwise send
it. The agency handoff comes last and only after a message reached the customer at least the
policy's ``agency_notice`` earlier. After the last step the run keeps listening for payments for
the policy's ``close_after``.

Payments and cancellations arrive as signals at any moment. They change the state at once (paid
and cancelled are final), cancel a reminder in flight, and are written to the database within
moments so a delivery about to send sees them. All I/O happens in activities; this module only
decides. Audit records ride on the next delivery, or go out in a local activity when none is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, CancelledError, RetryState
from temporalio.exceptions import TimeoutError as ActivityTimedOut
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from models.audit import AuditEvent, AuditKind, audit_key
    from models.charges import Charges, Dated, account_charges
    from models.delivery import (
        DeliveryRequest,
        DeliveryResult,
        DeliveryStatus,
        InstalmentDue,
        Purpose,
        halts,
    )
    from models.hold import Hold, HoldKind, Moment, MomentKind, covered, next_moment, promise_kept
    from models.payment import Account, PaymentOutcome, PaymentReceived, read_payment
    from models.policy import Channel, Step
    from models.run import (
        CLOSED,
        AgencyNote,
        Carried,
        DunningRun,
        DunningStatus,
        HoldStatus,
        NextStep,
        RecordBatch,
        RunRecord,
        RunSnapshot,
        RunState,
        advance,
    )
    from models.schedule import Plan
    from workflows import search
    from workflows.actions import RunActions

# A delivery retries quickly at first (a restarted worker picks it up in about a second), then
# backs off; it gives up at its deadline (the next step's time, at most a day) so the run can
# decide again instead of sending a stale reminder after an outage.
DELIVERY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10), non_retryable_error_types=["DeliveryBroken"],
)
DELIVERY_START_TO_CLOSE = timedelta(seconds=60)  # a few provider calls of 10 s each, with lookups
DELIVERY_HEARTBEAT = timedelta(seconds=5)  # a dead worker is noticed this fast
DELIVERY_WINDOW = timedelta(days=1)  # longest a delivery retries before the run re-plans
SHORTEST_WINDOW = timedelta(seconds=10)
# Messages that reach the customer, and so wait for their contact window and caps.
CONTACTS = frozenset({Purpose.REMINDER, Purpose.HANDOFF, Purpose.INSTALMENT})
AGENCY_NEWS = frozenset({Purpose.PAYMENT_REPORT, Purpose.RECALL, Purpose.ADJUSTMENT})  # always go out


def delivery_options(window: timedelta) -> dict[str, Any]:
    """How every ``deliver`` activity is run: heartbeated, retried, and given up after ``window``
    (one place, so the invoice run and the after-close agency run cannot drift apart)."""
    return {"start_to_close_timeout": DELIVERY_START_TO_CLOSE, "heartbeat_timeout": DELIVERY_HEARTBEAT,
            "schedule_to_close_timeout": max(window, SHORTEST_WINDOW), "retry_policy": DELIVERY_RETRY}


def ran_out_of_time(err: ActivityError) -> bool:
    """The delivery retried up to its window. When the next retry would pass the window, Temporal
    fails it with the last failure as the cause, so the retry state says it, not the cause's type."""
    return isinstance(err.cause, ActivityTimedOut) or err.retry_state == RetryState.TIMEOUT


# Holds on a customer that also end the agency's collection of an account it already holds.
STOPS_AGENCY = frozenset({"bankruptcy", "deceased"})
AGAIN_AFTER_STOP = timedelta(seconds=10)  # never a tight loop of sends stopped by the database
# A held run re-reads the customer's holds this often: only a release whose signal was missed
# waits for it (a missed hold is caught by the next send, which the database stops), so a week
# keeps a years-long hold (a bankruptcy) to a few history events a week.
HOLD_RECHECK = timedelta(days=7)
RECORD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))
RECORD_TIMEOUT = timedelta(seconds=10)


class Wake(Enum):
    """Why a wait ended."""

    DUE = "due"  # its time came
    CLOSED = "closed"  # the run was paid, cancelled or written off
    CHANGED = "changed"  # an action changed the plan (a hold began or ended, an escalation)


@workflow.defn
class InvoiceDunningWorkflow(RunActions):
    @workflow.init
    def __init__(self, run: DunningRun) -> None:
        self._invoice = run.invoice
        self._policy = run.policy
        self._contact = run.policy.contact  # the contact rules every customer delivery carries
        self._schedule = run.schedule
        carried = run.carried or Carried()
        self._plan = Plan(run.schedule, run.policy.agency_notice, timedelta(seconds=carried.shift))
        self._account = Account(currency=self._invoice.currency, amount_due=self._invoice.amount_due,
                                paid=carried.paid, payment_ids=set(carried.payment_ids),
                                adjusted=carried.adjusted, digits=self._invoice.minor_digits)
        self._state = carried.state
        self._stage = carried.stage
        self._next = carried.next_index  # index into the schedule of the step not yet done
        self._seq = carried.seq  # orders records and the database's snapshots of this run
        self._snapshot_seq = carried.seq  # the newest snapshot this run has made
        self._last_notice_at = carried.last_notice_at
        self._agency_holds = carried.agency_holds
        self._agency_queue = list(carried.agency_queue)
        self._closes_at = carried.closes_at
        self._published = dict(carried.published) or search.at_start(self._invoice)
        self._pending = list(carried.pending)
        self._duplicates = set(carried.duplicates_recorded)
        self._cancel_reason = carried.cancel_reason
        self._hold = carried.hold  # a pause, dispute, promise or plan (models.hold)
        self._holds = carried.holds
        self._escalate_index = carried.escalate_index  # a step an operator asked to run now
        self._reversals = dict(carried.reversals)  # payments taken back, by reversal key
        self._reopened_by = carried.reopened_by  # a paid run reopened by this reversal
        self._customer_holds = set(carried.customer_holds)  # holds on the customer (all invoices)
        self._terms = run.terms  # fees and statutory interest (None: the invoice's amount only)
        self._costs = list(carried.costs)  # step fees charged
        # The fee of the reminder going out now: the total it quotes includes it, and so does
        # every snapshot written meanwhile (the delivery reads its total from the runs table).
        self._quoting = Decimal(0)
        self._waived = False  # written off or credited in whole: fees and interest went with it
        self._dated_payments = list(carried.dated_payments)
        self._notice_step = carried.notice_step  # the step whose message set _last_notice_at
        self._notice_before = carried.notice_before  # the notice time before that one
        self._fallbacks_sent = set(carried.fallbacks_sent)  # their fees stand, whatever is reported
        self._handing_off = False
        self._handoff_deferred = False  # the handoff waits for the contact window: nothing posted yet
        self._taking_step: int | None = None  # the step being sent right now
        self._flushing = False
        self._retry_requested = False
        self._held = False
        self._replan = False
        self._detail = ""
        self._deferred: tuple[datetime, str] | None = None  # a message waiting for the contact rules
        # Messages waiting for the contact rules now: no continue-as-new meanwhile, since a
        # message half-way through being sent is not carried (a plan reminder would be lost).
        self._sends_waiting = 0
        self._main: asyncio.Task[Any] | None = None  # the run's own task; handlers run beside it

    @workflow.run
    async def run(self, run: DunningRun) -> DunningStatus:
        self._main = asyncio.current_task()
        self._show()
        while self._state not in CLOSED:
            if self._hold is not None:  # its moments go on; a customer hold stops their sends
                await self._sit_out_hold()
            elif self._customer_holds:  # nothing is sent or handed off for this customer meanwhile
                if await self._sit_out_customer_hold():
                    break
            elif self._next < len(self._schedule):
                wake = await self._wait_until(self._due(self._next), self._plan.summary(self._next))
                if wake is not Wake.DUE:
                    continue
                if await self._take_step(self._next):
                    self._next += 1
                    if self._escalate_index is not None and self._escalate_index < self._next:
                        self._escalate_index = None
                    self._publish()
                elif (self._hold is None and not self._customer_holds
                      and workflow.patched("again-after-stop")):  # a hold that ended meanwhile
                    await self._wait_until(workflow.now() + AGAIN_AFTER_STOP, "send the stopped step again")
            else:
                if self._closes_at is None:
                    self._closes_at = workflow.now() + self._policy.close_after
                if await self._wait_until(self._closes_at, "listen for payments") is Wake.DUE:
                    break
        if self._state is RunState.ACTIVE:
            self._change(RunState.EXHAUSTED, "every step done; nothing more to send")
        await self._finish()
        return self.status()

    async def _sit_out_customer_hold(self) -> bool:
        """Wait while the customer is held, re-reading the database now and then; a run only
        listening for payments still ends at its time. True when the listening time is over."""
        listening = self._next >= len(self._schedule)
        if listening and self._closes_at is None:
            self._closes_at = workflow.now() + self._policy.close_after
        until = workflow.now() + HOLD_RECHECK
        if listening and self._closes_at is not None:
            until = min(until, self._closes_at)
        kinds = ", ".join(sorted(self._customer_holds))
        if await self._wait_until(until, f"customer hold: {kinds}") is not Wake.DUE:
            return False
        if listening and self._closes_at is not None and workflow.now() >= self._closes_at:
            return True
        await self._recheck_holds()
        return False

    def _due(self, index: int) -> datetime:
        """When step ``index`` runs: its time in the (shifted) schedule, or now if escalated."""
        at = self._plan.time_of(index, self._last_notice_at)
        if self._escalate_index == index:
            return min(at, workflow.now())
        return at

    # -- the steps -----------------------------------------------------------------------------

    async def _take_step(self, index: int) -> bool:
        """Run step ``index``; False when a hold stopped it (it runs again after the hold)."""
        self._taking_step = index
        try:
            return await self._run_step(index)
        finally:
            self._taking_step = None

    async def _run_step(self, index: int) -> bool:
        step = self._schedule[index].step
        if step.channel is Channel.AGENCY:
            return await self._hand_off(step)
        if self._plan.overtaken(index, workflow.now()) and self._escalate_index != index:
            self._note(AuditKind.COMMUNICATION, "skipped", "a later step was already due",
                       step=step.name, channel=step.channel.value)
            return True
        fee = self._quoting = self._fee_due(step.name)
        try:
            carry_on = await self._remind(index, step)
        finally:
            self._quoting = Decimal(0)
        if fee and self._fee_due(step.name) and workflow.patched("fee-quoted-not-charged"):
            # the mirror showed the total with the fee the message would charge, and it was not
            # sent: show the total without it again
            self._pending.append(RunRecord(snapshot=self._snapshot()))
            await self._flush()
        return carry_on

    async def _remind(self, index: int, step: Step) -> bool:
        """Send the step's reminder, quoting its fee (``_quoting``); False when a hold stopped it
        (the step runs again)."""
        while True:
            result = await self._deliver(step.name, step.template, Purpose.REMINDER, step.channels,
                                         deadline=self._plan.deadline(index), letter=step.letter,
                                         fee=self._quoting)
            if result is not None:
                break
            if self._state in CLOSED:
                return True
            now = workflow.now()
            if self._plan.overtaken(index, now) or self._plan.past_halfway(index, now):
                self._note(AuditKind.COMMUNICATION, "skipped",
                           "could not be delivered before the next step was near",
                           step=step.name, channel=step.channel.value)
                return True
        if result.status is DeliveryStatus.STOPPED and self._state not in CLOSED:
            return False  # a hold stopped it (it may have ended already): the step runs again
        if result.status is DeliveryStatus.DEFERRED:  # the rules allow it only after the next step
            self._note(AuditKind.COMMUNICATION, "skipped",
                       f"deferred past the next step ({result.detail})"[:1000],
                       step=step.name, channel=step.channel.value)
            return True
        if result.status in (DeliveryStatus.SENT, DeliveryStatus.UNKNOWN):
            self._stage = step.name
            if result.status is DeliveryStatus.SENT:
                self._noticed(step.name)
                if self._state not in CLOSED or not workflow.patched("no-fee-once-closed"):
                    self._charge_fee(step.name)  # not on a run paid or cancelled while it went out
        elif result.status is DeliveryStatus.FAILED:
            self._note(AuditKind.COMMUNICATION, "skipped",
                       f"no channel could reach the customer ({result.detail})"[:1000],
                       step=step.name, channel=step.channel.value)
        return True

    def _fee_due(self, step: str) -> Decimal:
        """The fee sending ``step`` charges: the policy's step fee, once per step (workflow state,
        so neither a retried delivery nor a replay can charge it twice)."""
        if self._terms is None or self._charged(step):
            return Decimal(0)
        return self._terms.step_fee

    def _charge_fee(self, step: str) -> None:
        """Charge the step's fee once its message was sent (the message quoted it already)."""
        fee = self._fee_due(step)
        if not fee:
            return
        self._costs.append(Dated(at=workflow.now(), amount=fee, what=step))
        self._quoting = Decimal(0)  # charged now: no longer only quoted
        self._note(AuditKind.PAYMENT, "fee", f"{fee} {self._invoice.currency} for {step}; "
                   f"total due {self._balance()}", step=step, snapshot=True)
        self._publish()

    def _charges(self, fee: Decimal = Decimal(0)) -> Charges | None:
        """Principal, fees and interest now (None when the run charges neither); with ``fee``, as
        they will be once a message that charges it is sent."""
        if self._terms is None:
            return None
        costs = [(c.at, c.amount) for c in self._costs] + ([(workflow.now(), fee)] if fee else [])
        charges = account_charges(self._terms, self._account.owed,
                                  [(p.at, p.amount) for p in self._dated_payments], costs, workflow.now())
        return charges.waived() if self._waived else charges

    def _balance(self, charges: Charges | None = None) -> Decimal:
        """What the customer owes now: with fees or interest, the total (from ``charges`` when
        the caller has them already); else the balance."""
        charges = charges or self._charges()
        return max(charges.total_due, Decimal(0)) if charges else self._account.balance_due

    def _adopt_holds(self, kinds: set[str]) -> None:
        """The customer's holds as the database has them (a signal, a stopped send, a re-check)."""
        if kinds == self._customer_holds:
            return
        before, self._customer_holds = self._customer_holds, kinds
        self._note(AuditKind.STATE, "customer_hold" if kinds else "customer_released",
                   f"holds on the customer: {', '.join(sorted(kinds)) or 'none'} "
                   f"(were {', '.join(sorted(before)) or 'none'})")
        stopping = sorted((kinds - before) & STOPS_AGENCY)
        # one during the handoff's post is queued too: it goes out if the agency took the account
        during_handoff = bool(stopping) and self._handing_off and workflow.patched("hold-during-handoff")
        if stopping and (self._agency_holds or during_handoff) and workflow.patched("agency-stopped-by-hold"):
            # a bankrupt or deceased customer is not collected from: the agency gives it back
            self._recall_from_agency(f"customer hold: {', '.join(stopping)}; stop collecting")
        self._replan = True
        self._publish()

    async def _recheck_holds(self) -> None:
        """Read the customer's holds from the database (a local activity): signals can be missed
        or cross, the database is the truth."""
        kinds = await workflow.execute_local_activity(
            "customer_holds", self._invoice.customer_id, result_type=list[str],
            start_to_close_timeout=RECORD_TIMEOUT, retry_policy=RECORD_RETRY)
        self._adopt_holds(set(kinds))
        await self._flush()

    def _noticed(self, step: str) -> None:
        """A message of ``step`` reached the customer now (the agency notice counts from it)."""
        self._notice_before, self._notice_step = self._last_notice_at, step
        self._last_notice_at = workflow.now()

    async def _fall_back(self, step_key: str, channel: str) -> None:
        """The provider accepted a message and later could not deliver it (an SMS undelivered):
        it never reached the customer. If the run has not moved on from that step, its next
        channel is tried now; either way it no longer counts as the notice before a handoff."""
        name = step_key.split("@")[0]
        if self._notice_step == name:
            self._last_notice_at, self._notice_step = self._notice_before, None
            self._retime_handoff()
        index = self._next - 1
        moved_on = (index < 0 or self._schedule[index].step.name != name or self._taking_step is not None
                    or self._state is not RunState.ACTIVE)
        channels = self._schedule[index].step.channels if not moved_on else ()
        rest = channels[channels.index(Channel(channel)) + 1:] if Channel(channel) in channels else ()
        if moved_on or not rest:
            self._note(AuditKind.COMMUNICATION, "not_retried",
                       "the run has moved on" if moved_on else "no other channel for this step",
                       step=name, channel=channel)
            self._waive_fee(name)
            await self._flush()
            return
        step = self._schedule[index].step
        result = await self._deliver(step.name, step.template, Purpose.REMINDER, rest,
                                     deadline=self._plan.deadline(index), operator=False)
        if result is not None and result.status is DeliveryStatus.SENT:
            self._noticed(step.name)
            self._retime_handoff()
            if self._charged(step.name) and workflow.patched("undelivered-fee-waived"):
                self._fallbacks_sent.add(step.name)
        elif self._waive_fee(name):
            await self._flush()

    def _charged(self, step: str) -> list[Dated]:
        return [c for c in self._costs if c.what == step]

    def _waive_fee(self, step: str) -> bool:
        """The step's message never reached the customer: the fee charged for it is taken off
        (a reminder fee pays for a reminder received); True if it was. When a fallback channel
        reached them instead, the fee stands, however often the refusal is reported again."""
        charged = self._charged(step)
        if not charged or step in self._fallbacks_sent or not workflow.patched("undelivered-fee-waived"):
            return False
        self._costs = [c for c in self._costs if c.what != step]
        fee = sum((c.amount for c in charged), Decimal(0))
        self._note(AuditKind.PAYMENT, "fee_waived", f"{fee} {self._invoice.currency} for {step}: its "
                   f"message never reached the customer; total due {self._balance()}", step=step,
                   snapshot=True)
        self._publish()
        return True

    def _retime_handoff(self) -> None:
        """The notice the handoff counts from changed while the run waited: wake the main loop
        so it works the handoff's time out again (never sooner than ``agency_notice`` after the
        notice that reached the customer)."""
        if workflow.patched("fallback-retimes-handoff"):
            self._replan = True

    async def _hand_off(self, step: Step) -> bool:
        """Refer the account to the agency, then tell the customer, unless they paid meanwhile.
        False when a hold stopped it: the handoff runs again after the hold."""
        if self._last_notice_at is None:
            self._change(RunState.EXHAUSTED, "no handoff: no message ever reached the customer")
            return True
        minimum = self._policy.agency_min_balance.get(self._invoice.currency)
        if minimum is not None and self._account.balance_due < Decimal(minimum):
            self._change(RunState.EXHAUSTED, f"no handoff: the balance {self._account.balance_due} is "
                                             f"below the agency minimum {minimum} {self._invoice.currency}")
            return True
        handed = self._snapshot(RunState.HANDED_OFF, step.name)
        on_sent = (RunRecord(event=self._event(AuditKind.STATE, "handed_off",
                                               f"referred to the agency ({step.when})"),
                             snapshot=handed, conditional=True),)
        self._handing_off = True
        try:
            while (result := await self._deliver(step.name, step.template, Purpose.HANDOFF,
                                                 (Channel.AGENCY,), notice=step.notice,
                                                 on_sent=on_sent)) is None:
                pass  # an outage outlasted the delivery window: a handoff is never dropped
        finally:
            self._handing_off = False
        if result.status is not DeliveryStatus.SENT:
            self._agency_queue.clear()  # the agency never had the account: nothing to tell it
            return not (result.status is DeliveryStatus.STOPPED and self._state not in CLOSED)
        self._agency_holds = True
        if self._state in CLOSED:
            return True  # paid or cancelled during the handoff: the queued report or recall tells it
        self._state, self._stage = RunState.HANDED_OFF, step.name
        if self._snapshot_seq != handed.seq:  # a part payment overtook the state written with it
            self._note(AuditKind.STATE, RunState.HANDED_OFF.value, "referred to the agency",
                       snapshot=True)
            await self._flush()
        return True

    async def _deliver(
        self, step: str, template: str, purpose: Purpose, channels: tuple[Channel, ...], *,
        notice: tuple[Channel, ...] = (), payment: PaymentReceived | None = None, reason: str = "",
        on_sent: tuple[RunRecord, ...] = (), deadline: datetime | None = None,
        instalment: InstalmentDue | None = None, operator: bool = True, letter: bool = False,
        fee: Decimal = Decimal(0),
    ) -> DeliveryResult | None:
        """Run the delivery activity; None when it ran out of time (the caller re-plans).

        A reminder in flight is cancelled the moment the run closes or is held. A delivery
        that needs an operator puts the run in ``failed`` until ``dunning retry`` (unless
        ``operator`` is False: then it is noted and dropped). A cancelled
        delivery is waited for: a send already under way finishes and is recorded before the run
        moves on (or ends).
        """
        if self._reopened_by:  # a reopened run's messages are its own, not the paid run's
            step = f"{step}@{hashlib.sha256(self._reopened_by.encode()).hexdigest()[:8]}"
        asked_again = False
        while True:
            # The message quotes today's total with the fee it charges when sent (``fee``), so
            # paying the amount quoted settles the account; the mirror shows that total too, and
            # the claim reads it from there (a payment since is in it, and so is every invoice's
            # own fee in a message shared by several).
            charges = self._charges(fee)
            if charges is not None and purpose in CONTACTS:
                self._pending.append(RunRecord(snapshot=self._snapshot()))
            records, self._pending = tuple(self._pending), []
            request = DeliveryRequest(
                workflow_id=workflow.info().workflow_id, invoice=self._invoice, step=step,
                template=template, channels=channels, notice=notice, purpose=purpose,
                balance_due=self._balance(charges), as_of=workflow.now(), payment=payment,
                reason=reason, records=records, on_sent=on_sent, instalment=instalment,
                contact=self._contact if purpose in CONTACTS else None,
                charges=charges if purpose in CONTACTS else None,
                letter=letter, collections_after=self._collections_after() if letter else None,
            )
            window = min(DELIVERY_WINDOW, (deadline or workflow.now() + DELIVERY_WINDOW) - workflow.now())
            handle = workflow.start_activity(
                "deliver", request, result_type=DeliveryResult, **delivery_options(window),
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                summary=f"{purpose.value.replace('_', ' ')}: {step} by {' or '.join(channels)}"[:200],
            )
            if purpose in (Purpose.REMINDER, Purpose.INSTALMENT):
                await workflow.wait_condition(
                    lambda h=handle, p=purpose: (h.done() or halts(p, self._state)
                                                 or bool(self._customer_holds)))
                if not handle.done():
                    handle.cancel()
            try:
                result = await handle
                if (result.status is DeliveryStatus.STOPPED and result.customer_holds
                        and self._state not in CLOSED):
                    self._adopt_holds(set(result.customer_holds))
                if result.status is DeliveryStatus.DEFERRED and result.until is not None:
                    if deadline is not None and result.until >= deadline:
                        return result  # too late for this message: the caller skips it
                    handoff = purpose is Purpose.HANDOFF  # (a handler's deferral leaves the flag be)
                    self._handoff_deferred = self._handoff_deferred or handoff
                    try:
                        if not await self._defer(result.until, result.detail):
                            return DeliveryResult(status=DeliveryStatus.STOPPED,
                                                  detail="deferred, then stopped")
                    finally:
                        self._handoff_deferred = self._handoff_deferred and not handoff
                    continue  # ask again: the rules are judged anew when the time comes
                return result
            except ActivityError as err:
                self._pending[:0] = records  # keyed: writing them again is harmless
                if isinstance(err.cause, CancelledError):
                    return DeliveryResult(status=DeliveryStatus.STOPPED, detail="cancelled")
                if ran_out_of_time(err):
                    return None
                if not operator:  # an extra (a pay link asked for on a call): noted, not held for
                    self._note(AuditKind.COMMUNICATION, "failed",
                               str(err.cause.message if err.cause else err)[:1000], step=step)
                    return None
                stops = purpose not in AGENCY_NEWS  # agency news must go
                await self._hold_for_operator(str(err.cause.message if err.cause else err)[:500],
                                              stop_when_closed=stops)
                if stops and self._state in CLOSED:
                    if (purpose is Purpose.HANDOFF and not asked_again
                            and workflow.patched("handoff-asks-after-failure")):
                        # the agency may have taken the account before the failure (the customer's
                        # notice could not be rendered): ask the ledger once, which sends nothing
                        # on a closed run, so a payment or recall reaches the agency if it has it
                        asked_again = True
                        continue
                    return DeliveryResult(status=DeliveryStatus.STOPPED, detail="closed")

    def _collections_after(self) -> datetime | None:
        """When the handoff would come if the message being sent now reaches the customer (the
        date a final notice names); None when the policy has no agency step."""
        last = len(self._schedule) - 1
        if self._schedule[last].step.channel is not Channel.AGENCY:
            return None
        return max(self._plan.at(last), workflow.now() + self._policy.agency_notice)

    async def _defer(self, until: datetime, reason: str) -> bool:
        """Wait until the contact rules allow the message (the status shows when and why). False
        when the run closed or its plan changed meanwhile."""
        self._deferred = (until, reason)
        mid_send = int(workflow.patched("no-continue-as-new-mid-send"))
        self._sends_waiting += mid_send
        self._show()
        try:
            return await self._wait_until(until, f"deferred: {reason}") is Wake.DUE
        finally:
            self._deferred = None
            self._sends_waiting -= mid_send

    async def _hold_for_operator(self, reason: str, *, stop_when_closed: bool) -> None:
        """Wait for `dunning retry` after a delivery that cannot work as things are. An active run
        shows ``failed``; a handed-off or closed one keeps its state and says why in its details.
        A reminder stops waiting when the run is paid or cancelled; a report to the agency does
        not (it must still go out)."""
        self._held = True
        self._detail = f"failed: {reason} (fix it, then `dunning retry {self._invoice.invoice_id}`)"
        before = self._state
        self._change(RunState.FAILED, reason[:1000])
        if self._state is before:  # handed off or closed: the state stays, the trail says why
            self._note(AuditKind.COMMUNICATION, "failed", reason[:1000])
        self._publish()
        await self._flush()
        await workflow.wait_condition(
            lambda: self._retry_requested or (stop_when_closed and self._state in CLOSED))
        self._held = self._retry_requested = False
        self._detail = ""
        if self._state is RunState.FAILED:
            self._change(RunState.ACTIVE, "retried by an operator")

    async def _report_to_agency(self) -> None:
        """Tell the agency of payments on, or the recall of, an account it holds."""
        while self._agency_queue and self._agency_holds:
            note = self._agency_queue[0]
            while await self._deliver(note.key, "agency_handoff", Purpose(note.purpose),
                                      (Channel.AGENCY,), payment=note.payment,
                                      reason=note.reason) is None:
                pass
            self._agency_queue.pop(0)

    # -- time ----------------------------------------------------------------------------------

    async def _wait_until(self, at: datetime | None, summary: str) -> Wake:
        """Wait until ``at`` (None: until something happens) unless the run closes or an action
        changes the plan first; say which.

        Meanwhile: report to the agency, and continue as new when the history grows long.
        """
        if asyncio.current_task() is not self._main and workflow.patched("handler-waits-alone"):
            return await self._wait_in_handler(at, summary)
        while self._state not in CLOSED and not self._replan:
            await self._report_to_agency()
            await self._continue_as_new_if_suggested()
            delay = None if at is None else at - workflow.now()
            if delay is not None and delay <= timedelta(0):
                break
            try:
                await workflow.wait_condition(
                    lambda: (self._state in CLOSED or self._agency_due() or self._long_history()
                             or self._replan),
                    timeout=delay, timeout_summary=summary[:200] if delay is not None else None,
                )
            except TimeoutError:  # the builtin: the wait ran its full time
                break
        await self._report_to_agency()
        if self._state in CLOSED:
            return Wake.CLOSED
        if self._replan:
            self._replan = False
            return Wake.CHANGED
        return Wake.DUE

    async def _wait_in_handler(self, at: datetime | None, summary: str) -> Wake:
        """A signal handler's wait (a pay link or fallback deferred to the contact window): until
        ``at`` or until the run closes, nothing else. The agency, a long history and a changed
        plan are the main loop's: continuing as new waits for every handler to finish, so a
        handler that tried it would wait for itself, and a re-plan it consumed would never wake
        the main loop."""
        delay = None if at is None else at - workflow.now()
        if self._state not in CLOSED and (delay is None or delay > timedelta(0)):
            with contextlib.suppress(TimeoutError):  # the builtin: the wait ran its full time
                await workflow.wait_condition(lambda: self._state in CLOSED, timeout=delay,
                                              timeout_summary=summary[:200] if delay is not None else None)
        return Wake.CLOSED if self._state in CLOSED else Wake.DUE

    # -- holds ---------------------------------------------------------------------------------

    async def _sit_out_hold(self) -> None:
        """While a pause, dispute, promise or plan holds the run nothing escalates: wait for the
        hold's next moment (a pause's end, a promise's deadline, a plan's reminder or check) or
        for an action that ends it."""
        hold = self._hold
        assert hold is not None
        moment = next_moment(hold)
        if moment is None and hold.kind is HoldKind.PLAN and workflow.patched("plan-end-ends-hold"):
            # every instalment was met (a run with fees or interest still owes those): escalation
            # resumes for what is left (before, building the summary below failed the task)
            self._end_hold("the payment plan ended")
            self._publish()
            await self._flush()
            return
        summary = f"{hold.kind}: " + (f"{moment.kind} {moment.step}" if moment is not None and hold.kind
                                      is HoldKind.PLAN else "until it ends" if moment is None
                                      else "until its end")
        if await self._wait_until(moment.at if moment else None, summary) is not Wake.DUE:
            return
        if hold.kind is HoldKind.PAUSE:
            self._end_hold("the pause ended")
        elif hold.kind is HoldKind.PROMISE:
            await self._promise_due(hold)
        elif moment is not None:
            await self._plan_moment(hold, moment)
        self._publish()
        await self._flush()  # the trail and the database's mirror show the change now

    async def _promise_due(self, hold: Hold) -> None:
        """The promised day is over: kept, the run goes on for any remainder; broken, escalation
        resumes at once with a 'broken promise' message."""
        promised = f"{hold.amount} {self._invoice.currency}"
        if promise_kept(hold, self._account.paid):
            self._end_hold(f"promise kept: {promised} paid")
            return
        self._end_hold(f"promise broken: {promised} was not paid in time")
        told = workflow.patched("broken-promise-waits-for-window")
        if told:
            # The hold's end asks the main loop to re-plan, and this is the main loop: a message
            # deferred to the contact window must not take that for a change and be dropped
            # (with the default hours every broken promise, due at midnight, was).
            self._replan = False
        step = f"broken_promise_{hold.number}"
        result = await self._deliver(step, "broken_promise", Purpose.REMINDER, (Channel.EMAIL, Channel.SMS))
        if result is not None and result.status is DeliveryStatus.SENT:
            if workflow.patched("promise-notice-falls-back"):
                self._noticed(step)  # an SMS refused later is no notice
            else:
                self._last_notice_at = workflow.now()
        elif told and self._state not in CLOSED and (result is None
                                                     or result.status is DeliveryStatus.STOPPED):
            why = result.detail if result is not None else "its delivery ran out of time"
            self._note(AuditKind.COMMUNICATION, "skipped", f"the broken-promise message was not sent ({why})",
                       step=step)

    async def _plan_moment(self, hold: Hold, moment: Moment) -> None:
        """A payment plan's moment: remind of an unpaid instalment, or break the plan when one is
        still unpaid after the grace."""
        self._hold = hold.model_copy(update={"moments_done": hold.moments_done + 1})
        if covered(hold, moment.index, self._account.paid):
            return
        instalment = hold.instalments[moment.index]
        if moment.kind is MomentKind.CHECK:
            self._end_hold(f"payment plan broken: instalment {moment.index + 1} "
                           f"({instalment.amount} due {instalment.due_on}) unpaid")
            return
        following = next_moment(self._hold)
        await self._deliver(f"plan_{hold.number}_{moment.step}", "instalment_reminder",
                            Purpose.INSTALMENT, (Channel.EMAIL, Channel.SMS),
                            instalment=InstalmentDue(due_on=instalment.due_on, amount=instalment.amount),
                            deadline=following.at if following else None)

    def _begin_hold(self, state: RunState, hold: Hold, detail: str) -> None:
        self._holds = hold.number
        self._hold = hold
        self._change(state, detail)
        self._replan = True

    def _end_hold(self, detail: str) -> None:
        """Back to active; the schedule (and the end of listening) moves by the hold's length."""
        hold, self._hold = self._hold, None
        if hold is not None:
            held_for = max(workflow.now() - hold.since, timedelta(0))
            self._plan = replace(self._plan, shift=self._plan.shift + held_for)
            if self._closes_at is not None:
                self._closes_at += held_for
        self._change(RunState.ACTIVE, detail)
        self._replan = True

    def _agency_due(self) -> bool:
        return bool(self._agency_queue) and self._agency_holds

    def _agency_may_hold(self) -> bool:
        """The agency has the account, or may take it in the handoff being posted now. Not while
        the handoff waits for the customer's contact window: nothing is posted yet, and the
        referral will quote the balance as it is then (a payment reported besides it, one the
        referral already counts, could be taken off twice)."""
        if self._agency_holds:
            return True
        posting = not (self._handoff_deferred and workflow.patched("deferred-handoff-not-told"))
        return self._handing_off and posting

    # -- signals and queries -------------------------------------------------------------------

    @workflow.signal(name="payment_received")
    async def payment_received(self, raw: RawValue) -> None:
        """A payment from the billing system. Never raises and never drops: an unreadable one is
        recorded as rejected."""
        try:
            data = workflow.payload_converter().from_payload(raw.payload, None)
        except Exception as exc:
            data, problem = None, f"payment payload could not be decoded ({exc.__class__.__name__})"
        else:
            problem = ""
        payment, problem = read_payment(data) if data is not None else (None, problem or "empty payment")
        if payment is None:
            self._note(AuditKind.PAYMENT, PaymentOutcome.REJECTED.value, problem, snapshot=False)
            await self._flush()
            return
        await self._take_payment(payment)

    async def _take_payment(self, payment: PaymentReceived) -> tuple[PaymentOutcome, str]:
        """Count a payment once (by its id), tell the agency if it holds the account, record it."""
        paid_before = self._account.paid
        outcome, detail = self._account.apply(payment)
        if outcome is PaymentOutcome.DUPLICATE:
            if payment.payment_id in self._duplicates:
                return outcome, detail  # a webhook storm: the first duplicate is on record already
            self._duplicates.add(payment.payment_id)
        if outcome is PaymentOutcome.ACCEPTED and self._terms is not None:
            self._dated_payments.append(Dated(at=min(payment.paid_at, workflow.now()),
                                              amount=self._account.paid - paid_before,
                                              what=payment.payment_id))
            charges = self._charges()  # the credit is what was paid beyond fees and interest too
            assert charges is not None
            detail = self._account.describe(payment, self._balance(charges), charges.credit,
                                            what="total due with fees and interest")
        self._note(AuditKind.PAYMENT, outcome.value, detail, snapshot=True)
        if outcome is PaymentOutcome.ACCEPTED:
            if self._agency_may_hold():
                self._agency_queue.append(AgencyNote(key=f"payment:{payment.payment_id}",
                                                     purpose=Purpose.PAYMENT_REPORT.value,
                                                     payment=payment))
            if self._account.settled and self._balance() <= 0:
                self._change(RunState.PAID, f"balance settled by payment {payment.payment_id}")
        self._publish()
        await self._flush()
        return outcome, detail

    @workflow.signal(name="cancel")
    async def cancel(self, raw: RawValue) -> None:
        """Stop dunning this invoice (voided, written off, handled by hand). If the agency holds
        the account, it is recalled."""
        try:
            reason = str(workflow.payload_converter().from_payload(raw.payload, None) or "")
        except Exception:
            reason = "(unreadable reason)"
        if self._state in CLOSED:
            return
        await self._cancel(reason)

    async def _cancel(self, reason: str) -> None:
        self._cancel_reason = reason[:500]
        self._change(RunState.CANCELLED, f"cancelled: {self._cancel_reason}")
        self._recall_from_agency(self._cancel_reason)
        await self._flush()

    @workflow.signal(name="retry")
    def retry(self) -> None:
        """An operator fixed what made a delivery fail (`dunning retry`): try it again."""
        if self._held:
            self._retry_requested = True

    @workflow.query
    def status(self) -> DunningStatus:
        upcoming = None
        deferred = self._deferred
        charges = self._charges()
        if self._state is RunState.ACTIVE and self._next < len(self._schedule):
            step = self._schedule[self._next].step
            at = self._due(self._next)
            if deferred is not None and self._taking_step == self._next:
                at = deferred[0]
            upcoming = NextStep(name=step.name, channel=step.channel, at=at)
        return DunningStatus(
            invoice_id=self._invoice.invoice_id,
            workflow_id=workflow.info().workflow_id,
            state=self._state,
            stage=self._stage,
            balance_due=self._balance(charges),
            amount_due=self._account.amount_due,
            paid=self._account.paid,
            credit=charges.credit if charges else self._account.credit,
            currency=self._account.currency,
            next_step=upcoming,
            policy=self._policy.name,
            policy_version=self._policy.version,
            customer_id=self._invoice.customer_id,
            detail=self._detail or self._cancel_reason,
            awaiting_retry=self._held,
            adjusted=self._account.adjusted,
            hold=self._hold_status(),
            payment_ids=sorted(self._account.payment_ids),
            reversals=self._reversals,
            customer_holds=sorted(self._customer_holds),
            deferred_until=deferred[0] if deferred else None,
            deferred_because=deferred[1] if deferred else "",
            **({"as_of": workflow.now(), "principal": charges.principal, "fees": charges.fees,
                "interest": charges.interest, "interest_rate": charges.interest_rate,
                "total_due": self._balance(charges), "dated_payments": self._dated_payments,
                "costs": self._costs, "terms": self._terms, "waived": self._waived} if charges else {}),
        )

    def _hold_status(self) -> HoldStatus | None:
        hold = self._hold
        if hold is None:
            return None
        moment = next_moment(hold)
        plan = hold.kind is HoldKind.PLAN
        return HoldStatus(kind=hold.kind.value, since=hold.since, until=moment.at if moment else None,
                          reason=hold.reason, actor=hold.actor, amount=hold.amount,
                          instalments=[(item.due_on, item.amount) for item in hold.instalments],
                          paid_toward=self._account.paid - hold.paid_before if plan else None)

    # -- the record ----------------------------------------------------------------------------

    def _change(self, state: RunState, detail: str) -> None:
        """Move to ``state`` if the rules allow (paid and cancelled are final) and record it."""
        new = advance(self._state, state)
        if new is self._state:
            return
        self._state = new
        if new in CLOSED:
            self._hold = None
        self._note(AuditKind.STATE, new.value, detail, snapshot=True)
        self._publish()

    def _snapshot(self, state: RunState | None = None, stage: str | None = None) -> RunSnapshot:
        """The run for the runs table: with the fee of a reminder going out (``_quoting``), the
        total that reminder quotes, unless the run closed (then the fee is never charged)."""
        self._seq += 1
        self._snapshot_seq = self._seq
        state = state or self._state
        fee = self._quoting if state not in CLOSED else Decimal(0)
        return RunSnapshot(seq=self._seq, state=state, stage=stage or self._stage,
                           balance_due=self._balance(self._charges(fee)), paid=self._account.paid)

    def _event(self, kind: AuditKind, status: str, detail: str, step: str | None = None,
               channel: str | None = None) -> AuditEvent:
        workflow_id = workflow.info().workflow_id
        self._seq += 1
        # A reopened run's keys name the reversal that reopened it: never those of the run before.
        reopened = (self._reopened_by,) if self._reopened_by else ()
        return AuditEvent(
            key=audit_key(workflow_id, kind.value, status, self._seq, *reopened), workflow_id=workflow_id,
            invoice_id=self._invoice.invoice_id, at=workflow.now(), kind=kind, status=status,
            step=step, channel=channel, detail=detail,
        )

    def _note(self, kind: AuditKind, status: str, detail: str, *, step: str | None = None,
              channel: str | None = None, snapshot: bool = False) -> None:
        """Queue a record; it rides on the next delivery or the next flush."""
        event = self._event(kind, status, detail, step, channel)
        self._pending.append(RunRecord(event=event, snapshot=self._snapshot() if snapshot else None))

    async def _flush(self) -> None:
        """Write queued records now, in a local activity (one flush at a time; the running one
        picks up records queued meanwhile)."""
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._pending:
                batch, self._pending = tuple(self._pending), []
                await workflow.execute_local_activity(
                    "record", RecordBatch(invoice=self._invoice, records=batch),
                    start_to_close_timeout=RECORD_TIMEOUT, retry_policy=RECORD_RETRY,
                )
        finally:
            self._flushing = False

    async def _finish(self) -> None:
        """Before the run ends: every handler done, every record written, the agency told.
        Loops, because a payment can arrive while the last record is being written."""
        while True:
            await workflow.wait_condition(workflow.all_handlers_finished)
            if self._agency_due():
                await self._report_to_agency()
            elif self._pending:
                await self._flush()
            else:
                return

    def _publish(self) -> None:
        """Mirror the run into search attributes (no personal data), changed values only."""
        status = self.status()  # fees and interest worked out once for both
        values = search.current(status.state.value, status.stage, status.balance_due)
        changed = {k: v for k, v in values.items() if self._published.get(k) != v}
        if changed:
            workflow.upsert_search_attributes(search.updates(changed))
            self._published |= changed
        self._show(status)

    def _show(self, status: DunningStatus | None = None) -> None:
        """The run's current details in the Temporal UI."""
        status = status or self.status()
        upcoming = status.next_step
        workflow.set_current_details(
            f"**State** {status.state.value} · **Balance** {status.balance_due} {status.currency}"
            f" of {status.amount_due}\n\n**Last step** {status.stage or '-'} · **Next** "
            + (f"{upcoming.name} by {upcoming.channel} at {upcoming.at.isoformat()}"
               if upcoming else "-")
            + (f"\n\n**{status.hold.kind.title()}** since {status.hold.since.isoformat()}"
               + (f" until {status.hold.until.isoformat()}" if status.hold.until else "")
               + f": {status.hold.reason}" if status.hold else "")
            + (f"\n\n**Deferred** until {status.deferred_until.isoformat()}: {status.deferred_because}"
               if status.deferred_until else "")
            + (f"\n\n{status.detail}" if status.detail else "")
        )

    # -- long histories ------------------------------------------------------------------------

    def _long_history(self) -> bool:
        """Temporal suggests a fresh history, and no message is waiting half-way through its
        sending (it would be lost: it waits hours at most, for a window or a cap)."""
        return workflow.info().is_continue_as_new_suggested() and not self._sends_waiting

    async def _continue_as_new_if_suggested(self) -> None:
        """A run flooded with signals starts a fresh history, carrying everything it knows."""
        if not self._long_history():
            return
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(DunningRun(
            invoice=self._invoice, policy=self._policy, schedule=self._schedule,
            carried=Carried(
                state=self._state, stage=self._stage, next_index=self._next,
                paid=self._account.paid, payment_ids=sorted(self._account.payment_ids),
                duplicates_recorded=sorted(self._duplicates), seq=self._seq,
                last_notice_at=self._last_notice_at, agency_holds=self._agency_holds,
                agency_queue=self._agency_queue, closes_at=self._closes_at,
                published=self._published, pending=self._pending, cancel_reason=self._cancel_reason,
                adjusted=self._account.adjusted, shift=self._plan.shift.total_seconds(),
                hold=self._hold, holds=self._holds, escalate_index=self._escalate_index,
                reversals=self._reversals, reopened_by=self._reopened_by,
                notice_step=self._notice_step, notice_before=self._notice_before,
                fallbacks_sent=sorted(self._fallbacks_sent),
                customer_holds=sorted(self._customer_holds),
                costs=self._costs, dated_payments=self._dated_payments,
            ),
            terms=self._terms,
        ))
