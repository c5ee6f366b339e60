"""The ``dunning`` command line: server, worker, start, pay, status, log, cancel, retry, customer,
unmatched, reconcile, codec-server, demo; and the actions on a run: pause, resume, dispute,
resolve, promise, plan, write-off, escalate.

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
from rich.text import Text

from models.database import OPERATIONAL_ERRORS, DatabaseError, database_error
from models.intake import Record, read_records
from models.policy import PolicyError
from settings import Settings, describe_settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Durable dunning: one Temporal workflow per overdue invoice.")
# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns.
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

T = TypeVar("T")

BAD_INPUT = 2
UNREACHABLE = 1
PENDING = 3  # no worker answered: the request is with the run and applies when one runs


def fail(message: str, code: int, label: str = "error") -> typer.Exit:
    err.print(Text.assemble((f"{label}:", "red" if label == "error" else "yellow"), " ", message),
              soft_wrap=True)
    return typer.Exit(code)


def plain(value: object) -> Text:
    """Data exactly as it is. Customers' and operators' words reach every table and line (an SMS
    reply "paid already [/] thanks", a hold reason "[red]x"): as Rich markup they would restyle
    the output or crash the command."""
    return Text(str(value))


def add_row(table: Table, *cells: object) -> None:
    """Every table's rows go through here, so no cell is read as markup."""
    table.add_row(*(plain(cell) for cell in cells))


def say(message: str, *, console: Console = out, soft_wrap: bool = False) -> None:
    """Print a line that carries data (ids, reasons, details); see ``plain``."""
    console.print(plain(message), soft_wrap=soft_wrap)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise fail(f"settings: {describe_settings(exc)}", BAD_INPUT) from None


def handled(command: Callable[..., T]) -> Callable[..., T]:
    """Turn the product's errors into one-line messages and the documented exit codes."""
    from temporalio.service import RPCError

    from codec import PayloadUnreadable
    from starter import DunningError, Pending, ServerUnavailable

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        except Pending as exc:
            raise fail(str(exc), PENDING, label="pending") from None
        except ServerUnavailable as exc:
            raise fail(str(exc), UNREACHABLE) from None
        except DatabaseError as exc:
            raise fail(str(exc), UNREACHABLE) from None
        except OPERATIONAL_ERRORS as exc:  # the database went away or was busy meanwhile
            raise fail(str(database_error(exc)), UNREACHABLE) from None
        except PayloadUnreadable as exc:
            raise fail(f"cannot read the run: {exc}", UNREACHABLE) from None
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
    # The Twilio SDK logs each request's parameters (To, Body) at INFO: personal data.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)
    run(run_worker(load_settings()))


@app.command()
@handled
def migrate() -> None:
    """Apply the database schema migrations (run once per release against PostgreSQL)."""
    from models.database import migrate as upgrade

    settings = load_settings()
    try:
        upgrade(settings.database())
    except DatabaseError:  # already says what to do (e.g. a newer release migrated it)
        raise
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
            say(line, soft_wrap=True)
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
    say(f"search attributes registered in namespace {settings.temporal_namespace}")


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
    from models.charges import FeesError, load_rates
    from models.policy import load_policy_book
    from starter import InvoiceRejected, parse_invoice, plan_invoice

    if concurrency < 1:  # 0 would wait forever for a free slot
        raise fail(f"--concurrency: must be at least 1, got {concurrency}", BAD_INPUT)
    settings = load_settings()
    book = load_policy_book(settings.policy_file, settings.templates_dir)
    try:
        rates = load_rates(settings.rates_file)
    except FeesError as exc:
        raise fail(str(exc), BAD_INPUT) from None
    hosts = settings.payment_hosts()
    valid: list[Record] = []
    rejected: list[Record] = []
    for record in _read(files):
        if record.error is not None or record.data is None:
            rejected.append(record)
            continue
        try:
            invoice, policy, _why = parse_invoice(record.data, book, hosts)
            plan_invoice(invoice, policy, rates)  # fees the rates file cannot back: this row only
            valid.append(record)
        except InvoiceRejected as exc:
            rejected.append(Record(record.source, record.row, None, str(exc)))
    for record in rejected:
        say(f"{record.where}: rejected: {record.error}", console=err, soft_wrap=True)
    if not valid and not rejected:  # an empty export is a billing-side problem worth hearing of
        raise fail(f"no invoices in {', '.join(files)}", BAD_INPUT)

    async def go() -> None:
        dunning = await _client(settings)
        gate = asyncio.Semaphore(concurrency)
        quiet = len(valid) > 20

        async def one(record: Record) -> bool:
            async with gate:
                result = await dunning.start(record.data)
            if not quiet:
                verb = "started" if result.started else "excluded" if result.excluded else "unchanged"
                say(f"{result.invoice_id}: {verb} ({result.detail})")
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


