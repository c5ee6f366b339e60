"""The benchmark's baseline workflow, in a module of its own so the sandbox loads nothing else."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="bench_noop")
def noop(step: int) -> int:
    return step


@workflow.defn(name="BenchBaseline")
class Baseline:
    """Four timers and four activities: the floor any four-step escalation stands on."""

    @workflow.run
    async def run(self) -> None:
        for step in range(4):
            await workflow.sleep(1)
            await workflow.execute_activity(noop, step, start_to_close_timeout=timedelta(seconds=10))
