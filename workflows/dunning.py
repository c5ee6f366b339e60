"""The escalation of one overdue invoice, read top to bottom like the policy it follows.

For each step of the policy, in order: wait until the step's time (counted from the due date), or
until the invoice is paid or the run cancelled; skip the step if a later one is already due (a late
enrolment or a long outage must not cause a burst of old reminders); otherwise send it, falling back
through the step's channels. After the last step the run keeps listening for payments for the
policy's ``close_after``. Payments arrive as signals at any moment, count once per payment id, and
end the run when the balance is settled.

All I/O happens in activities (``deliver``, ``record_event``); this module only decides.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from models.audit import AuditEvent, AuditKind
    from models.delivery import DeliveryRequest, DeliveryResult, DeliveryStatus, Purpose
    from models.payment import Account, PaymentOutcome, PaymentReceived
    from models.policy import Channel, Step
    from models.run import DunningRun, DunningStatus, NextStep, RunState
    from workflows import search

# Deliveries retry until they succeed or fail for good: a provider outage or a revoked API key
# delays reminders (loudly, in the UI) but never silently drops a customer.
DELIVERY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    non_retryable_error_types=["DeliveryRejected"],
)
RECORD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))
ACTIVITY_TIMEOUT = timedelta(seconds=60)

CLOSED = (RunState.PAID, RunState.CANCELLED)


@workflow.defn
class InvoiceDunningWorkflow:
    @workflow.init
    def __init__(self, run: DunningRun) -> None:
        self._invoice = run.invoice
        self._policy = run.policy
        self._schedule = run.policy.schedule(run.invoice.anchor())
        self._account = Account(currency=run.invoice.currency, amount_due=run.invoice.amount_due)
        self._state = RunState.ACTIVE
        self._stage: str | None = None
        self._next = 0  # index into the schedule of the step not yet reached
        self._signals = 0  # sequence number of payment signals, for unique audit keys
        self._published: dict[str, object] = {}
        self._cancel_reason = ""

    @workflow.run
    async def run(self, run: DunningRun) -> DunningStatus:
        self._publish()
        await self._record_state("started", f"policy {self._policy.name} v{self._policy.version}")

        for index, (step, at) in enumerate(self._schedule):
            self._next = index
            self._publish()
            if await self._wait_or_close(at - workflow.now(), f"wait until {step.when} -> "
                                         f"{step.label} by {step.channel}"):
                break
            if self._successor_due(index):
                await self._record_step(step, "skipped", "a later step was already due")
                continue
            await self._perform(step)
            self._stage = step.name

        self._next = len(self._schedule)
        self._publish()
        if self._state not in CLOSED:
            closed = await self._wait_or_close(self._policy.close_after, "listen for payments")
            if not closed and self._state is RunState.ACTIVE:
                self._state = RunState.EXHAUSTED
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._publish()
        detail = self._cancel_reason or f"balance {self._account.balance_due} {self._account.currency}"
        await self._record_state(self._state.value, detail)
        return self.status()

    # -- signals and queries -------------------------------------------------------------------

    @workflow.signal
    async def payment_received(self, payment: PaymentReceived) -> None:
        """A payment from the billing system. Never raises: a bad one is recorded as rejected."""
        self._signals += 1
        held_by_agency = self._state is RunState.HANDED_OFF
        outcome, detail = self._account.apply(payment)
        if self._account.settled and self._state not in CLOSED:
            self._state = RunState.PAID
        self._publish()
        key = f"payment:{payment.payment_id}"
        if outcome is not PaymentOutcome.ACCEPTED:
            key += f":{outcome}:{self._signals}"
        await self._record(AuditKind.PAYMENT, key, outcome.value, detail)
        if held_by_agency and outcome is PaymentOutcome.ACCEPTED:
            await self._deliver(
                f"payment:{payment.payment_id}", "payment_report", Channel.AGENCY,
                Purpose.PAYMENT_REPORT, payment=payment,
            )

    @workflow.signal
    def cancel(self, reason: str) -> None:
        """Stop dunning this invoice (voided, written off, handled by hand)."""
        if self._state not in CLOSED:
            self._state = RunState.CANCELLED
            self._cancel_reason = reason

    @workflow.query
    def status(self) -> DunningStatus:
        upcoming = None
        if self._state is RunState.ACTIVE and self._next < len(self._schedule):
            step, at = self._schedule[self._next]
            upcoming = NextStep(name=step.name, channel=step.channel, at=at)
        return DunningStatus(
            invoice_id=self._invoice.invoice_id,
            workflow_id=workflow.info().workflow_id,
            state=self._state,
            stage=self._stage,
            balance_due=self._account.balance_due,
            amount_due=self._account.amount_due,
            paid=self._account.paid,
            credit=self._account.credit,
            currency=self._account.currency,
            next_step=upcoming,
            policy=self._policy.name,
            policy_version=self._policy.version,
            customer_id=self._invoice.customer.id,
        )

    # -- the steps -----------------------------------------------------------------------------

    async def _perform(self, step: Step) -> None:
        """Send one step. An agency step hands the account over, then tells the customer."""
        customer = self._invoice.customer
        if step.channel is Channel.AGENCY:
            await self._deliver(step.name, step.template, Channel.AGENCY, Purpose.HANDOFF)
            self._state = RunState.HANDED_OFF
            self._publish()
            await self._record_state("handed_off", f"referred to the agency at {step.when}")
            await self._reach_customer(step, step.notice_channels_for(customer))
        else:
            await self._reach_customer(step, step.channels_for(customer))

    async def _reach_customer(self, step: Step, channels: list[Channel]) -> None:
        """Try the step's channels in order until one is not refused for good."""
        for channel in channels:
            if self._state in CLOSED:  # paid or cancelled while an earlier channel was tried
                return
            result = await self._deliver(step.name, step.template, channel, Purpose.REMINDER)
            if result.status is not DeliveryStatus.FAILED:
                return
        reason = "no channel could reach the customer" if channels else "customer has no contact"
        await self._record_step(step, "skipped", reason)

    async def _deliver(
        self, step: str, template: str, channel: Channel, purpose: Purpose,
        payment: PaymentReceived | None = None,
    ) -> DeliveryResult:
        request = DeliveryRequest(
            workflow_id=workflow.info().workflow_id, invoice=self._invoice, step=step,
            template=template, channel=channel, purpose=purpose,
            balance_due=self._account.balance_due, as_of=workflow.now(), payment=payment,
        )
        try:
            return await workflow.execute_activity(
                "deliver", request, result_type=DeliveryResult,
                start_to_close_timeout=ACTIVITY_TIMEOUT, retry_policy=DELIVERY_RETRY,
                summary=f"{purpose.value.replace('_', ' ')}: {step} by {channel}",
            )
        except ActivityError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.type == "DeliveryRejected":
                return DeliveryResult(status=DeliveryStatus.FAILED, channel=channel,
                                      detail=cause.message)
            raise

    # -- waiting -------------------------------------------------------------------------------

    async def _wait_or_close(self, delay: timedelta, summary: str) -> bool:
        """Wait ``delay`` unless the run closes first; return whether it is closed."""
        if self._state in CLOSED or delay <= timedelta(0):
            return self._state in CLOSED
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(
                lambda: self._state in CLOSED, timeout=delay, timeout_summary=summary
            )
        return self._state in CLOSED

    def _successor_due(self, index: int) -> bool:
        following = index + 1
        return following < len(self._schedule) and self._schedule[following][1] <= workflow.now()

    # -- the record ----------------------------------------------------------------------------

    async def _record_state(self, status: str, detail: str) -> None:
        await self._record(AuditKind.STATE, f"state:{status}", status, detail)

    async def _record_step(self, step: Step, status: str, detail: str) -> None:
        await self._record(AuditKind.COMMUNICATION, f"step:{step.name}:{status}", status, detail,
                           step=step.name, channel=step.channel.value)

    async def _record(
        self, kind: AuditKind, key: str, status: str, detail: str,
        step: str | None = None, channel: str | None = None,
    ) -> None:
        event = AuditEvent(
            key=f"{workflow.info().workflow_id}:{key}", workflow_id=workflow.info().workflow_id,
            invoice_id=self._invoice.invoice_id, at=workflow.now(), kind=kind, status=status,
            step=step, channel=channel, detail=detail,
        )
        await workflow.execute_activity(
            "record_event", event, start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=RECORD_RETRY, summary=f"record {kind.value}: {status}",
        )

    def _publish(self) -> None:
        """Mirror the run into search attributes and the UI's current details (no personal data)."""
        status = self.status()
        values: dict[str, object] = {
            search.STAGE.name: status.stage or "not_started",
            search.STATE.name: status.state.value,
            search.AMOUNT_DUE.name: float(status.balance_due),
        }
        if not self._published:
            values |= {
                search.CUSTOMER_ID.name: status.customer_id,
                search.CURRENCY.name: status.currency,
                search.DUE_DATE.name: self._invoice.anchor(),
            }
        changed = {k: v for k, v in values.items() if self._published.get(k) != v}
        if changed:
            keys = {key.name: key for key in search.ALL}
            workflow.upsert_search_attributes(
                [keys[name].value_set(value) for name, value in changed.items()]  # type: ignore[attr-defined]
            )
            self._published |= changed
        upcoming = status.next_step
        workflow.set_current_details(
            f"**State** {status.state.value} · **Balance** {status.balance_due} {status.currency}"
            f" of {status.amount_due}\n\n**Last step** {status.stage or '-'} · **Next** "
            + (f"{upcoming.name} by {upcoming.channel} at {upcoming.at.isoformat()}"
               if upcoming else "-")
        )
