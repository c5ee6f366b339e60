"""Committed histories must replay on the current workflow code.

A failure here means a change would break dunning runs already in flight (some run for 60 days
and more): guard the change with ``workflow.patched`` instead of re-recording the histories.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from codec import PLAIN
from models.schedule import Plan
from worker import sandbox_runner
from workflows.dunning import InvoiceDunningWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_are_committed():
    assert {p.stem for p in HISTORIES} >= {
        "full_escalation", "partial_then_paid", "late_enrolment", "cancel", "fallback_without_phone",
        "opt_out", "handoff_then_late_payment", "payment_during_handoff"}


@pytest.mark.parametrize("runner", ["worker", "sandbox"])
@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_history_replays(path: Path, runner: str):
    """On the worker's runner (``runner.ContextFreeRunner``) and on the SDK's plain sandbox."""
    history = WorkflowHistory.from_json(f"dunning-{path.stem}", path.read_text())
    converter = PLAIN if runner == "worker" else None
    replayer = Replayer(workflows=[InvoiceDunningWorkflow], data_converter=PLAIN,
                        workflow_runner=sandbox_runner(strict=True, converter=converter))
    await replayer.replay_workflow(history)


async def test_a_changed_escalation_is_caught():
    """The safety net itself works: replaying on workflow code that decides differently fails."""
    from temporalio.workflow import NondeterminismError

    original = Plan.overtaken
    Plan.overtaken = lambda self, index, now: False  # type: ignore[method-assign]
    try:
        with pytest.raises(NondeterminismError):
            await replay_unsandboxed("late_enrolment")
    finally:
        Plan.overtaken = original  # type: ignore[method-assign]


async def test_a_patched_change_replays_histories_recorded_before_it():
    """How to change workflow code under runs in flight: the new behaviour only where
    ``workflow.patched`` says the run reached that code after the change (README: "Changing
    workflow code"). The same change unpatched is refused by the replay (the test above)."""
    from temporalio import workflow

    original = Plan.overtaken

    def patched(self: Plan, index: int, now: datetime) -> bool:
        if workflow.patched("send-overtaken-steps"):
            return False  # the new rule: send even overtaken steps
        return original(self, index, now)

    Plan.overtaken = patched  # type: ignore[method-assign]
    try:
        await replay_unsandboxed("late_enrolment")
    finally:
        Plan.overtaken = original  # type: ignore[method-assign]


async def replay_unsandboxed(name: str) -> None:
    """Unsandboxed, so a method replaced by the test is the one that runs."""
    path = next(p for p in HISTORIES if p.stem == name)
    history = WorkflowHistory.from_json(f"dunning-{name}", path.read_text())
    replayer = Replayer(workflows=[InvoiceDunningWorkflow], data_converter=PLAIN,
                        workflow_runner=UnsandboxedWorkflowRunner())
    await replayer.replay_workflow(history)


async def test_a_currency_data_update_cannot_change_a_payment_already_counted(harness, monkeypatch):
    """A run checks payments against the currency's decimal places as Babel had them when the
    run started: a Babel update that gave USD no cents would otherwise refuse, on replay, a
    payment of 100.50 counted months ago, and the run could not go on (non-determinism)."""
    from datetime import timedelta

    import models.money
    from models.run import RunState
    from tests.conftest import sample_invoice
    from tests.test_escalation import until

    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))
    await harness.dunning.pay(invoice_id, "100.50", payment_id="pi_cents")
    await until(lambda: ("payment", "accepted", None, None) in harness.trail(invoice_id))
    await harness.dunning.cancel(invoice_id, "test over")
    assert (await handle.result()).state is RunState.CANCELLED
    history = await handle.fetch_history()
    real = models.money.get_currency_precision
    monkeypatch.setattr(models.money, "get_currency_precision",
                        lambda code: 0 if code == "USD" else real(code))
    replayer = Replayer(workflows=[InvoiceDunningWorkflow], data_converter=PLAIN,
                        workflow_runner=UnsandboxedWorkflowRunner())
    await replayer.replay_workflow(history)
