"""The ``dunning`` command line: server, worker, start, pay, status, log, cancel, demo.

Exit codes: 0 success; 1 the Temporal server or database cannot be reached; 2 bad input (the
one-line reason names the field, row or setting).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from models.database import DatabaseError
from models.errors import describe
from models.intake import Record, read_records
from models.policy import PolicyError
from settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Durable dunning: one Temporal workflow per overdue invoice.")
# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns.
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

T = TypeVar("T")

BAD_INPUT = 2
UNREACHABLE = 1


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise fail(f"settings: {describe(exc)}", BAD_INPUT) from None


def handled(command: Callable[..., T]) -> Callable[..., T]:
    """Turn the product's errors into one-line messages and the documented exit codes."""
    from temporalio.service import RPCError

    from starter import DunningError, ServerUnavailable

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        except ServerUnavailable as exc:
            raise fail(str(exc), UNREACHABLE) from None
        except DatabaseError as exc:
            raise fail(str(exc), UNREACHABLE) from None
        except (DunningError, PolicyError) as exc:
            raise fail(str(exc), BAD_INPUT) from None
        except RPCError as exc:  # anything else the server says: not the user's input
            raise fail(f"Temporal server error: {exc.message}", UNREACHABLE) from None

    return wrapper


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _client(settings: Settings) -> Any:
    from starter import DunningClient

    return await DunningClient.connect(settings)


# -- running the engine ----------------------------------------------------------------------


@app.command()
@handled
def server(
    db_file: Annotated[Path, typer.Option(help="Where the server keeps its state.")] = Path(
        ".dunning/temporal.db"),
    port: Annotated[int, typer.Option(help="Frontend (gRPC) port.")] = 7233,
    ui_port: Annotated[int, typer.Option(help="Web UI port.")] = 8233,
) -> None:
    """Run the embedded Temporal dev server (with the Web UI and the search attributes)."""
    import devserver

    settings = load_settings()
    try:
        process = devserver.start(db_file, port=port, ui_port=ui_port,
                                  namespace=settings.temporal_namespace, quiet=False)
    except devserver.ServerError as exc:
        raise fail(str(exc), UNREACHABLE) from None
    out.print(f"Temporal server on 127.0.0.1:{port}; Web UI at http://127.0.0.1:{ui_port}")

    def shutdown(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shutdown)
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        devserver.stop(process)


@app.command()
@handled
def worker() -> None:
    """Run a worker: the dunning workflows and their delivery activities."""
    from worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(run_worker(load_settings()))


@app.command()
@handled
def migrate() -> None:
    """Apply the database schema migrations (run once per release against PostgreSQL)."""
    from models.database import migrate as upgrade

    settings = load_settings()
    try:
        upgrade(settings.database_url)
    except Exception as exc:  # driver errors differ per database
        raise DatabaseError(f"migration failed: {exc.__class__.__name__}: {exc}") from exc
    out.print("database schema is up to date")


@app.command("register-search-attributes")
@handled
def register_search_attributes(
    print_only: Annotated[bool, typer.Option(help="Only print the temporal CLI commands.")] = False,
) -> None:
    """One-time setup of the search attributes on an existing Temporal cluster."""
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    import devserver
    from starter import connect
    from workflows import search

    settings = load_settings()
    if print_only:
        for line in devserver.register_commands(settings.temporal_address,
                                                settings.temporal_namespace):
            out.print(line, highlight=False, soft_wrap=True)
        return

    async def register() -> None:
        client = await connect(settings)
        request = AddSearchAttributesRequest(
            namespace=settings.temporal_namespace,
            search_attributes={key.name: key.indexed_value_type for key in search.ALL},
        )
        try:
            await client.operator_service.add_search_attributes(request)
        except Exception as exc:
            if "already" not in str(exc).lower():
                raise
    run(register())
    out.print(f"search attributes registered in namespace {settings.temporal_namespace}")


# -- invoices --------------------------------------------------------------------------------


def _read(files: list[str]) -> list[Record]:
    records: list[Record] = []
    for name in files:
        if name == "-":
            records += read_records(sys.stdin.read(), "stdin")
            continue
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise fail(f"{name}: {exc.strerror}", BAD_INPUT) from None
        records += read_records(text, name)
    return records


