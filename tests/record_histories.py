"""Record workflow histories for the replay test: ``python -m tests.record_histories [NAME...]``.

Without names it records only the scenarios that have no history file yet: the committed ones
were recorded by older workflow code, which is the point of replaying them. Run it when adding a
scenario, never to "fix" a failing replay: a failing replay means the new workflow code would
break runs already in flight; put the change behind ``workflow.patched``.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import TimeSkippingConfig, WorkflowEnvironment

from activities.channels import OutgoingMessage
from codec import PLAIN
from models.policy import Channel
from settings import Settings
from starter import DunningClient
from tests.conftest import sample_invoice, temporal_binary
from worker import build_activities, build_worker
from workflows import search

HERE = Path(__file__).resolve().parent / "histories"

Step = Callable[["Recorder", WorkflowHandle[Any, Any], str], Awaitable[None]]


class HeldSender:
    """Holds the next send until released (a payment lands while the handoff is in flight)."""

    provider = "held"

    def __init__(self, then: Any) -> None:
        self.then, self.in_flight, self.release = then, threading.Event(), threading.Event()

    def send(self, message: OutgoingMessage) -> str:
        self.in_flight.set()
        self.release.wait(timeout=30)
        return self.then.send(message)

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        return self.then.find_sent(message, since)


class Recorder:
    def __init__(self, env: WorkflowEnvironment, dunning: DunningClient, senders: dict[Any, Any]):
        self.env, self.dunning, self.senders = env, dunning, senders


def advance(duration: timedelta) -> Step:
    async def step(rec: Recorder, handle: WorkflowHandle[Any, Any], invoice_id: str) -> None:
        await rec.env.fast_forward(handle, duration)
    return step


def pay(amount: str, payment_id: str) -> Step:
    async def step(rec: Recorder, handle: WorkflowHandle[Any, Any], invoice_id: str) -> None:
        await rec.dunning.pay(invoice_id, amount, payment_id=payment_id)
    return step


def cancel(reason: str) -> Step:
    async def step(rec: Recorder, handle: WorkflowHandle[Any, Any], invoice_id: str) -> None:
        await rec.dunning.cancel(invoice_id, reason)
    return step


async def pay_during_handoff(rec: Recorder, handle: WorkflowHandle[Any, Any], invoice_id: str) -> None:
    held = HeldSender(rec.senders[Channel.AGENCY])
    rec.senders[Channel.AGENCY] = held
    forward = asyncio.create_task(rec.env.fast_forward(handle, timedelta(days=61)))
    await asyncio.to_thread(held.in_flight.wait, 30)
    await rec.dunning.pay(invoice_id, "1250.00", payment_id="during-handoff")
    while ("state", "paid") not in [(e.kind, e.status) for e in rec.dunning.log(invoice_id)]:
        await asyncio.sleep(0.05)
    held.release.set()
    await handle.result()
    forward.cancel()
    rec.senders[Channel.AGENCY] = held.then


def act(action: str, **fields: Any) -> Step:
    async def step(rec: Recorder, handle: WorkflowHandle[Any, Any], invoice_id: str) -> None:
        await rec.dunning.act(invoice_id, action, fields, actor="recorder")
    return step


def hold(kind: str, reason: str) -> Step:
    async def step(rec: Recorder, handle: WorkflowHandle[Any, Any], invoice_id: str) -> None:
        run = rec.dunning.ledger.run(invoice_id)
        assert run is not None
        await rec.dunning.hold_customer(run.customer_id, kind, reason, actor="recorder")
    return step


def day(n: int) -> str:
    return (datetime.now(UTC) + timedelta(days=n)).date().isoformat()


SCENARIOS: dict[str, tuple[dict[str, Any], list[Step]]] = {
    "full_escalation": ({}, [advance(timedelta(days=61))]),
    "partial_then_paid": ({}, [advance(timedelta(days=2)), pay("400.00", "p0"),
                               advance(timedelta(days=20)), pay("850.00", "p1")]),
    "late_enrolment": ({"days_late": 20}, [advance(timedelta(hours=1)), advance(timedelta(days=5)),
                                           pay("1250.00", "p1")]),
    "cancel": ({}, [advance(timedelta(days=2)), cancel("voided by finance")]),
    "fallback_without_phone": ({"phone": None}, [advance(timedelta(days=31)), pay("1250", "p")]),
    "opt_out": ({"opt_out": "sms"}, [advance(timedelta(days=16)), cancel("settled by hand")]),
    "handoff_then_late_payment": ({}, [advance(timedelta(days=61)),
                                       pay("1250.00", "agency-collected")]),
    "payment_during_handoff": ({}, [pay_during_handoff]),
    "pause_resume_promise_broken": ({}, [
        advance(timedelta(days=2)), act("pause", reason="on holiday"), advance(timedelta(days=5)),
        act("resume"), act("promise", amount="500.00", by=day(12)), advance(timedelta(days=6)),
        act("escalate", reason="no answer"), advance(timedelta(days=2)), pay("1250.00", "p")]),
    "plan_broken_dispute_write_off": ({}, [
        advance(timedelta(days=2)),
        act("plan", instalments=[{"due_on": day(10), "amount": "250.00"},
                                 {"due_on": day(20), "amount": "1000.00"}]),
        pay("250.00", "inst-1"), advance(timedelta(days=30)),
        act("dispute", reason="wrong item", amount="100.00"), act("resolve", outcome="upheld"),
        act("write-off", reason="goodwill", amount="50.00"), act("write-off", reason="closing")]),
    # a German business invoice with fees and interest whose first reminder falls at 03:00 in
    # Berlin (deferred to the window), part-paid, then paid in full
    "window_fees_partial": ({"invoice": {"policy": "late_payment", "currency": "EUR",
                                         "amount_due": "1000.00"},
                             "customer": {"country": "DE", "type": "business", "timezone": "Europe/Berlin"},
                             "local_hour": (3, "Europe/Berlin")},
                            [advance(timedelta(days=3)), pay("400.00", "p0"), advance(timedelta(days=20)),
                             pay("700.00", "p1")]),
    # a plan for the invoice alone on a run with fees and interest, kept: the plan ends and the
    # run goes on for the fees and interest (the "plan-end-ends-hold" patch)
    "plan_kept_with_fees": ({"invoice": {"policy": "late_payment", "currency": "EUR",
                                         "amount_due": "1000.00"},
                             "customer": {"country": "DE", "type": "business", "timezone": "Europe/Berlin"}},
                            [advance(timedelta(days=10)),
                             act("plan", instalments=[{"due_on": day(20), "amount": "1000.00"}]),
                             pay("1000.00", "inst-1"), advance(timedelta(days=25)),
                             cancel("the rest settled by hand")]),
    "bankruptcy_after_handoff": ({"customer": {}}, [advance(timedelta(days=61)),
                                                    hold("bankruptcy", "chapter 7 filed"),
                                                    advance(timedelta(hours=1)), pay("100.00", "trustee")]),
}


async def record(names: list[str]) -> None:
    env = await WorkflowEnvironment.start_time_skipping_v2(
        ts_config=TimeSkippingConfig(enabled=False), dev_server_existing_path=temporal_binary(),
        search_attributes=search.ALL, data_converter=PLAIN,
        dev_server_extra_args=["--dynamic-config-value", "frontend.WorkflowTimeSkippingEnabled=true"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(database_url=f"sqlite:///{tmp}/h.db", task_queue=uuid.uuid4().hex)
        activities = build_activities(settings)
        with ThreadPoolExecutor(8) as executor:
            async with build_worker(env.client, settings, activities, executor):
                rec = Recorder(env, DunningClient(env.client, settings), activities.senders)
                for name, (options, steps) in SCENARIOS.items():
                    if name not in names:
                        continue
                    due = datetime.now(UTC) - timedelta(days=options.get("days_late", 0))
                    if "local_hour" in options:  # the first step (a day later) at this local hour
                        hour, zone = options["local_hour"]
                        local = datetime.now(ZoneInfo(zone)) + timedelta(days=1)
                        due = local.replace(hour=hour, minute=0, second=0, microsecond=0)
                    invoice = sample_invoice(f"INV-HIST-{name}", due_at=due.isoformat(),
                                             **options.get("invoice", {}))
                    if "customer" in options:
                        invoice["customer"] = {**invoice["customer"], **options["customer"],
                                               "id": f"C-{name}"}
                    if "phone" in options:
                        invoice["customer"] = {**invoice["customer"], "phone": options["phone"],
                                               "id": f"C-{name}"}
                    if "opt_out" in options:
                        invoice["customer"] = {**invoice["customer"], "id": f"C-{name}"}
                        activities.ledger.opt_out(f"C-{name}", options["opt_out"], "replied STOP")
                    result = await rec.dunning.start(invoice)
                    handle = env.client.get_workflow_handle(result.workflow_id)
                    for step in steps:
                        await step(rec, handle, invoice["invoice_id"])
                    if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                        await env.fast_forward(handle)
                    await handle.result()
                    history = await handle.fetch_history()
                    (HERE / f"{name}.json").write_text(history.to_json())
                    print(f"{name}: {len(history.events)} events")
    await env.shutdown()


if __name__ == "__main__":
    import sys

    chosen = sys.argv[1:] or [n for n in SCENARIOS if not (HERE / f"{n}.json").exists()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenario(s): {', '.join(sorted(unknown))} (known: {', '.join(SCENARIOS)})")
    asyncio.run(record(chosen))
