"""The benchmark's baseline workflow, in a module of its own so the sandbox loads nothing else.

What it does, exactly: given the run's due instant, the four step offsets and the listening time of
the bench policy, it sleeps (a durable timer) until ``due + offset`` and then runs one no-op activity
(``bench_noop``, a sync function that returns its argument), four times; then it sleeps the listening
time once more and ends. That is 4 step timers + 4 no-op activities + the 1 listening timer the
dunning run also keeps after its last step, so both runs live the same ~5 s and a throughput ratio
compares the work each run does, not two different schedules. A timer already due is skipped, as the
dunning run skips it.

It has no state, no search attributes, no details, no records and no database: it is the floor that
any four-step escalation on Temporal stands on.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import activity, workflow

NOOP_TIMEOUT = timedelta(seconds=10)


@activity.defn(name="bench_noop")
def noop(step: int) -> int:
    return step


@workflow.defn(name="BenchBaseline")
class Baseline:
    """Four timers and four no-op activities on the dunning schedule, then the listening timer."""

    @workflow.run
    async def run(self, due: datetime, offsets: list[float], listen: float) -> None:
        for step, offset in enumerate(offsets):
            delay = due + timedelta(seconds=offset) - workflow.now()
            if delay > timedelta(0):
                await workflow.sleep(delay)
            await workflow.execute_activity(noop, step, start_to_close_timeout=NOOP_TIMEOUT)
        if listen > 0:
            await workflow.sleep(listen)