policy_app = typer.Typer(no_args_is_help=True, help="Which policy an invoice gets, and its schedule.")
app.add_typer(policy_app, name="policy")


@policy_app.command("explain")
@handled
def policy_explain(file: Annotated[str, typer.Argument(help="One invoice (JSON); - for stdin.")]) -> None:
    """Which rule chose which policy for an invoice, and every step with its real date and time."""
    from zoneinfo import ZoneInfo

    from models.charges import FeesError, load_rates
    from models.contact import Customer as ContactFacts
    from models.contact import customer_zones, defer
    from models.invoice import plan_run
    from models.policy import format_offset, load_policy_book
    from starter import parse_invoice

    settings = load_settings()
    book = load_policy_book(settings.policy_file, settings.templates_dir)
    records = [r for r in _read([file])]
    if len(records) != 1 or records[0].data is None:
        raise fail(f"{file}: give exactly one invoice" + (f" ({records[0].error})" if records and
                                                           records[0].error else ""), BAD_INPUT)
    invoice, policy, why = parse_invoice(records[0].data, book, settings.payment_hosts())
    zone_name = invoice.zone(policy.default_timezone)
    zone = ZoneInfo(zone_name)
    say(f"{invoice.invoice_id}: policy {policy.name} v{policy.version} ({why})")
    if invoice.customer.exclude:
        out.print("  the customer is excluded from dunning: nothing would run", highlight=False)
        return
    table = Table(box=None)
    for column in ("step", "channel", "after due", f"when ({zone_name})", "goes out (contact window)"):
        table.add_column(plain(column))
    try:
        planned = plan_run(invoice, policy, load_rates(settings.rates_file))
    except FeesError as exc:
        raise fail(f"fees: {exc}", BAD_INPUT) from None
    facts = ContactFacts(timezone=invoice.customer.timezone, phone=invoice.customer.phone,
                         country=invoice.customer.country, region=invoice.customer.region)
    for entry in planned.schedule:
        step = entry.step
        deferral = defer(entry.at, policy.contact, facts, None, key=f"{invoice.invoice_id}/{step.name}")
        add_row(table, step.name, step.channel.value, format_offset(step.after_due),
                entry.at.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z"),
                deferral.until.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z") if deferral else "same")
    out.print(table)
    notes = [f"listens for payments {format_offset(policy.close_after)} after the last step",
             f"the agency no sooner than {format_offset(policy.agency_notice)} after a message reached "
             "the customer"]
    if policy.agency_min_balance:
        notes.append("no agency below " + ", ".join(f"{v} {k}" for k, v in policy.agency_min_balance.items()))
    rules = policy.contact.for_customer(invoice.customer.country, invoice.customer.region)
    zones = customer_zones(invoice.customer.timezone, invoice.customer.phone, policy.default_timezone)
    notes.append(f"contacts {rules.hours}, {rules.days}, in {', '.join(zones)} (a step outside it waits "
                 "for the window)")
    caps = [f"{c} {v}" for c, v in rules.caps.items()] + [f"{c} {v} per invoice"
                                                          for c, v in rules.caps_per_invoice.items()]
    if caps:
        notes.append("caps: " + ", ".join(caps))
    if rules.consolidate:
        within = format_offset(rules.consolidate)
        notes.append(f"one message with the customer's other invoices due within {within}")
    terms = planned.terms
    if terms is not None:
        if terms.step_fee:
            notes.append(f"a fee of {terms.step_fee} {invoice.currency} for each step sent")
        if terms.rate:
            follows = ", then each half-year's rate" if terms.later_rates else ""
            notes.append(f"statutory interest ({terms.rule}): {terms.rate}% a year (reference "
                         f"{terms.reference_rate}% from {terms.reference_from} + {terms.points}{follows})"
                         " from "
                         f"{terms.interest_from}" + (f", compensation {terms.flat} {invoice.currency}"
                                                     if terms.flat else ""))
        if terms.note:
            notes.append(f"note: {terms.note}")
    for note in notes:
        say(f"  {note}")


@app.command()
@handled
def pay(
    invoice_id: str,
    amount: str,
    payment_id: Annotated[str, typer.Option(
        help="The payment's own id (the PSP's, the bank transfer's reference): the same id twice "
             "counts once, so a repeated command never books the money twice.")],
    currency: Annotated[str | None, typer.Option(help="Defaults to the invoice's currency.")] = None,
    actor: Actor = None,
) -> None:
    """Record a payment against an invoice under dunning."""
    settings = load_settings()

    async def go() -> Any:
        dunning = await _client(settings)
        return await dunning.pay(invoice_id, amount, currency=currency, payment_id=payment_id,
                                 actor=who_asks(actor))

    result = run(go())
    payment = result.payment
    say(f"{invoice_id}: payment {payment.payment_id} of {payment.amount} {payment.currency}: "
        f"{result.outcome} ({result.detail})")


@app.command()
@handled
def cancel(invoice_id: str, reason: Annotated[str, typer.Option(help="Why dunning stops.")],
           actor: Actor = None) -> None:
    """Stop dunning an invoice (voided, disputed, handled by hand)."""
    settings = load_settings()

    async def go() -> str:
        return await (await _client(settings)).cancel(invoice_id, reason, actor=who_asks(actor))

    say(f"{invoice_id}: {run(go())}")


@app.command()
@handled
def retry(invoice_id: str) -> None:
    """Try a failed run's step again, after fixing what failed it (template, data)."""
    settings = load_settings()

    async def go() -> None:
        await (await _client(settings)).retry(invoice_id)

    run(go())
    say(f"{invoice_id}: retry sent")


@app.command()
@handled
def letter(invoice_id: str,
           out_file: Annotated[Path | None, typer.Option(
               "--out", help="Where to write the PDF (default: final-notice-INVOICE.pdf here).")] = None,
           ) -> None:
    """Write the formal final notice of an invoice as a PDF letter (amounts as they stand now)."""
    settings = load_settings()

    async def go() -> tuple[str, bytes]:
        return await (await _client(settings)).letter(invoice_id)

    try:
        name, pdf = run(go())
    except LookupError as exc:
        raise fail(str(exc), BAD_INPUT) from None
    target = out_file or Path(name)
    target.write_bytes(pdf)
    say(f"{invoice_id}: final notice written to {target} ({len(pdf)} bytes)")


@app.command()
@handled
def status(invoice_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the live state of an invoice's run."""
    settings = load_settings()

    async def go() -> Any:
        return await (await _client(settings)).status(invoice_id)

    show_status(run(go()), as_json)


@app.command(name="list")
@handled
def list_runs(
    state: Annotated[str | None, typer.Option(help="Only runs in this state (active, paid, ...).")] = None,
    customer: Annotated[str | None, typer.Option(help="Only this customer's runs.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List runs, newest first, as Temporal's search attributes have them (no personal data)."""
    settings = load_settings()

    async def go() -> Any:
        return await (await _client(settings)).list_runs(state=state, customer_id=customer, page_size=limit)

    runs, _ = run(go())
    show_rows([{"invoice": r.invoice_id, "state": r.state, "stage": r.stage or "-",
                "balance": f"{r.balance_due:.2f} {r.currency}" if r.balance_due is not None else "-",
                "customer": r.customer_id or "-", "due": f"{r.due_at:%Y-%m-%d}" if r.due_at else "-",
                "running": "yes" if r.running else "no"} for r in runs], as_json, "no runs")


def show_rows(rows: list[dict[str, Any]], as_json: bool, none: str) -> None:
    """Rows as a table (``none`` when there are none), or as JSON."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print(none)
        return
    table = Table(*rows[0].keys())
    for row in rows:
        add_row(table, *row.values())
    out.print(table)


def show_status(current: Any, as_json: bool) -> None:
    """A run's status as a table, or as the JSON the API also answers."""
    if as_json:
        print(current.model_dump_json(indent=2))
        return
    table = Table(show_header=False, box=None)
    upcoming, hold = current.next_step, current.hold
    rows = {
        "invoice": current.invoice_id, "workflow": current.workflow_id, "state": current.state,
        "stage": current.stage or "-",
        "balance due": f"{current.balance_due} {current.currency} (of {current.amount_due})",
        "credit": f"{current.credit} {current.currency}" if current.credit else "-",
        "credited or written off": f"{current.adjusted} {current.currency}" if current.adjusted else "-",
        "hold": (f"{hold.kind} since {hold.since:%Y-%m-%d %H:%M %Z}"
                 + (f" until {hold.until:%Y-%m-%d %H:%M %Z}" if hold.until and not hold.instalments else "")
                 + (": " + ", ".join(f"{amount} on {day.isoformat()}" for day, amount in hold.instalments)
                    + f"; paid toward it {hold.paid_toward} {current.currency}"
                    + (f"; next reminder or check {hold.until:%Y-%m-%d %H:%M %Z}" if hold.until else "")
                    if hold.instalments else "")
                 + (f" ({hold.amount} {current.currency})" if hold.amount else "")
                 + (f": {hold.reason}" if hold.reason else "")) if hold else "-",
        # a hold on the customer (bankruptcy, cease, exclusion) stops this run's contact too
        "customer holds": ", ".join(current.customer_holds) + " (nothing is sent)"
        if current.customer_holds else "-",
        "next step": f"{upcoming.name} by {upcoming.channel} at {upcoming.at:%Y-%m-%d %H:%M %Z}"
        if upcoming else "-",
        **({"principal": f"{current.principal} {current.currency}",
            "fees": f"{current.fees} {current.currency}",
            "interest": f"{current.interest} {current.currency}"
                        + (f" ({current.interest_rate}% a year)" if current.interest_rate else ""),
            "total due": f"{current.total_due} {current.currency}"} if current.principal is not None else {}),
        "deferred": (f"until {current.deferred_until:%Y-%m-%d %H:%M %Z}: {current.deferred_because}"
                     if current.deferred_until else "-"),
        "policy": f"{current.policy} v{current.policy_version}",
        "detail": current.detail or "-",
    }
    for name, value in rows.items():
        add_row(table, name, value)
    out.print(table)


# -- actions on a run (Temporal Updates: a yes with the new status, or the reason for a no) --------

Actor = Annotated[str | None, typer.Option(
    "--actor", help="Who asks (default: $DUNNING_ACTOR or your login).")]
Json = Annotated[bool, typer.Option("--json", help="Print the status after the action as JSON.")]


def who_asks(actor: str | None) -> str:
    """``--actor``, else $DUNNING_ACTOR, else the login: who the audit trail says asked."""
    import getpass

    return actor or os.environ.get("DUNNING_ACTOR") or f"cli:{getpass.getuser()}"


def act(invoice_id: str, action: str, fields: dict[str, Any], actor: str | None, as_json: bool) -> None:
    settings = load_settings()
    who = who_asks(actor)

    async def go() -> Any:
        return await (await _client(settings)).act(
            invoice_id, action, {k: v for k, v in fields.items() if v is not None}, actor=who)

    current = run(go())
    if not as_json:
        say(f"{invoice_id}: {action} done")
    show_status(current, as_json)


@app.command()
@handled
def pause(invoice_id: str, reason: Annotated[str, typer.Option(help="Why.")],
          until: Annotated[str | None, typer.Option(
              help="ISO 8601 date-time; resumes by itself then.")] = None,
          actor: Actor = None, as_json: Json = False) -> None:
    """Stop sending and handing off until resumed (or --until); the schedule then shifts."""
    act(invoice_id, "pause", {"reason": reason, "until": until}, actor, as_json)


@app.command()
@handled
def resume(invoice_id: str, reason: Annotated[str | None, typer.Option(help="Why.")] = None,
           actor: Actor = None, as_json: Json = False) -> None:
    """End a pause, a dispute (as rejected) or a promise early; escalation goes on, shifted."""
    act(invoice_id, "resume", {"reason": reason}, actor, as_json)


@app.command()
@handled
def dispute(invoice_id: str, reason: Annotated[str, typer.Option(help="What the customer disputes.")],
            amount: Annotated[str | None, typer.Option(help="Disputed amount (default: all).")] = None,
            actor: Actor = None, as_json: Json = False) -> None:
    """The customer disputes the invoice: no contact and no handoff until resolved."""
    act(invoice_id, "dispute", {"reason": reason, "amount": amount}, actor, as_json)


@app.command()
@handled
def resolve(invoice_id: str, outcome: Annotated[str, typer.Option(help="upheld or rejected.")],
            note: Annotated[str | None, typer.Option(help="A note for the trail.")] = None,
            actor: Actor = None, as_json: Json = False) -> None:
    """Resolve a dispute: upheld credits the disputed amount; rejected resumes escalation."""
    act(invoice_id, "resolve", {"outcome": outcome, "note": note}, actor, as_json)


@app.command()
@handled
def promise(invoice_id: str, amount: Annotated[str, typer.Option(help="Promised amount.")],
            by: Annotated[str, typer.Option(help="ISO 8601 date, in the customer's time zone.")],
            source: Annotated[str, typer.Option(help="customer or agent.")] = "customer",
            actor: Actor = None, as_json: Json = False) -> None:
    """The customer promises to pay by a date: no escalation until the end of that day."""
    act(invoice_id, "promise", {"amount": amount, "by": by, "source": source}, actor, as_json)


@app.command()
@handled
def plan(invoice_id: str,
         instalment: Annotated[list[str], typer.Option(help="DATE:AMOUNT, once per instalment.")],
         actor: Actor = None, as_json: Json = False) -> None:
    """Put the invoice on instalments that add up to the balance; reminders of each instead of
    escalation; a missed instalment (after the policy's plan_grace) resumes escalation."""
    items = []
    for index, text in enumerate(instalment):
        due_on, sep, amount = text.partition(":")
        if not sep:
            raise fail(f"instalment[{index}]: {text!r} is not DATE:AMOUNT", BAD_INPUT)
        items.append({"due_on": due_on, "amount": amount})
    act(invoice_id, "plan", {"instalments": items}, actor, as_json)


@app.command("write-off")
@handled
def write_off(invoice_id: str, reason: Annotated[str, typer.Option(help="Why.")],
              amount: Annotated[str | None, typer.Option(help="Part to write off (default: all).")] = None,
              actor: Actor = None, as_json: Json = False) -> None:
    """Write off the balance (the run closes; the agency is told) or a part of it."""
    act(invoice_id, "write-off", {"reason": reason, "amount": amount}, actor, as_json)


@app.command()
@handled
def reverse(invoice_id: str,
            amount: Annotated[str, typer.Argument(help="Everything taken back under --key so far.")],
            key: Annotated[str, typer.Option(help="The refund, chargeback or reversal id.")],
            reason: Annotated[str, typer.Option(help="Why.")] = "",
            actor: Actor = None, as_json: Json = False) -> None:
    """A payment taken back (refund, lost chargeback): owed again; a paid run is reopened."""
    settings = load_settings()
    who = who_asks(actor)

    async def go() -> Any:
        return await (await _client(settings)).reverse(invoice_id, amount, key=key, reason=reason,
                                                       actor=who)

    current = run(go())
    if not as_json:
        say(f"{invoice_id}: reversal {key} recorded")
    show_status(current, as_json)


@app.command()
@handled
def hold(customer_id: str,
         kind: Annotated[str, typer.Option(help="dispute, bankruptcy, deceased, cease-communication "
                                                "or do-not-contact.")],
         reason: Annotated[str, typer.Option(help="Why.")], actor: Actor = None) -> None:
    """Hold a customer: no contact and no handoff on any of their invoices; payments still count."""
    settings = load_settings()

    async def go() -> Any:
        return await (await _client(settings)).hold_customer(customer_id, kind, reason,
                                                             actor=who_asks(actor))

    say(f"customer {customer_id}: holds now {', '.join(run(go())) or 'none'}")


@app.command()
@handled
def release(customer_id: str, kind: Annotated[str, typer.Option(help="The hold to release.")],
            actor: Actor = None) -> None:
    """Release a customer's hold; their runs go on by the usual rule when none is left."""
    settings = load_settings()

    async def go() -> Any:
        return await (await _client(settings)).hold_customer(customer_id, kind, "", actor=who_asks(actor),
                                                             release=True)

    say(f"customer {customer_id}: holds now {', '.join(run(go())) or 'none'}")


@app.command()
@handled
def escalate(invoice_id: str, reason: Annotated[str, typer.Option(help="Why now.")],
             actor: Actor = None, as_json: Json = False) -> None:
    """Run the next step now."""
    act(invoice_id, "escalate", {"reason": reason}, actor, as_json)


@app.command()
@handled
def log(invoice_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the audit trail of an invoice: every message, payment, skip and state change."""
    from activities.ledger import Ledger
    from models.database import prepare

    settings = load_settings()
    entries = Ledger(prepare(settings.database())).trail(invoice_id)
    if not entries:  # every run's trail starts with its start: an unknown invoice, or a typo
        raise fail(f"nothing recorded for invoice {invoice_id}", BAD_INPUT)
    if as_json:
        print(json.dumps([
            {"at": e.at.isoformat(), "kind": e.kind, "step": e.step, "channel": e.channel,
             "status": e.status, "detail": e.detail} for e in entries
        ], indent=2))
        return
    table = Table("at", "kind", "step", "channel", "status", "detail")
    for e in entries:
        add_row(table, f"{e.at:%Y-%m-%d %H:%M:%S}", e.kind, e.step or "", e.channel or "", e.status,
                e.detail)
    out.print(table)


@app.command()
@handled
def outbox(
    invoice_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the messages kept for an invoice in outbox mode, exactly as they would be sent."""
    from activities.ledger import Ledger
    from activities.outbox import messages_for
    from models.database import prepare

    engine = prepare(load_settings().database())
    messages = messages_for(engine, invoice_id, shared=True)
    if not messages and Ledger(engine).run(invoice_id) is None:  # an unknown invoice, or a typo
        raise fail(f"nothing recorded for invoice {invoice_id}", BAD_INPUT)
    if as_json:
        print(json.dumps([m.model_dump(mode="json", exclude={"id"}) for m in messages], indent=2))
        return
    if not messages:
        raise fail(f"no outbox messages for invoice {invoice_id}", BAD_INPUT)
    for m in messages:
        step = m.reference.split("/")[1]
        out.rule(plain(f"{m.created_at:%Y-%m-%d %H:%M:%S} · {step} · {m.channel} to {m.recipient}"))
        if m.subject:
            say(f"Subject: {m.subject}")
        say(m.body)


@app.command()
@handled
def unmatched(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List payments for invoices that had no dunning run (kept, never lost)."""
    from activities.ledger import Ledger
    from models.database import prepare

    payments = Ledger(prepare(load_settings().database())).payments("unmatched")
    show_rows([{"invoice_id": p.invoice_id, "payment_id": p.payment_id, "amount": p.amount,
                "currency": p.currency, "paid_at": p.paid_at.isoformat(),
                "received_at": p.received_at.isoformat()} for p in payments],
              as_json, "no unmatched payments")


webhooks_app = typer.Typer(no_args_is_help=True,
                           help="The providers' webhook events, kept before they are processed.")
app.add_typer(webhooks_app, name="webhooks")


@webhooks_app.command("list")
@handled
def webhooks_list(
    status: Annotated[str, typer.Option(help="failed, pending, done, ignored, or all")] = "failed",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Events that need an operator (failed, by default): what came, and why it was not taken."""
    from inbox import Inbox
    from models.database import prepare

    try:
        events = Inbox(prepare(load_settings().database())).listed(status)
    except ValueError as exc:
        raise fail(f"--{exc}", BAD_INPUT) from None
    rows = [Inbox.summary(e) for e in events]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print(f"no {'' if status == 'all' else status + ' '}webhook events")
        return
    table = Table(*rows[0].keys())
    for row in rows:
        add_row(table, *row.values())
    out.print(table)


@webhooks_app.command("retry")
@handled
def webhooks_retry(event_ids: Annotated[list[int], typer.Argument(help="Ids from `dunning webhooks list`.")]
                   ) -> None:
    """Process failed events again, after fixing what failed them (the API's inbox pass takes them)."""
    from inbox import Inbox
    from models.database import prepare

    inbox = Inbox(prepare(load_settings().database()))
    refused = []
    for event_id in event_ids:
        if inbox.requeue(event_id):
            say(f"webhook event {event_id}: queued again")
        else:
            refused.append(str(event_id))
    if refused:
        raise fail(f"no failed webhook event {', '.join(refused)} (see `dunning webhooks list`)", BAD_INPUT)


@app.command()
@handled
def reconcile(
    delivery_id: Annotated[int | None, typer.Argument(help="The ledger id to settle.")] = None,
    sent: Annotated[bool | None, typer.Option("--sent/--not-sent",
                                              help="What the provider's console shows.")] = None,
    note: Annotated[str, typer.Option(help="How you know.")] = "",
) -> None:
    """List messages whose outcome is unknown, or settle one: `reconcile 12 --sent --note ...`."""
    from activities.ledger import Ledger
    from models.database import prepare
    from models.records import MAX_ROW_ID

    # ids are a 32-bit integer column: a bigger number is a typo, and PostgreSQL would refuse it
    # with a driver error instead of "no such delivery"
    if delivery_id is not None and not 1 <= delivery_id <= MAX_ROW_ID:
        raise fail(f"delivery id {delivery_id}: no such delivery (ids run from 1 to {MAX_ROW_ID}; "
                   "`dunning reconcile` lists them)", BAD_INPUT)
    ledger = Ledger(prepare(load_settings().database()))
    if delivery_id is None:
        rows = ledger.unknown_deliveries()
        if not rows:
            out.print("no deliveries with an unknown outcome")
            return
        table = Table("id", "invoice", "step", "channel", "since", "detail")
        for d in rows:
            add_row(table, d.id, d.invoice_id, d.step, d.channel, f"{d.updated_at:%Y-%m-%d %H:%M}",
                    d.detail)
        out.print(table)
        return
    if sent is None:
        raise fail("say --sent or --not-sent", BAD_INPUT)
    if not note.strip():
        raise fail("note: say how you know (e.g. 'Twilio console shows SM... delivered')", BAD_INPUT)
    try:
        row = ledger.settle(delivery_id, "sent" if sent else "failed", note.strip())
    except LookupError as exc:
        raise fail(str(exc), BAD_INPUT) from None
    say(f"delivery {row.id} ({row.invoice_id} {row.step} {row.channel}): {row.status}")


customer_app = typer.Typer(no_args_is_help=True, help="Customers' contact details (kept out of Temporal).")
app.add_typer(customer_app, name="customer")


@customer_app.command("update")
@handled
def customer_update(
    customer_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    email: Annotated[str | None, typer.Option()] = None,
    phone: Annotated[str | None, typer.Option(help="E.164, e.g. +14155550100")] = None,
    timezone: Annotated[str | None, typer.Option()] = None,
    locale: Annotated[str | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option("--type", help="consumer or business")] = None,
    country: Annotated[str | None, typer.Option(help="ISO 3166-1, e.g. DE")] = None,
    region: Annotated[str | None, typer.Option(help="ISO 3166-2, e.g. US-MA")] = None,
    policy: Annotated[str | None, typer.Option(help="The customer's own policy ('' clears it).")] = None,
    exclude: Annotated[bool | None, typer.Option("--exclude/--include",
                                                 help="Exclude from dunning, or include again.")] = None,
) -> None:
    """Change a customer's details; runs in flight use them from their next message. Only a
    customer the engine knows (their first invoice stored them): an unknown id is a typo, not a
    new customer."""
    from activities.ledger import Ledger
    from models.database import prepare
    from models.policy import load_policy_book
    from starter import change_customer

    settings = load_settings()
    ledger = Ledger(prepare(settings.database()))
    if ledger.customer(customer_id) is None:
        raise fail(f"no customer {customer_id} exists (customers are stored when an invoice of theirs "
                   "starts)", BAD_INPUT)
    given = {"name": name, "email": email, "phone": phone, "timezone": timezone, "locale": locale,
             "type": kind, "country": country, "region": region, "policy": policy}
    # '' clears a field
    changes: dict[str, Any] = {"id": customer_id, **{k: v or None for k, v in given.items() if v is not None}}
    if exclude is not None:
        changes["exclude"] = exclude
    book = load_policy_book(settings.policy_file, settings.templates_dir) if policy else None
    change_customer(ledger, changes, book)
    say(f"customer {customer_id}: details updated")


@customer_app.command("forget")
@handled
def customer_forget(customer_id: str) -> None:
    """Erase a customer's contact details and message bodies (the audit facts stay)."""
    from activities.ledger import Ledger
    from models.database import prepare

    try:
        erased = Ledger(prepare(load_settings().database())).forget(customer_id)
    except LookupError as exc:
        raise fail(str(exc), BAD_INPUT) from None
    say(f"customer {customer_id}: contact details erased, {erased} message bodies erased")


@app.command("api")
@handled
def api_server(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; OpenAPI docs at /docs.")] = 8000,
) -> None:
    """Serve the HTTP API (bearer keys from DUNNING_API_KEYS; it refuses to start without one)."""
    from api import parse_keys, serve

    settings = load_settings()
    try:
        parse_keys(settings.api_keys.get_secret_value() if settings.api_keys else "")
    except ValueError as exc:
        raise fail(f"settings: {exc}", BAD_INPUT) from None
    say(f"dunning API on http://{host}:{port} (OpenAPI: http://{host}:{port}/docs)", console=err)
    serve(settings, host=host, port=port)


@app.command("codec-server")
@handled
def codec_server(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8081,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
) -> None:
    """Serve Temporal's codec-server protocol so the Web UI shows encrypted payloads decoded."""
    import codec

    settings = load_settings()
    keys = settings.payload_key_text()
    if not keys:
        raise fail("DUNNING_PAYLOAD_KEYS is not set: there is nothing to decode", BAD_INPUT)
    token = settings.codec_token.get_secret_value() if settings.codec_token else None
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        # anything that reaches the port could decrypt every payload
        raise fail(f"--host {host} without DUNNING_CODEC_TOKEN: a codec server without a token "
                   "serves loopback only (put an authenticating https proxy in front of it)", BAD_INPUT)
    origins = [o.strip() for o in settings.codec_origins.split(",") if o.strip()]
    say(f"codec server on http://{host}:{port} for {', '.join(origins)}"
        + (" (bearer token required)" if token else " (no token: keep it on loopback)"))
    codec.serve(codec.EncryptionCodec(codec.parse_keys(keys)), host=host, port=port, token=token,
                origins=origins)


@app.command()
@handled
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the server running afterwards for the UI.")] = False,
) -> None:
    """Watch reminders escalate on a fast policy: payments, a fallback, a late enrolment and
    handoffs to the agency, in about a minute."""
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
