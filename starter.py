"""The Python API billing code uses: start a dunning run, record a payment, read status and log.

    from starter import DunningClient

    dunning = await DunningClient.connect()          # settings from DUNNING_* variables
    await dunning.start(invoice_dict)                # validated; a second start is a no-op
    await dunning.pay("INV-1001", "250.00", payment_id="pi_123")
    status = await dunning.status("INV-1001")        # DunningStatus (state, balance_due, ...)

Invalid input raises :class:`InvoiceRejected` / :class:`PaymentRefused` before anything is sent
to Temporal, so nothing is ever half-started.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import Client, TLSConfig, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from models.errors import describe
from models.invoice import Invoice, workflow_id_for
from models.payment import PaymentReceived, payment_problem
from models.policy import Policy, load_policies
from models.records import AuditEntry
from models.run import DunningRun, DunningStatus
from settings import Settings
from workflows.dunning import InvoiceDunningWorkflow


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


QUERY_TIMEOUT = timedelta(seconds=10)


@dataclass(frozen=True)
class StartResult:
    invoice_id: str
    workflow_id: str
    started: bool  # False: a run for this invoice already existed; nothing was changed
    detail: str


async def connect(settings: Settings) -> Client:
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
            data_converter=pydantic_data_converter,
            api_key=api_key,
            tls=tls or bool(api_key),
        )
    except RuntimeError as exc:
        text = str(exc)
        reason = "connection refused" if "Connection refused" in text else text.splitlines()[0]
        raise ServerUnavailable(
            f"cannot reach the Temporal server at {settings.temporal_address} ({reason})"
        ) from None


def parse_invoice(data: dict[str, Any], policies: dict[str, Policy]) -> tuple[Invoice, Policy]:
    """Validate an invoice and resolve its policy, or raise InvoiceRejected naming the field."""
    try:
        invoice = Invoice.model_validate(data)
    except ValidationError as exc:
        raise InvoiceRejected(describe(exc)) from None
    policy = policies.get(invoice.policy)
    if policy is None:
        known = ", ".join(sorted(policies))
        raise InvoiceRejected(f"policy: unknown policy {invoice.policy!r} (known: {known})")
    return invoice, policy


class DunningClient:
    """Start, pay, inspect and cancel dunning runs."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.policies = load_policies(settings.policy_file, settings.templates_dir)

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> DunningClient:
        settings = settings or Settings()
        return cls(await connect(settings), settings)

    async def start(self, invoice: dict[str, Any] | Invoice) -> StartResult:
        """Start the run for an invoice. Starting one that already has a run changes nothing."""
        data = invoice.model_dump(mode="json") if isinstance(invoice, Invoice) else invoice
        parsed, policy = parse_invoice(data, self.policies)
        workflow_id = parsed.workflow_id
        try:
            await self.client.start_workflow(
                InvoiceDunningWorkflow.run,
                DunningRun(invoice=parsed, policy=policy),
                id=workflow_id,
                task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                static_summary=f"Dunning {parsed.invoice_id}: policy {policy.name} v{policy.version}",
            )
        except WorkflowAlreadyStartedError:
            return StartResult(parsed.invoice_id, workflow_id, False,
                               "already has a dunning run; nothing changed")
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None
        return StartResult(parsed.invoice_id, workflow_id, True,
                           f"started on policy {policy.name} v{policy.version}")

    async def status(self, invoice_id: str) -> DunningStatus:
        """The live state of a run; for a finished run, the state it finished in."""
        handle = self._handle(invoice_id)
        try:
            description = await handle.describe()
            if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING:
                return await self._query(handle)
            if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED:
                return await handle.result()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunNotFound(f"no dunning run for invoice {invoice_id}") from None
            raise _unavailable(exc, self.settings) from None
        status_name = WorkflowExecutionStatus.Name(description.status)
        raise RunClosed(f"run {handle.id} ended abnormally ({status_name.split('_')[-1].lower()})")

    async def pay(
        self, invoice_id: str, amount: str | Decimal, *, currency: str | None = None,
        payment_id: str | None = None, paid_at: datetime | None = None,
    ) -> PaymentReceived:
        """Record a payment. Checked against the invoice first; idempotent by ``payment_id``.

        Needs no worker: the check reads the run's start input, and the signal is durable, so a
        billing webhook can record payments while workers are down or being deployed.
        """
        handle = await self._open_run(invoice_id)
        try:
            invoice = await self._invoice(handle)
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None
        payment = PaymentReceived(
            payment_id=payment_id or f"manual-{uuid.uuid4().hex[:12]}",
            amount=str(amount).strip(),
            currency=(currency or invoice.currency).strip().upper(),
            paid_at=paid_at or datetime.now(UTC),
        )
        problem = payment_problem(payment, invoice.currency)
        if problem is not None:
            raise PaymentRefused(problem)
        try:
            await handle.signal(InvoiceDunningWorkflow.payment_received, payment)
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None
        return payment

    async def cancel(self, invoice_id: str, reason: str) -> None:
        """Stop dunning an invoice (voided, disputed, handled by hand)."""
        handle = await self._open_run(invoice_id)
        try:
            await handle.signal(InvoiceDunningWorkflow.cancel, reason)
        except RPCError as exc:
            raise _unavailable(exc, self.settings) from None

    def log(self, invoice_id: str) -> list[AuditEntry]:
        """The audit trail of an invoice, from the database."""
        from activities.ledger import Ledger
        from models.database import prepare

        return list(Ledger(prepare(self.settings.database_url)).trail(invoice_id))

    async def _open_run(self, invoice_id: str) -> WorkflowHandle[Any, Any]:
        """The handle of the invoice's run if it is still open; RunNotFound or RunClosed if not."""
        handle = self._handle(invoice_id)
        try:
            description = await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RunNotFound(f"no dunning run for invoice {invoice_id}") from None
            raise _unavailable(exc, self.settings) from None
        if description.status != WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING:
            final = await self.status(invoice_id)
            raise RunClosed(f"the run for {invoice_id} has ended ({final.state}); "
                            "record this in the billing system")
        return handle

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

    async def _invoice(self, handle: WorkflowHandle[Any, Any]) -> Invoice:
        """The invoice the run was started with, from its first history event."""
        async for event in handle.fetch_history_events():
            started = event.workflow_execution_started_event_attributes
            [run] = await self.client.data_converter.decode(started.input.payloads, [DunningRun])
            return run.invoice
        raise RunNotFound(f"no history for {handle.id}")

    def _handle(self, invoice_id: str) -> WorkflowHandle[InvoiceDunningWorkflow, DunningStatus]:
        return self.client.get_workflow_handle_for(
            InvoiceDunningWorkflow.run, workflow_id_for(invoice_id)
        )


def _unavailable(exc: RPCError, settings: Settings) -> Exception:
    return ServerUnavailable(f"Temporal server at {settings.temporal_address}: {exc.message}")
