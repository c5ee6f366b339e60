"""``dunning demo``: the whole product in about a minute, on a fresh machine, with no accounts.

It starts the embedded Temporal server and a worker, enrols a few invoices on the ``demo`` policy
(the standard escalation in seconds instead of days), pays one, part-pays another, and prints
every reminder, payment and handoff as the audit trail records it.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

import devserver
from activities.ledger import Ledger
from api import Background
from models.database import prepare
from models.run import RunState
from settings import DEFAULT_STATE_DIR, ROOT, Settings
from starter import DunningClient
from worker import run_worker

DEMO_DIR = DEFAULT_STATE_DIR / "demo"
DEMO_POLICY = ROOT / "policies" / "demo.toml"
TIME_LIMIT = 75.0


def sample_invoices(now: datetime) -> list[dict[str, Any]]:
    def invoice(number: int, name: str, amount: str, currency: str, locale: str, zone: str,
                phone: str | None, due: datetime) -> dict[str, Any]:
        invoice_id = f"INV-DEMO-{number}"
        return {
            "invoice_id": invoice_id, "amount_due": amount, "currency": currency,
            "issued_on": (due - timedelta(days=30)).date().isoformat(),
            "due_on": due.date().isoformat(), "due_at": due.isoformat(),
            "customer": {"id": f"C-{number}", "name": name, "email": f"ap+{number}@example.com",
                         "phone": phone, "timezone": zone, "locale": locale},
            "payment_url": f"https://billing.example.com/pay/{invoice_id}", "policy": "demo",
        }

    return [
        invoice(1001, "Ada Lovelace", "1250.00", "USD", "en_US", "America/New_York",
                "+14155550100", now),
        invoice(1002, "Grace Hopper", "980.50", "EUR", "de_DE", "Europe/Berlin",
                "+4915123456789", now),
        invoice(1003, "Alan Turing", "420.00", "GBP", "en_GB", "Europe/London", None, now),
        # enrolled late: its first reminder's time has passed, so that one is skipped
        invoice(1004, "Katherine Johnson", "75000", "JPY", "ja_JP", "Asia/Tokyo",
                "+819012345678", now - timedelta(seconds=16)),
        # a second invoice of Grace Hopper's, due with her first: one message per step for both
        {**invoice(1005, "Grace Hopper", "1200.00", "EUR", "de_DE", "Europe/Berlin",
                   "+4915123456789", now),
         "customer": {"id": "C-1002", "name": "Grace Hopper", "email": "ap+1002@example.com",
                      "phone": "+4915123456789", "timezone": "Europe/Berlin", "locale": "de_DE"}},
    ]


# What happens to whom, and when (seconds after the start).
PAYMENTS = [
    (9.0, "INV-DEMO-1001", "1250.00", "pay-demo-1001"),  # paid in full after the first email
    (12.0, "INV-DEMO-1002", "300.00", "pay-demo-1002a"),  # a partial payment; escalation goes on
]


async def run_demo(console: Console, *, keep: bool = False) -> None:
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    spare = devserver.free_ports(3)
    port = 7233 if devserver.port_free(7233) else spare[0]
    ui_port = 8233 if devserver.port_free(8233) else spare[1]
    api_port = 8000 if devserver.port_free(8000) else spare[2]
    key = secrets.token_urlsafe(18)  # a fresh key per demo: the API never runs without one
    settings = Settings(
        temporal_address=f"127.0.0.1:{port}", task_queue="dunning-demo",
        database_url=f"sqlite:///{DEMO_DIR / 'dunning.db'}", policy_file=DEMO_POLICY,
        api_keys=SecretStr(f"demo:{key}"),
    )
    console.print(f"Starting the Temporal dev server (state in {DEMO_DIR}) ...")
    server = devserver.start(DEMO_DIR / "temporal.db", port=port, ui_port=ui_port, quiet=True)
    stop = asyncio.Event()
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and a service manager's stop alike
        loop.add_signal_handler(sig, stop.set)
    worker = asyncio.create_task(run_worker(settings, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        async with Background(settings, host="127.0.0.1", port=api_port) as api:
            console.print(f"HTTP API: [link]{api.url}/docs[/link]  (bearer key {key}; e.g. curl -H "
                          f"'Authorization: Bearer {key}' {api.url}/v1/invoices/INV-DEMO-1003)",
                          highlight=False, soft_wrap=True)
            story = asyncio.create_task(_story(console, settings, ui_port))
            await asyncio.wait([story, asyncio.create_task(stop.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if story.done():
                story.result()
            else:
                story.cancel()
            if keep and not stop.is_set():
                console.print("\nServer, worker and API keep running; press Ctrl-C to stop.")
                await stop.wait()
    finally:
        stop.set()
        await asyncio.gather(worker, return_exceptions=True)
        devserver.stop(server)


async def _story(console: Console, settings: Settings, ui_port: int) -> None:
    dunning = await DunningClient.connect(settings)
    ledger = Ledger(prepare(settings.database()))
    console.print(f"Temporal Web UI: [link]http://127.0.0.1:{ui_port}/namespaces/default/workflows"
                  "[/link]  (filter: DunningState = 'active')\n")
    now = datetime.now(UTC)
    invoices = sample_invoices(now)
    for invoice in invoices:
        result = await dunning.start(invoice)
        console.print(f"  {result.invoice_id}: {result.detail}", highlight=False)
    console.print("\nPolicy 'demo': email at 5s, SMS at 15s, call at 25s, agency at 35s; a customer's "
                  "invoices due together share one message.\n")
    started = time.monotonic()
    pending = list(PAYMENTS)
    seen: set[int] = set()
    ids = [i["invoice_id"] for i in invoices]

    def show_new() -> None:
        """Print the trail entries not printed yet, as they happen."""
        for invoice_id in ids:
            for entry in ledger.trail(invoice_id):
                if entry.id in seen:
                    continue
                seen.add(entry.id or 0)
                where = f"{entry.step or ''} {entry.channel or ''}".strip()
                console.print(f"[dim]{time.monotonic() - started:5.1f}s[/dim] {invoice_id:<14} "
                              f"{entry.kind:<13} {entry.status:<9} {where:<26} {entry.detail}",
                              highlight=False, soft_wrap=True)

    while time.monotonic() - started < TIME_LIMIT:
        elapsed = time.monotonic() - started
        while pending and pending[0][0] <= elapsed:
            _, invoice_id, amount, payment_id = pending.pop(0)
            await dunning.pay(invoice_id, amount, payment_id=payment_id)
        show_new()
        states = [(await dunning.status(i)).state for i in ids]
        if RunState.ACTIVE not in states and not pending:
            break
        await asyncio.sleep(0.5)
    show_new()  # what the last runs recorded as they ended
    await _summary(console, dunning, ids, ledger)


async def _summary(console: Console, dunning: DunningClient, ids: list[str], ledger: Ledger) -> None:
    table = Table("invoice", "state", "last step", "balance", "paid", "messages to the customer")
    for invoice_id in ids:
        status = await dunning.status(invoice_id)
        sent = sum(1 for d in ledger.deliveries(invoice_id) if d.status == "sent" and d.channel != "agency")
        table.add_row(invoice_id, status.state, status.stage or "-",
                      f"{status.balance_due} {status.currency}",
                      f"{status.paid} {status.currency}" if status.paid > Decimal(0) else "-",
                      str(sent))
    console.print()
    console.print(table)
    console.print(
        f"\nEvery message was rendered and kept in the outbox table of {DEMO_DIR / 'dunning.db'}"
        " (set DUNNING_DELIVERY=live to send through SendGrid and Twilio).\n"
        f"Audit trail and messages: DUNNING_DATABASE_URL=sqlite:///{DEMO_DIR / 'dunning.db'} "
        f"{_command()} log INV-DEMO-1002   (or: outbox INV-DEMO-1002)"
    )


def _command() -> str:
    """How this user can type ``dunning``: plain if it is on PATH, else the venv's path."""
    script = Path(sys.executable).parent / "dunning"
    if shutil.which("dunning") == str(script):
        return "dunning"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)