@app.command()
@handled
def start(
    files: Annotated[list[str], typer.Argument(help="Invoice files (JSON, JSON Lines, CSV); - for stdin.")],
    concurrency: Annotated[int, typer.Option(help="Starts in flight at once.")] = 32,
) -> None:
    """Start one dunning run per invoice. Invoices already being dunned are left as they are."""
    from models.policy import load_policies
    from starter import InvoiceRejected, parse_invoice

    settings = load_settings()
    policies = load_policies(settings.policy_file, settings.templates_dir)
    valid: list[Record] = []
    rejected: list[Record] = []
    for record in _read(files):
        if record.error is not None or record.data is None:
            rejected.append(record)
            continue
        try:
            parse_invoice(record.data, policies)
            valid.append(record)
        except InvoiceRejected as exc:
            rejected.append(Record(record.source, record.row, None, str(exc)))
    for record in rejected:
        err.print(f"{record.where}: rejected: {record.error}", highlight=False, soft_wrap=True)

    async def go() -> None:
        dunning = await _client(settings)
        gate = asyncio.Semaphore(concurrency)
        quiet = len(valid) > 20

        async def one(record: Record) -> bool:
            async with gate:
                result = await dunning.start(record.data)
            if not quiet:
                verb = "started" if result.started else "unchanged"
                out.print(f"{result.invoice_id}: {verb} ({result.detail})", highlight=False)
            progress.advance(task)
            return result.started

        with Progress(console=err, transient=True, disable=not quiet) as progress:
            task = progress.add_task("starting", total=len(valid))
            results = await asyncio.gather(*(one(r) for r in valid), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        if quiet:
            started = sum(1 for r in results if r is True)
            out.print(f"{started} started, {len(valid) - started} already had a run (unchanged)")

    if valid:
        run(go())
    if rejected:
        raise fail(f"{len(rejected)} invoice(s) rejected, {len(valid)} submitted", BAD_INPUT)


@app.command()
@handled
def pay(
    invoice_id: str,
    amount: str,
    currency: Annotated[str | None, typer.Option(help="Defaults to the invoice's currency.")] = None,
    payment_id: Annotated[str | None, typer.Option(help="Idempotency key (e.g. the PSP id).")] = None,
) -> None:
    """Record a payment against an invoice under dunning."""
    settings = load_settings()

    async def go() -> Any:
        dunning = await _client(settings)
        return await dunning.pay(invoice_id, amount, currency=currency, payment_id=payment_id)

    payment = run(go())
    out.print(f"{invoice_id}: payment {payment.payment_id} of {payment.amount} {payment.currency} "
              "sent to the run", highlight=False)


@app.command()
@handled
def cancel(invoice_id: str, reason: Annotated[str, typer.Option(help="Why dunning stops.")]) -> None:
    """Stop dunning an invoice (voided, disputed, handled by hand)."""
    settings = load_settings()

    async def go() -> None:
        await (await _client(settings)).cancel(invoice_id, reason)

    run(go())
    out.print(f"{invoice_id}: cancellation sent")


@app.command()
@handled
def status(invoice_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the live state of an invoice's run."""
    settings = load_settings()

    async def go() -> Any:
        return await (await _client(settings)).status(invoice_id)

    current = run(go())
    if as_json:
        print(current.model_dump_json(indent=2))
        return
    table = Table(show_header=False, box=None)
    upcoming = current.next_step
    rows = {
        "invoice": current.invoice_id, "workflow": current.workflow_id, "state": current.state,
        "stage": current.stage or "-",
        "balance due": f"{current.balance_due} {current.currency} (of {current.amount_due})",
        "credit": f"{current.credit} {current.currency}" if current.credit else "-",
        "next step": f"{upcoming.name} by {upcoming.channel} at {upcoming.at:%Y-%m-%d %H:%M %Z}"
        if upcoming else "-",
        "policy": f"{current.policy} v{current.policy_version}",
    }
    for name, value in rows.items():
        table.add_row(name, str(value))
    out.print(table)


@app.command()
@handled
def log(invoice_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the audit trail of an invoice: every message, payment, skip and state change."""
    from activities.ledger import Ledger
    from models.database import prepare

    settings = load_settings()
    entries = Ledger(prepare(settings.database_url)).trail(invoice_id)
    if as_json:
        print(json.dumps([
            {"at": e.at.isoformat(), "kind": e.kind, "step": e.step, "channel": e.channel,
             "status": e.status, "detail": e.detail} for e in entries
        ], indent=2))
        return
    if not entries:
        raise fail(f"nothing recorded for invoice {invoice_id}", BAD_INPUT)
    table = Table("at", "kind", "step", "channel", "status", "detail")
    for e in entries:
        table.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.kind, e.step or "", e.channel or "", e.status,
                      e.detail)
    out.print(table)


@app.command()
@handled
def outbox(
    invoice_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the messages kept for an invoice in outbox mode, exactly as they would be sent."""
    from activities.outbox import messages_for
    from models.database import prepare

    settings = load_settings()
    messages = messages_for(prepare(settings.database_url), invoice_id)
    if as_json:
        print(json.dumps([m.model_dump(mode="json", exclude={"id"}) for m in messages], indent=2))
        return
    if not messages:
        raise fail(f"no outbox messages for invoice {invoice_id}", BAD_INPUT)
    for m in messages:
        step = m.reference.split("/")[1]
        out.rule(f"{m.created_at:%Y-%m-%d %H:%M:%S} · {step} · {m.channel} to {m.recipient}")
        if m.subject:
            out.print(f"Subject: {m.subject}", highlight=False)
        out.print(m.body, highlight=False, markup=False)


@app.command()
@handled
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the server running afterwards for the UI.")] = False,
) -> None:
    """Watch reminders escalate on a fast policy: one invoice paid, one handed off, in a minute."""
    from demo import run_demo

    run(run_demo(out, keep=keep))


def main() -> None:
    """Console-script entry point.

    Leaves with ``os._exit`` after flushing: the Temporal client's native runtime threads can
    abort the interpreter's own shutdown (SIGABRT in PyGILState_Release), which would replace the
    documented exit code. Everything the command wrote is committed or flushed by then.
    """
    code = 0
    try:
        app()
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
