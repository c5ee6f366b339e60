"""Record workflow histories for the replay test: ``python -m tests.record_histories``.

Run it when adding a scenario, never to "fix" a failing replay: a failing replay means the new
workflow code would break runs already in flight; put the change behind ``workflow.patched``.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import TimeSkippingConfig, WorkflowEnvironment

from settings import Settings
from starter import DunningClient
from tests.conftest import sample_invoice, temporal_binary
from worker import build_activities, build_worker
from workflows import search

HERE = Path(__file__).resolve().parent / "histories"


async def record() -> None:
    env = await WorkflowEnvironment.start_time_skipping_v2(
        ts_config=TimeSkippingConfig(enabled=False), dev_server_existing_path=temporal_binary(),
        search_attributes=search.ALL, data_converter=pydantic_data_converter,
        dev_server_extra_args=["--dynamic-config-value", "frontend.WorkflowTimeSkippingEnabled=true"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(database_url=f"sqlite:///{tmp}/h.db", task_queue=uuid.uuid4().hex)
        activities = build_activities(settings)
        with ThreadPoolExecutor(8) as executor:
            async with build_worker(env.client, settings, activities, executor):
                dunning = DunningClient(env.client, settings)
                scenarios = {
                    "full_escalation": [(timedelta(days=61), None)],
                    "partial_then_paid": [(timedelta(days=2), "400.00"), (timedelta(days=20), "850.00")],
                    "late_enrolment": [(timedelta(hours=1), None), (timedelta(days=5), "1250.00")],
                }
                for name, actions in scenarios.items():
                    due = datetime.now(UTC) - (timedelta(days=20) if name == "late_enrolment"
                                               else timedelta(0))
                    invoice = sample_invoice(f"INV-HIST-{name}", due_at=due.isoformat())
                    result = await dunning.start(invoice)
                    handle = env.client.get_workflow_handle(result.workflow_id)
                    for n, (advance, amount) in enumerate(actions):
                        await env.fast_forward(handle, advance)
                        if amount:
                            await dunning.pay(invoice["invoice_id"], amount, payment_id=f"p{n}")
                    await env.fast_forward(handle)
                    await handle.result()
                    history = await handle.fetch_history()
                    (HERE / f"{name}.json").write_text(history.to_json())
                    print(f"{name}: {len(history.events)} events")
    await env.shutdown()


if __name__ == "__main__":
    asyncio.run(record())
