"""The Python API billing code uses: start a dunning run, record a payment, read status and log.

    from starter import DunningClient

    dunning = await DunningClient.connect()          # settings from DUNNING_* variables
    await dunning.start(invoice_dict)                # validated; a second start is a no-op
    await dunning.pay("INV-1001", "250.00", payment_id="pi_123")
    status = await dunning.status("INV-1001")        # DunningStatus (state, balance_due, ...)

Invalid input raises :class:`InvoiceRejected` / :class:`PaymentRefused` before anything is sent
to Temporal, so nothing is ever half-started. The customer's contact details go to the database
(``customers``), never into Temporal: the run carries the customer's id only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import (
    Client,
    TLSConfig,
    WorkflowExecution,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from activities.ledger import Ledger
from activities.letter import letter_facts, letter_name, render_letter
from codec import data_converter
from models.action import ActionInputError, Cancel, build_action, reason_problem, reversal_problem
from models.audit import AuditEvent, AuditKind, audit_key
from models.charges import Dated, FeesError, load_rates
from models.contact import customer_zones
from models.database import prepare
from models.errors import describe
from models.invoice import (
    Customer,
    Invoice,
    invoice_id_problem,
    pay_url_problem,
    plan_run,
    workflow_id_for,
)
from models.money import check_currency, parse_amount, plain_decimal
from models.payment import PaymentReceived, payment_problem
from models.policy import Channel, Policy, PolicyBook, load_policy_book
from models.records import AuditEntry, Delivery, PaymentRow, utcnow
from models.run import (
    AgencyNote,
    AgencyNoticeRun,
    Carried,
    CustomerNotice,
    DunningRun,
    DunningStatus,
    RunInvoice,
    RunRecord,
    RunSnapshot,
    RunState,
)
from models.text import control_problem
from settings import Settings
from workflows import search
from workflows.agency import AgencyNoticeWorkflow
from workflows.dunning import STOPS_AGENCY, InvoiceDunningWorkflow
from workflows.notice import CustomerNoticeWorkflow


class DunningError(Exception):
    """Base of the errors this API raises; the message is meant for the user."""


class InvoiceRejected(DunningError, ValueError):
    """The invoice is invalid; the message names the field. Nothing was started."""


class PaymentRefused(DunningError, ValueError):
    """The payment cannot apply to this invoice (currency, amount). Nothing was signalled."""


class RunNotFound(DunningError, LookupError):
    """No dunning run exists for this invoice."""


class RunClosed(DunningError):
    """The run has ended (paid, cancelled, exhausted); it takes no more payments."""


class ServerUnavailable(DunningError, ConnectionError):
    """The Temporal server cannot be reached, or no worker answers for the task queue."""


def _worked_out(status: DunningStatus) -> DunningStatus:
    """An ended run's fee and interest figures worked out afresh (its payments added to), as of
    now, or of its own latest date when that is later (tests skip the run's clock ahead)."""
    moment = max([utcnow(), *(d.at for d in status.dated_payments), *(c.at for c in status.costs)])
    return status.worked_out(moment)


class Pending(ServerUnavailable):
    """No worker answered in time, but the request is with the run: it applies when a worker
    runs. Neither done nor refused, so callers can tell it from a failure."""


class ActionRefused(DunningError):
    """The run said no, or the request is malformed; nothing changed. ``conflict``: the run's
    state does not allow it (HTTP 409); otherwise the request itself is wrong (HTTP 422).
    ``transient``: a conflict that passes by itself (ask again in a moment)."""

    def __init__(self, message: str, *, conflict: bool, transient: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict
        self.transient = transient


QUERY_TIMEOUT = timedelta(seconds=10)
CUSTOMER_HOLDS = ("dispute", "bankruptcy", "deceased", "cease-communication", "do-not-contact")
CEASE = "cease-communication"  # still allows one confirmation that contact stops
# How long an action waits for the run's answer. A worker answers in milliseconds; longer means
# none is running (the update stays admitted and is applied when one is back).
UPDATE_TIMEOUT = timedelta(seconds=15)
# A payment waits less: without an answer it is also signalled (durable with no worker running).
PAY_TIMEOUT = timedelta(seconds=5)
# A workflow task held by a worker that died is handed to another after this (the default, 10 s,
# would stall runs cached on a killed worker past a compressed schedule's gaps). A dunning task
# takes milliseconds; a continue-as-new keeps replays short.
WORKFLOW_TASK_TIMEOUT = timedelta(seconds=4)


@dataclass(frozen=True)
class StartResult:
    invoice_id: str
    workflow_id: str
    started: bool  # False: a run for this invoice already existed (or it is excluded); nothing ran
    detail: str
    excluded: bool = False  # the customer is excluded from dunning


@dataclass(frozen=True)
class PaymentResult:
    payment: PaymentReceived
    # "accepted" / "duplicate": counted (or not) by the open run, which answered;
    # "sent": signalled to the open run (no worker answered in time; it counts it when one is back);
    # "unmatched": no run; "after_close": the run had ended
    outcome: str
    detail: str
    status: DunningStatus | None = None  # the run after the payment, when it answered


@dataclass(frozen=True)
class RunSummary:
    """A run as a list shows it: what its search attributes say."""

    invoice_id: str
    workflow_id: str
    state: str
    stage: str
    balance_due: float | None
    currency: str | None
    customer_id: str | None
    due_at: datetime | None
    started_at: datetime | None
    running: bool

    @classmethod
    def from_execution(cls, execution: WorkflowExecution) -> RunSummary:
        attrs = execution.typed_search_attributes
        return cls(
            invoice_id=execution.id.removeprefix("dunning-"), workflow_id=execution.id,
            state=attrs.get(search.STATE) or "", stage=attrs.get(search.STAGE) or "",
            balance_due=attrs.get(search.AMOUNT_DUE), currency=attrs.get(search.CURRENCY),
            customer_id=attrs.get(search.CUSTOMER_ID), due_at=attrs.get(search.DUE_DATE),
            started_at=execution.start_time,
            running=execution.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING,
        )


async def connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    """A client with the pydantic converter, to the server the settings name (local or Cloud)."""
    tls: bool | TLSConfig = False
    if settings.temporal_tls_cert and settings.temporal_tls_key:
        tls = TLSConfig(client_cert=settings.temporal_tls_cert.read_bytes(),
                        client_private_key=settings.temporal_tls_key.read_bytes())
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=data_converter(settings.payload_key_text()),
            runtime=runtime,
            api_key=api_key,
            tls=tls or bool(api_key),
        )
    except RuntimeError as exc:
        text = str(exc)
        reason = "connection refused" if "Connection refused" in text else text.splitlines()[0]
        raise ServerUnavailable(
            f"cannot reach the Temporal server at {settings.temporal_address} ({reason})"
        ) from None


def parse_invoice(data: dict[str, Any], book: PolicyBook,
                  pay_hosts: frozenset[str] = frozenset()) -> tuple[Invoice, Policy, str]:
    """Validate an invoice and choose its policy (and say why), or raise InvoiceRejected naming
    the field."""
    try:
        invoice = Invoice.model_validate(data)
    except ValidationError as exc:
        raise InvoiceRejected(describe(exc)) from None
    problem = pay_url_problem(invoice, pay_hosts)
    if problem is not None:
        raise InvoiceRejected(problem)
    customer = invoice.customer
    if customer.policy is not None:  # stored with the customer even when the invoice names its own
        known_policy(book, customer.policy, "customer.policy")
    facts = {"type": customer.type, "country": customer.country or "", "region": customer.region or "",
             "currency": invoice.currency, "amount_due": str(invoice.amount_due)}
    name, why = book.choose(facts, named=invoice.policy, override=customer.policy)
    return invoice, known_policy(book, name, "policy" if why.startswith("named") else "customer.policy"), why


def known_policy(book: PolicyBook, name: str, field: str) -> Policy:
    """The policy called ``name``, or InvoiceRejected naming ``field`` and the known ones."""
    policy = book.policies.get(name)
    if policy is None:
        raise InvoiceRejected(f"{field}: unknown policy {name!r} (known: {', '.join(sorted(book.policies))})")
    return policy


def plan_invoice(invoice: Invoice, policy: Policy,
                 rates: dict[str, list[tuple[date, Decimal]]]) -> DunningRun:
    """The run's input, or InvoiceRejected naming ``fees`` when the policy's statutory interest
    needs a reference rate the rates file lacks. An invoice that cannot be planned is refused like
    any other invalid one: before its customer is stored, and row by row in a batch."""
    # Amounts a policy sets per currency must have one for the invoice's: else the handoff would
    # ignore the policy's promise of no agency for small balances, and no step fee could be put.
    per_currency = {"step_fee": policy.fees.step_fee if isinstance(policy.fees.step_fee, dict) else {}}
    if any(step.channel is Channel.AGENCY for step in policy.steps):
        per_currency["agency_min_balance"] = policy.agency_min_balance
    for field, table in per_currency.items():
        if table and invoice.currency not in table:
            article = "an" if field[0] in "aeiou" else "a"
            raise InvoiceRejected(f"currency: policy {policy.name!r} has {article} {field} for "
                                  f"{', '.join(sorted(table))} but not {invoice.currency}; add one to the "
                                  "policy file")
    try:
        return plan_run(invoice, policy, rates)
    except FeesError as exc:
        raise InvoiceRejected(f"fees: {exc}") from None


def store_customer(ledger: Ledger, customer: dict[str, Any], book: PolicyBook | None = None) -> Customer:
    """Validate a customer's contact details (InvoiceRejected names the field) and store them.
    With ``book``, the customer's own policy must be one of its policies: a typo would otherwise
    surface only when their next invoice is refused."""
    try:
        parsed = Customer.model_validate(customer)
    except ValidationError as exc:
        raise InvoiceRejected(describe(exc)) from None
    if book is not None and parsed.policy is not None:
        known_policy(book, parsed.policy, "policy")
    ledger.upsert_customer(parsed, revive=True)
    return parsed


def change_customer(ledger: Ledger, changes: dict[str, Any], book: PolicyBook | None = None) -> Customer:
    """Store ``changes`` (``id`` and the fields to change; None clears one) over the customer's
    stored record, validated whole: a new name alone is a valid change for a customer whose
    stored email makes them reachable. An unknown customer is ``changes`` alone."""
    current = ledger.customer(str(changes.get("id", "")))
    data: dict[str, Any] = {}
    if current is not None:
        # who they are is no personal data: kept even for an erased customer
        data = {"type": current.type, "country": current.country, "region": current.region,
                "policy": current.policy, "exclude": current.exclude}
        if current.forgotten_at is None:
            data |= {"name": current.name, "email": current.email, "phone": current.phone,
                     "timezone": current.timezone, "locale": current.locale}
        data = {k: v for k, v in data.items() if v is not None}
    return store_customer(ledger, data | changes, book)


class DunningClient:
    """Start, pay, inspect and cancel dunning runs; keep customers' contact details."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.book = load_policy_book(settings.policy_file, settings.templates_dir)
        self.policies = self.book.policies
        self.rates = load_rates(settings.rates_file)
        self.ledger = Ledger(prepare(settings.database()))

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> DunningClient:
        settings = settings or Settings()
        return cls(await connect(settings), settings)

    async def start(self, invoice: dict[str, Any] | Invoice) -> StartResult:
        """Start the run for an invoice. Starting one that already has a run changes nothing
        but the customer's contact details, which are always the billing system's latest."""
        data = invoice.model_dump(mode="json") if isinstance(invoice, Invoice) else invoice
        parsed, policy, _why = parse_invoice(data, self.book, self.settings.payment_hosts())
        run = plan_invoice(parsed, policy, self.rates)  # before anything is stored
        holds = await asyncio.to_thread(self.ledger.upsert_customer, parsed.customer)
        if parsed.customer.exclude or "excluded" in holds:  # as sent, or as an operator set it
            return StartResult(parsed.invoice_id, parsed.workflow_id, False,
                               "the customer is excluded from dunning; nothing runs", excluded=True)
        workflow_id = parsed.workflow_id
        if holds:  # the customer is on hold: the run starts held
            run = run.model_copy(update={"carried": Carried(customer_holds=holds)})
        try:
            await self.client.start_workflow(
                InvoiceDunningWorkflow.run,
                run,
                id=workflow_id,
                task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=search.typed(search.at_start(run.invoice)),
                task_timeout=WORKFLOW_TASK_TIMEOUT,
                static_summary=f"Dunning {parsed.invoice_id}: policy {policy.name} v{policy.version}",
            )
        except WorkflowAlreadyStartedError:
            taken = await self._take_unmatched(parsed.invoice_id, parsed.currency)
            return StartResult(parsed.invoice_id, workflow_id, False,
                               "already has a dunning run; the run is unchanged (the customer's "
                               "contact details are taken as sent)" + taken)
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None
        detail = f"started on policy {policy.name} v{policy.version}"
        planned = [(s.step.name, s.step.channel.value, s.at) for s in run.schedule
                   if s.step.channel is not Channel.AGENCY]
        await asyncio.to_thread(self.ledger.open_run, run.invoice, AuditEvent(
            key=audit_key(workflow_id, "started"), workflow_id=workflow_id,
            invoice_id=parsed.invoice_id, at=utcnow(), kind=AuditKind.STATE, status="started",
            detail=detail,
        ), planned)
        detail += await self._take_unmatched(parsed.invoice_id, parsed.currency)
        return StartResult(parsed.invoice_id, workflow_id, True, detail)

    async def _take_unmatched(self, invoice_id: str, currency: str) -> str:
        """Payments kept as unmatched for this invoice (it had no run when they came) go to its
        run now, so a customer who paid first is not chased; they leave the unmatched list. One
        in another currency stays there for an operator. Safe to repeat: the run counts each
        payment id once. Returns a note for the start's answer."""
        rows = await asyncio.to_thread(self.ledger.payments, "unmatched", invoice_id)
        taken = []
        for row in rows:
            payment = PaymentReceived(payment_id=row.payment_id, amount=row.amount, currency=row.currency,
                                      paid_at=row.paid_at, source="kept as unmatched")
            if payment_problem(payment, currency) is not None:
                continue
            try:
                await self._handle(invoice_id).signal(InvoiceDunningWorkflow.payment_received,
                                                      payment)  # type: ignore[arg-type]
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise _unavailable(exc, self.settings) from None
                await self.pay(invoice_id, row.amount, currency=row.currency, payment_id=row.payment_id,
                               paid_at=row.paid_at, actor="kept as unmatched")  # the run has ended
            await asyncio.to_thread(self.ledger.match_payment, invoice_id, row.payment_id,
                                    "taken by the invoice's run")
            taken.append(f"{row.amount} {row.currency} ({row.payment_id})")
        return f"; took the payments kept as unmatched: {', '.join(taken)}" if taken else ""

    async def letter(self, invoice_id: str) -> tuple[str, bytes]:
        """The formal final notice for an invoice as it stands now: (file name, PDF bytes).
        Raises RunNotFound; LookupError when the customer's details were erased."""
        status = await self.status(invoice_id)
        run = await self._input(self._handle(invoice_id))
        customer = await asyncio.to_thread(self.ledger.customer, run.invoice.customer_id)
        if customer is None or customer.forgotten_at is not None:
            raise LookupError(f"no contact details for customer {run.invoice.customer_id}: no letter")
        agency = run.schedule[-1]
        collections = None
        if status.state in (RunState.ACTIVE, RunState.FAILED) and agency.step.channel is Channel.AGENCY:
            upcoming = status.next_step
            collections = upcoming.at if upcoming and upcoming.channel is Channel.AGENCY else \
                max(agency.at, datetime.now(UTC) + run.policy.agency_notice)
        facts = letter_facts(self.settings.writer(), run.invoice, customer_name=customer.name,
                             locale=customer.locale, balance=status.balance_due, charges=status,
                             collections_after=collections, written_on=datetime.now(UTC).date())
        return letter_name(invoice_id), await asyncio.to_thread(render_letter, facts)

    async def status(self, invoice_id: str) -> DunningStatus:
        """The live state of a run; for a finished run, the state it finished in."""
        handle = self._handle(invoice_id)
        try:
            description = await handle.describe()
            if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING:
                return (await self._query(handle)).at(datetime.now(UTC))  # today's interest
            if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED:
                return await self._with_late_payments(invoice_id, await handle.result())
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunNotFound(f"no dunning run for invoice {invoice_id}") from None
            raise _unavailable(exc, self.settings) from None
        status_name = WorkflowExecutionStatus.Name(description.status)
        raise RunClosed(f"run {handle.id} ended abnormally ({status_name.split('_')[-1].lower()})")

    async def pay(
        self, invoice_id: str, amount: str | Decimal, *, currency: str | None = None,
        payment_id: str | None = None, paid_at: datetime | None = None, actor: str = "",
    ) -> PaymentResult:
        """Record a payment. Checked against the invoice first; idempotent by ``payment_id``.

        Nothing is lost: an open run takes it (no worker needed: the signal is durable); a run
        that has ended records it in the database and, if the agency held the account, reports
        it to the agency; an invoice with no run keeps it as an unmatched payment.
        """
        try:
            plain_decimal(amount)
        except ValueError as exc:
            raise PaymentRefused(str(exc)) from None
        payment = PaymentReceived(
            payment_id=(payment_id or f"manual-{uuid.uuid4().hex[:12]}").strip(),
            amount=str(amount).strip(), currency=(currency or "").strip().upper(),
            paid_at=paid_at or datetime.now(UTC), source=actor[:100],
        )
        if not payment.payment_id or len(payment.payment_id) > 128:
            raise PaymentRefused("payment_id: must be 1 to 128 characters")
        problem = control_problem("payment_id", payment.payment_id)
        if problem is not None:
            raise PaymentRefused(problem)
        problem = invoice_id_problem(invoice_id)  # no run can have such an id: nothing to keep it under
        if problem is not None:
            raise PaymentRefused(problem)
        handle = self._handle(invoice_id)
        try:
            description = await handle.describe()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise _unavailable(exc, self.settings) from None
            return await self._unmatched(invoice_id, payment)
        try:
            run = await self._input(handle)
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None
        payment = payment.model_copy(update={"currency": payment.currency or run.invoice.currency})
        problem = payment_problem(payment, run.invoice.currency)
        if problem is not None:
            raise PaymentRefused(problem)
        if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING:
            try:
                # The payment id is the idempotency key: a repeat is answered "duplicate".
                answer = await handle.execute_update(InvoiceDunningWorkflow.pay, payment,
                                                     rpc_timeout=PAY_TIMEOUT)
                if answer.outcome in ("accepted", "duplicate"):  # booked by hand: off the unmatched list
                    await asyncio.to_thread(self.ledger.match_payment, invoice_id, payment.payment_id,
                                            "booked on the invoice's run")
                return PaymentResult(payment, answer.outcome, answer.detail, answer.status)
            except WorkflowUpdateFailedError as exc:
                raise _refused(exc) from None
            except WorkflowUpdateRPCTimeoutOrCancelledError:
                return await self._signal_payment(handle, payment)
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:  # NOT_FOUND: it ended meanwhile
                    raise _unavailable(exc, self.settings) from None
        return await self._after_close(invoice_id, run.invoice, payment)

    async def _signal_payment(self, handle: WorkflowHandle[Any, Any], payment: PaymentReceived,
                              ) -> PaymentResult:
        """No worker answered the update: signal it too (durable without a worker; the run
        counts a payment id once, so the update arriving later changes nothing)."""
        try:
            await handle.signal(InvoiceDunningWorkflow.payment_received, payment)  # type: ignore[arg-type]
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None
        return PaymentResult(payment, "sent", "sent to the run; no worker answered yet, it counts "
                                              "the payment when one is running")

    async def act(self, invoice_id: str, action: str, fields: dict[str, Any], *, actor: str = "",
                  request_id: str | None = None) -> DunningStatus:
        """Pause, resume, dispute, resolve, promise, plan, write off or escalate a run; answers
        the run's status after the action. ``fields`` are the request's fields as the CLI and
        the API take them (ISO dates, decimal strings); ``request_id`` makes a retried request
        apply once. Raises ActionRefused with the reason; nothing changed then."""
        handle = self._handle(invoice_id)
        try:
            run = await self._input(handle)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunNotFound(f"no dunning run for invoice {invoice_id}") from None
            raise _unavailable(exc, self.settings) from None
        customer = await asyncio.to_thread(self.ledger.customer, run.invoice.customer_id)
        try:
            request = build_action(action, fields, currency=run.invoice.currency,
                                   timezone=customer_zones(customer.timezone if customer else None,
                                                           customer.phone if customer else None,
                                                           run.policy.default_timezone)[0],
                                   policy=run.policy, actor=actor, now=datetime.now(UTC))
        except ActionInputError as exc:
            raise ActionRefused(str(exc), conflict=False) from None
        try:
            return await handle.execute_update(
                action, request, result_type=DunningStatus, rpc_timeout=UPDATE_TIMEOUT,
                id=_update_id(action, request_id) if request_id else None)
        except WorkflowUpdateFailedError as exc:
            raise _refused(exc) from None
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            raise Pending(
                f"no worker answered for {handle.id} within {UPDATE_TIMEOUT.seconds}s: is "
                f"`dunning worker` running on task queue {self.settings.task_queue!r}? The "
                "request stays with the run and is applied when a worker is back."
            ) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                final = await self.status(invoice_id)
                raise ActionRefused(f"the run for {invoice_id} has ended ({final.state})",
                                    conflict=True) from None
            raise _unavailable(exc, self.settings) from None

    async def cancel(self, invoice_id: str, reason: str, *, actor: str = "") -> str:
        """Stop dunning an invoice (voided, disputed, handled by hand); recall it from the agency
        if the agency holds it, even after the run has ended."""
        reason = reason.strip()
        if not reason:
            raise DunningError("reason: say why dunning stops")
        problem = reason_problem(reason)
        if problem is not None:
            raise DunningError(problem)
        handle, running = await self._running(invoice_id)
        if running:
            try:
                await handle.execute_update(InvoiceDunningWorkflow.cancel_run,
                                            Cancel(reason=reason[:500], actor=actor),
                                            rpc_timeout=PAY_TIMEOUT)
                return "cancelled"
            except WorkflowUpdateFailedError as exc:
                refused = _refused(exc)
                if refused.transient or not refused.conflict:
                    raise refused from None
            except WorkflowUpdateRPCTimeoutOrCancelledError:
                try:  # no worker answered: the durable signal, applied when one is back
                    await handle.signal(InvoiceDunningWorkflow.cancel, reason[:500])  # type: ignore[arg-type]
                except RPCError as exc:
                    raise _unavailable(exc, self.settings) from None
                return "cancellation sent (no worker answered yet; it applies when one is running)"
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise _unavailable(exc, self.settings) from None
        final = await self.status(invoice_id)
        if final.state is not RunState.HANDED_OFF:
            raise RunClosed(f"the run for {invoice_id} has ended ({final.state}); nothing to cancel")
        run = await self._input(handle)
        await self._tell_agency(run.invoice, AgencyNote(key="recall", purpose="recall",
                                                        reason=reason[:500]), final.balance_due)
        return "the run had ended with the agency; recall sent to the agency"

    async def retry(self, invoice_id: str) -> None:
        """After fixing what failed a delivery (a template, stored data): try the step again.
        Refused when no delivery is waiting for it (the run would ignore the signal)."""
        handle = self._handle(invoice_id)
        try:
            description = await handle.describe()
            if description.status != WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING:
                raise RunClosed(f"the run for {invoice_id} has ended; nothing to retry")
            current = await self._query(handle)
            if not current.awaiting_retry:
                raise ActionRefused(f"the run for {invoice_id} is not waiting for a retry (state: "
                                    f"{current.state}); retry is for a run whose delivery failed",
                                    conflict=True)
            await handle.signal(InvoiceDunningWorkflow.retry)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunNotFound(f"no dunning run for invoice {invoice_id}") from None
            raise _unavailable(exc, self.settings) from None

    async def reverse(self, invoice_id: str, total: str | Decimal, *, key: str, reason: str = "",
                      actor: str = "") -> DunningStatus:
        """A payment taken back (a refund, a lost chargeback): ``total`` is everything reversed
        under ``key`` so far (a provider's cumulative refund), so repeating it changes nothing.

        An open run owes the amount again at once. A run that ended ``paid`` is reopened: a new
        run for the same invoice, counting the payments that stand, escalating from the step the
        schedule has reached (the latest due reminder goes out first; the agency only after its
        notice period). Any other ended run is not reopened (ActionRefused says why).
        """
        fields = {"key": key, "total": str(total), "reason": reason}
        _, running = await self._running(invoice_id)
        if running:
            try:
                return await self.act(invoice_id, "reverse", fields, actor=actor,
                                      request_id=f"reverse:{key}:{total}")
            except ActionRefused as exc:
                if not exc.conflict or exc.transient:
                    raise  # a bad amount, or busy for a moment
                # closed but still finishing: it can be reopened once it has ended
                raise ActionRefused(f"the run for {invoice_id} is closing; ask again in a moment",
                                    conflict=True, transient=True) from None
        return await self._reopen(invoice_id, key, str(total), reason, actor)

    async def _reopen(self, invoice_id: str, key: str, total: str, reason: str,
                      actor: str) -> DunningStatus:
        final = await self.status(invoice_id)
        if final.state is not RunState.PAID:
            raise ActionRefused(f"the run for {invoice_id} ended {final.state}: a reversal reopens only "
                                "a paid run; settle this one by hand", conflict=True)
        before = final.reversals.get(key, Decimal(0))
        paid_total = final.paid  # with the payments recorded after the run ended
        problem = reversal_problem(key, total, final.currency, paid_total, before)
        if problem is not None:
            raise ActionRefused(problem, conflict=False)
        taken = parse_amount(total, final.currency) - before
        if taken <= 0:
            return final  # applied already
        handle = self._handle(invoice_id)
        run = await self._input(handle)
        paid = paid_total - taken
        # With fees or interest the run works its balance out from the dated payments: those that
        # stand (late ones too) and this reversal, from now; a chargeback of the fees and interest
        # a customer paid is owed again like the principal.
        dated = [*final.dated_payments, Dated(at=utcnow(), amount=-taken, what=key)] \
            if run.terms is not None else []
        if run.terms is not None:
            balance = _worked_out(final.model_copy(update={"dated_payments": dated, "terms": run.terms})
                                  ).balance_due
        else:
            balance = max(final.amount_due - final.adjusted - paid, Decimal(0))
        mirror = await asyncio.to_thread(self.ledger.run, invoice_id)
        seq = (mirror.seq if mirror else 0) + 1
        workflow_id = run.invoice.workflow_id
        why = f": {reason}" if reason else ""
        if balance == 0:  # an overpayment refunded: still settled, nothing to chase
            await asyncio.to_thread(self.ledger.append, AuditEvent(
                key=audit_key(workflow_id, "reversed-after-close", key, total), workflow_id=workflow_id,
                invoice_id=invoice_id, at=utcnow(), kind=AuditKind.PAYMENT, status="reversed",
                detail=f"{actor or 'unknown'}: {taken} {final.currency} taken back ({key}){why} after "
                       "the run ended paid; the invoice is still settled"))
            return final
        reopened_by = f"{key}@{seq}"  # unique: a later reopen by the same key has a higher seq
        event = AuditEvent(
            key=audit_key(workflow_id, "reopened", reopened_by), workflow_id=workflow_id,
            invoice_id=invoice_id, at=utcnow(), kind=AuditKind.STATE, status="reopened",
            detail=f"{actor or 'unknown'}: {taken} {final.currency} taken back ({key}){why}; "
                   f"{balance} {final.currency} owed again",
        )
        snapshot = RunSnapshot(seq=seq, state=RunState.ACTIVE, stage=final.stage, balance_due=balance,
                               paid=paid)
        attributes = (search.at_start(run.invoice)
                      | search.current(RunState.ACTIVE.value, final.stage, balance))
        # Hold numbers continue above any the earlier runs used (each hold wrote a record, so
        # the mirror's seq is past them): a reopened run's messages never reuse their ledger keys.
        carried = Carried(stage=final.stage, paid=paid, seq=seq, holds=seq,
                          costs=final.costs, dated_payments=dated,
                          payment_ids=final.payment_ids,
                          adjusted=final.adjusted, reversals={**final.reversals, key: before + taken},
                          reopened_by=reopened_by, published=attributes,
                          pending=[RunRecord(event=event, snapshot=snapshot)])
        try:
            await self.client.start_workflow(
                InvoiceDunningWorkflow.run, run.model_copy(update={"carried": carried}),
                id=workflow_id, task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=search.typed(attributes), task_timeout=WORKFLOW_TASK_TIMEOUT,
                static_summary=(f"Dunning {invoice_id} (reopened): policy {run.policy.name} "
                                f"v{run.policy.version}"),
            )
        except WorkflowAlreadyStartedError:  # reopened meanwhile by the same reversal, or another
            return await self.act(invoice_id, "reverse", {"key": key, "total": total, "reason": reason},
                                  actor=actor)
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None
        # The trail and the mirror show it now; the run's first record repeats it harmlessly.
        await asyncio.to_thread(self.ledger.record, run.invoice, [RunRecord(event=event, snapshot=snapshot)])
        return await self.status(invoice_id)

    async def list_runs(self, *, state: str | None = None, customer_id: str | None = None,
                        page_size: int = 50, page_token: str | None = None,
                        ) -> tuple[list[RunSummary], str | None]:
        """A page of runs, newest first, from Temporal visibility (the search attributes: no
        personal data), filtered by state and customer; and the next page's token."""
        clauses = [f"WorkflowType = '{InvoiceDunningWorkflow.__name__}'"]
        if state is not None:
            if state not in set(RunState):
                raise ActionRefused(f"state: unknown state {state!r} "
                                    f"(known: {', '.join(RunState)})", conflict=False)
            clauses.append(f"{search.STATE.name} = '{state}'")
        if customer_id is not None:
            if not customer_id or len(customer_id) > 64 or any(c in customer_id for c in "'\\\"\n"):
                raise ActionRefused("customer_id: not a customer id", conflict=False)
            clauses.append(f"{search.CUSTOMER_ID.name} = '{customer_id}'")
        try:
            token = base64.urlsafe_b64decode(page_token) if page_token else None
        except (ValueError, binascii.Error):
            raise ActionRefused("page_token: not a token this API gave", conflict=False) from None
        pages = self.client.list_workflows(" AND ".join(clauses), page_size=max(1, min(page_size, 200)),
                                           next_page_token=token)
        try:
            await pages.fetch_next_page()
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None
        runs = [RunSummary.from_execution(execution) for execution in pages.current_page or ()]
        following = pages.next_page_token
        return runs, base64.urlsafe_b64encode(following).decode() if following else None

    async def send_pay_link(self, invoice_id: str, call_sid: str) -> None:
        """The customer pressed 1 on a call: the run texts the pay link (once per call)."""
        try:
            await self._handle(invoice_id).signal(InvoiceDunningWorkflow.send_pay_link, call_sid)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunClosed(f"the run for {invoice_id} has ended; no pay link sent") from None
            raise _unavailable(exc, self.settings) from None

    async def delivery_refused(self, invoice_id: str, step: str, channel: str) -> None:
        """A provider reported a message it had accepted as undelivered: the run's step falls
        back to its next channel if the run has not moved on."""
        try:
            await self._handle(invoice_id).signal(InvoiceDunningWorkflow.delivery_refused,
                                                  args=[step, channel])
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunClosed(f"the run for {invoice_id} has ended") from None
            raise _unavailable(exc, self.settings) from None

    async def hold_customer(self, customer_id: str, kind: str, reason: str, *, actor: str = "",
                            release: bool = False) -> list[str]:
        """Put a hold on a customer (or release one): every open run of theirs stops contact and
        handoff at once (payments still count); the last release lets each go on by the usual
        rule. Returns the holds after the change. The database has it first, so a delivery
        about to send is stopped even before its run hears."""
        if kind not in CUSTOMER_HOLDS:
            raise ActionRefused(f"kind: one of {', '.join(CUSTOMER_HOLDS)}", conflict=False)
        if not release and not reason.strip():
            raise ActionRefused("reason: say why", conflict=False)
        problem = reason_problem(reason)
        if problem is not None:
            raise ActionRefused(problem, conflict=False)
        before = await asyncio.to_thread(self.ledger.holds_of, customer_id)
        try:
            kinds = await asyncio.to_thread(
                self.ledger.set_holds, customer_id,
                (lambda k: k - {kind}) if release else (lambda k: k | {kind}))
        except LookupError:
            raise RunNotFound(f"no customer {customer_id}") from None
        invoices = await asyncio.to_thread(self.ledger.open_invoices, [customer_id])
        if (kind == CEASE and not release and kind not in before and invoices
                and self.settings.cease_confirmation):
            await self._confirm_cease(customer_id, invoices[0])
        what = f"{'released' if release else 'placed'} {kind} hold by {actor or 'unknown'}"
        missed: list[str] = []
        for invoice_id in invoices:
            workflow_id = workflow_id_for(invoice_id)
            await asyncio.to_thread(self.ledger.append, AuditEvent(
                key=audit_key(workflow_id, "customer-hold", kind, release, utcnow().isoformat()),
                workflow_id=workflow_id, invoice_id=invoice_id, at=utcnow(), kind=AuditKind.ACTION,
                status="release" if release else "hold", detail=f"{what}: {reason}"[:1000]))
            try:  # each run re-reads the holds from the database when told
                await self._handle(invoice_id).signal(InvoiceDunningWorkflow.customer_holds, kinds)
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    missed.append(invoice_id)
                elif kind in STOPS_AGENCY and not release:  # ended, perhaps with the agency
                    await self._recall_ended(invoice_id, f"customer hold: {kind}; stop collecting")
        if missed:  # the hold itself stands (a send is stopped by the database); the runs re-read it
            raise ServerUnavailable(
                f"the {kind} hold is recorded, but {len(missed)} run(s) could not be told now "
                f"({', '.join(missed[:5])}); they stop at their next send and re-read it")
        return kinds

    def log(self, invoice_id: str) -> list[AuditEntry]:
        """The audit trail of an invoice, from the database."""
        return list(self.ledger.trail(invoice_id))

    def unmatched(self) -> list[PaymentRow]:
        """Payments for invoices that had no run, oldest first."""
        return list(self.ledger.payments("unmatched"))

    def unknown_deliveries(self) -> list[Delivery]:
        return list(self.ledger.unknown_deliveries())

    def settle(self, delivery_id: int, sent: bool, note: str) -> Delivery:
        """An operator's verdict on a message whose outcome the provider could not tell."""
        return self.ledger.settle(delivery_id, "sent" if sent else "failed", note)

    def update_customer(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change a customer's details (``change_customer``); runs in flight use them from their
        next message. Answers the record as stored."""
        change_customer(self.ledger, changes, self.book)
        return self.customer(str(changes["id"]))

    def customer(self, customer_id: str) -> dict[str, Any]:
        row = self.ledger.customer(customer_id)
        if row is None:
            raise RunNotFound(f"no customer {customer_id}")
        return row.model_dump(mode="json")

    def forget_customer(self, customer_id: str) -> int:
        """Erase a customer's contact details and message bodies; the audit facts stay."""
        try:
            return self.ledger.forget(customer_id)
        except LookupError:
            raise RunNotFound(f"no customer {customer_id}") from None

    # -- helpers -------------------------------------------------------------------------------

    async def _unmatched(self, invoice_id: str, payment: PaymentReceived) -> PaymentResult:
        """Keep a payment no run can take, after the checks a run would make: it is money to
        match by hand later, so it needs a currency and an amount someone could have paid."""
        if not payment.currency:
            raise PaymentRefused(f"currency: there is no dunning run for invoice {invoice_id} to take "
                                 "the currency from; say the payment's currency")
        try:
            currency = check_currency(payment.currency)
        except ValueError as exc:
            raise PaymentRefused(f"currency: {exc}") from None
        problem = payment_problem(payment, currency)
        if problem is not None:
            raise PaymentRefused(problem)
        kept = await asyncio.to_thread(self.ledger.keep_payment, invoice_id, payment.payment_id,
                                       payment.amount, payment.currency, payment.paid_at, "unmatched",
                                       "no dunning run for this invoice")
        detail = "no run for this invoice: kept as unmatched (dunning unmatched)"
        return PaymentResult(payment, "unmatched", detail if kept else "already kept as unmatched")

    async def _after_close(self, invoice_id: str, invoice: RunInvoice,
                           payment: PaymentReceived) -> PaymentResult:
        """Record a payment that came after the run ended, unless the run itself counted it. The
        payment is kept before anything can fail (nothing is lost); every step after it is keyed
        and runs on every attempt, so a retry after a failure part-way (the server unreachable
        while reading the run) finishes what the first attempt began, and a repeat changes
        nothing."""
        async def keep() -> None:
            await asyncio.to_thread(
                self.ledger.keep_payment, invoice_id, payment.payment_id, payment.amount,
                payment.currency, payment.paid_at, "after_close", "the run had ended")

        try:
            own = await self._handle(invoice_id).result()  # what the run itself counted
        except WorkflowFailureError:  # ended abnormally (terminated): recorded; nobody to report it to
            await keep()
            return PaymentResult(payment, "after_close", "the run had ended abnormally: recorded")
        except RPCError as exc:
            await keep()  # nothing lost: a retry finds it
            raise _unavailable(exc, self.settings) from None
        if payment.payment_id in own.payment_ids:  # counted by the run before it ended: not again
            return PaymentResult(payment, "duplicate", f"payment {payment.payment_id} was already counted")
        await keep()
        final = await self._with_late_payments(invoice_id, own)
        # keyed, so a repeat changes nothing and a retry after a failure part-way finishes what
        # the first attempt began
        counted = await asyncio.to_thread(self.ledger.count_late_payment, invoice_id,
                                          parse_amount(payment.amount, invoice.currency), AuditEvent(
            key=audit_key(invoice.workflow_id, "payment-after-close", payment.payment_id),
            workflow_id=invoice.workflow_id, invoice_id=invoice_id, at=utcnow(),
            kind=AuditKind.PAYMENT, status="after_close",
            detail=f"paid {payment.amount} {payment.currency} after the run ended ({final.state})",
        ))
        told = ""
        if final.state is RunState.HANDED_OFF:  # keyed by the payment id: told once
            note = AgencyNote(key=f"payment:{payment.payment_id}", purpose="payment_report",
                              payment=payment)
            await self._tell_agency(invoice, note, final.balance_due)
            told = " and reported to the agency"
        if not counted:
            return PaymentResult(payment, "duplicate", f"payment {payment.payment_id} was already recorded "
                                                       f"after the run ended{told}")
        return PaymentResult(payment, "after_close", f"the run had ended ({final.state}): recorded{told}")

    async def _with_late_payments(self, invoice_id: str, final: DunningStatus) -> DunningStatus:
        """A run that ended, with the payments recorded after it ended: what is still owed (the
        run's own result cannot have them)."""
        late = [p for p in await asyncio.to_thread(self.ledger.payments, "after_close", invoice_id)
                if p.payment_id not in final.payment_ids]
        if not late:
            return final
        amounts = [parse_amount(p.amount, final.currency) for p in late]
        paid = final.paid + sum(amounts, Decimal(0))
        update: dict[str, Any] = {"paid": paid, "payment_ids": sorted(
            {*final.payment_ids, *(p.payment_id for p in late)})}
        terms = final.terms or (await self._input(self._handle(invoice_id))).terms
        owed = final.amount_due - final.adjusted
        if terms is None:
            return final.model_copy(update=update | {"balance_due": max(owed - paid, Decimal(0)),
                                                     "credit": max(paid - owed, Decimal(0))})
        dated = [*final.dated_payments, *(Dated(at=p.paid_at, amount=amount, what=p.payment_id)
                                          for p, amount in zip(late, amounts, strict=True))]
        return _worked_out(final.model_copy(update=update | {"dated_payments": dated, "terms": terms}))

    async def _recall_ended(self, invoice_id: str, reason: str) -> None:
        """A run that ended with the agency holding the account: the agency is told to stop."""
        final = await self.status(invoice_id)
        if final.state is RunState.HANDED_OFF:
            run = await self._input(self._handle(invoice_id))
            await self._tell_agency(run.invoice, AgencyNote(key="recall", purpose="recall", reason=reason),
                                    final.balance_due)

    async def _confirm_cease(self, customer_id: str, invoice_id: str) -> None:
        """The one message a cease-communication hold allows: that we stop (about one of the
        customer's open invoices; one per hold placed, whatever the number of invoices)."""
        stamp = utcnow().strftime("%Y%m%dT%H%M%S")
        try:
            run = await self._input(self._handle(invoice_id))
            row = await asyncio.to_thread(self.ledger.run, invoice_id)
            await self.client.start_workflow(
                CustomerNoticeWorkflow.run,
                CustomerNotice(invoice=run.invoice, step=f"cease_confirmation_{stamp}",
                               template="cease_confirmation", contact=run.policy.contact,
                               balance_due=Decimal(row.balance_due) if row else run.invoice.amount_due),
                id=f"confirmation-{customer_id}-{stamp}", task_queue=self.settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary="Confirmation that contact stops",
            )
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None

    async def _tell_agency(self, invoice: RunInvoice, note: AgencyNote, balance: Decimal) -> None:
        digest = hashlib.sha256(note.key.encode()).hexdigest()[:16]
        try:
            await self.client.start_workflow(
                AgencyNoticeWorkflow.run, AgencyNoticeRun(invoice=invoice, note=note, balance_due=balance),
                id=f"{invoice.workflow_id}-agency-{digest}", task_queue=self.settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                static_summary=f"Agency {note.purpose.replace('_', ' ')}: {invoice.invoice_id}",
            )
        except WorkflowAlreadyStartedError:
            pass  # told already (the same payment or recall again)
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None

    async def _query(self, handle: WorkflowHandle[Any, Any]) -> DunningStatus:
        try:
            return await handle.query(InvoiceDunningWorkflow.status, rpc_timeout=QUERY_TIMEOUT)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise
            raise ServerUnavailable(
                f"no worker answered for {handle.id} within {QUERY_TIMEOUT.seconds}s: is "
                f"`dunning worker` running on task queue {self.settings.task_queue!r}?"
            ) from None

    async def _input(self, handle: WorkflowHandle[Any, Any]) -> DunningRun:
        """The latest run's input (the invoice and schedule), from its first history event."""
        async for event in handle.fetch_history_events():
            started = event.workflow_execution_started_event_attributes
            [run] = await self.client.data_converter.decode(started.input.payloads, [DunningRun])
            return run
        raise RunNotFound(f"no history for {handle.id}")

    async def _running(self, invoice_id: str) -> tuple[WorkflowHandle[Any, Any], bool]:
        """The run's handle and whether it is still running; RunNotFound if there is none."""
        handle = self._handle(invoice_id)
        try:
            description = await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunNotFound(f"no dunning run for invoice {invoice_id}") from None
            raise _unavailable(exc, self.settings) from None
        return handle, description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING

    def _handle(self, invoice_id: str) -> WorkflowHandle[InvoiceDunningWorkflow, DunningStatus]:
        return self.client.get_workflow_handle_for(
            InvoiceDunningWorkflow.run, workflow_id_for(invoice_id)
        )


def _refused(exc: WorkflowUpdateFailedError) -> ActionRefused:
    """The run's validator said no: its reason, and whether it is a conflict with the state."""
    cause = exc.cause
    if isinstance(cause, ApplicationError):
        return ActionRefused(cause.message, conflict=cause.type != "ActionInvalid",
                             transient=cause.type == "ActionBusy")
    return ActionRefused(str(cause or exc), conflict=True)


def _update_id(action: str, key: str) -> str:
    """An update id from a caller's idempotency key: the same key applies once per run."""
    return f"{action}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def _unavailable(exc: RPCError, settings: Settings) -> Exception:
    return ServerUnavailable(f"Temporal server at {settings.temporal_address}: {exc.message}")
