"""Committed histories must replay on the current workflow code.

A failure here means a change would break dunning runs already in flight (some run for 60 days
and more): guard the change with ``workflow.patched`` instead of re-recording the histories.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from worker import sandbox_runner
from workflows.dunning import InvoiceDunningWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_are_committed():
    assert {p.stem for p in HISTORIES} >= {"full_escalation", "partial_then_paid", "late_enrolment"}


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_history_replays(path: Path):
    history = WorkflowHistory.from_json(f"dunning-{path.stem}", path.read_text())
    replayer = Replayer(workflows=[InvoiceDunningWorkflow], data_converter=pydantic_data_converter,
                        workflow_runner=sandbox_runner())
    await replayer.replay_workflow(history)


async def test_a_changed_escalation_is_caught():
    """The safety net itself works: replaying on workflow code that decides differently fails."""
    from temporalio.workflow import NondeterminismError

    from workflows import dunning

    original = dunning.InvoiceDunningWorkflow._successor_due
    dunning.InvoiceDunningWorkflow._successor_due = lambda self, index: False  # type: ignore[method-assign]
    try:
        path = next(p for p in HISTORIES if p.stem == "late_enrolment")
        history = WorkflowHistory.from_json("dunning-late", path.read_text())
        # unsandboxed, so the patched method is the one that runs
        replayer = Replayer(workflows=[InvoiceDunningWorkflow],
                            data_converter=pydantic_data_converter,
                            workflow_runner=UnsandboxedWorkflowRunner())
        with pytest.raises(NondeterminismError):
            await replayer.replay_workflow(history)
    finally:
        dunning.InvoiceDunningWorkflow._successor_due = original  # type: ignore[method-assign]
