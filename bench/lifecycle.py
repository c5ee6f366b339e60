"""Benchmark: full dunning lifecycles per second and worker memory per sleeping run.

    .venv/bin/python -m bench.lifecycle [--runs 200]

Both figures are printed beside a baseline measured in the same run on the same server, so the
ratio means something on a noisy 2-core machine:

- throughput: N invoices on a four-step policy (1 s to 4 s after the due date, outbox delivery)
  against N runs of a bare workflow doing the same four timers and four no-op activities;
- memory: worker RSS growth while N dunning runs sleep in the cache, per run.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from bench.baseline import Baseline, noop
from devserver import temporal_binary
from settings import Settings
from starter import DunningClient
from tests.conftest import sample_invoice
from worker import build_activities, build_worker
from workflows import search

POLICY = """
[policies.bench]
version = 1
close_after = "1s"
steps = [
  { name = "friendly_reminder", after_due = "1s", channel = "email" },
  { name = "sms_reminder",      after_due = "2s", channel = "sms" },
  { name = "phone_call",        after_due = "3s", channel = "voice" },
  { name = "agency_handoff",    after_due = "4s", channel = "agency" },
]
"""


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main(runs: int) -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), search_attributes=search.ALL,
        data_converter=pydantic_data_converter,
    )
    with tempfile.TemporaryDirectory() as tmp:
        policy_file = Path(tmp) / "bench.toml"
        policy_file.write_text(POLICY)
        settings = Settings(database_url=f"sqlite:///{tmp}/bench.db", policy_file=policy_file,
                            task_queue=f"bench-{uuid.uuid4().hex[:6]}")
        activities = build_activities(settings)
        with ThreadPoolExecutor(16) as executor:
            baseline_worker = Worker(env.client, task_queue=settings.task_queue + "-base",
                                     workflows=[Baseline], activities=[noop],
                                     activity_executor=executor)
            async with baseline_worker:
                began = time.perf_counter()
                handles = [await env.client.start_workflow(
                    Baseline.run, id=f"base-{uuid.uuid4().hex}",
                    task_queue=settings.task_queue + "-base") for _ in range(runs)]
                await asyncio.gather(*(h.result() for h in handles))
                base_seconds = time.perf_counter() - began

            async with build_worker(env.client, settings, activities, executor):
                dunning = DunningClient(env.client, settings)
                rss_before = rss_mib()
                began = time.perf_counter()
                due = datetime.now(UTC).isoformat()
                ids = []
                for _ in range(runs):
                    result = await dunning.start(sample_invoice(policy="bench", due_at=due))
                    ids.append(result.workflow_id)
                await asyncio.sleep(0.5)
                rss_sleeping = rss_mib()
                await asyncio.gather(*(env.client.get_workflow_handle(i).result() for i in ids))
                dunning_seconds = time.perf_counter() - began
                history = await env.client.get_workflow_handle(ids[0]).fetch_history()
    await env.shutdown()

    base_rate, dunning_rate = runs / base_seconds, runs / dunning_seconds
    print(f"runs: {runs} (each waits 4 s of timers, so the floor is ~{runs / 5:.0f}/s)")
    print(f"baseline (4 timers + 4 no-op activities): {base_seconds:6.2f} s  {base_rate:6.1f} runs/s")
    print(f"dunning (4 steps, outbox, ledger, audit): {dunning_seconds:6.2f} s  {dunning_rate:6.1f} runs/s")
    print(f"ratio dunning/baseline throughput: {dunning_rate / base_rate:.2f}")
    print(f"history events per full run: {len(history.events)}")
    print(f"worker peak RSS growth while {runs} runs slept: {rss_sleeping - rss_before:.1f} MiB "
          f"(~{(rss_sleeping - rss_before) * 1024 / runs:.0f} KiB per run; peak-based, so a floor)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    asyncio.run(main(parser.parse_args().runs))
