"""One bench worker in a process of its own: the baseline, the dunning worker, or the dunning
workflows on stub activities.

    python -m bench.host KIND ADDRESS NAMESPACE TASK_QUEUE DATABASE_URL POLICY_FILE

``bench.lifecycle`` starts one of these per worker so the CPU and memory it reports are the
worker's alone, as a deployment has them: the billing code that starts runs (here the bench
client, with the dunning start's validation and database writes) lives in another process. The
worker is built exactly as ``worker.build_worker`` builds it (the baseline in the same kind of
worker), prints ``ready`` once it polls, and stops when its standard input closes. Asked
``threads`` on its standard input, it answers one JSON line: its CPU seconds so far by kind of
thread (``thread_cpu``).
"""

from __future__ import annotations

import asyncio
import json
import os
import py_compile
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

from temporalio.client import Client
from temporalio.worker import Worker

from bench import stubs
from bench.baseline import Baseline, noop
from codec import PLAIN
from settings import Settings
from worker import STICKY_TIMEOUT, build_activities, build_worker, sandbox_runner

KINDS = ("baseline", "dunning", "stub")
ACTIVITY_THREADS = "activity"  # the name prefix of the activity executor's threads


def thread_kind(name: str) -> str:
    """Which part of the worker a thread is, by its name (Python's, or the OS's for the SDK's
    Rust threads)."""
    if name == "MainThread":
        return "event loop"
    if name.startswith("temporal_workflow"):
        return "workflow activations"
    if name.startswith(ACTIVITY_THREADS):
        return "activities"
    if name.startswith(("tokio", "workflow-proces", "temporal")):
        return "SDK core"
    return "other"


def thread_cpu() -> dict[str, float]:
    """This process's CPU seconds so far (user + system), by kind of thread. Threads that have
    ended are not counted, so call it while the worker runs."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    totals: Counter[str] = Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = names.get(int(task.name)) or (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        totals[thread_kind(name)] += (int(fields[11]) + int(fields[12])) / tick
    return dict(totals)


def answer_until_closed() -> None:
    """Answer ``threads`` on standard input until the bench closes it."""
    for line in sys.stdin:
        if line.strip() == "threads":
            print(json.dumps(thread_cpu()), flush=True)


def baseline_worker(client: Client, settings: Settings, executor: ThreadPoolExecutor) -> Worker:
    """The baseline in the same kind of worker as ``worker.build_worker`` builds (its module
    byte-compiled too, as the dunning worker does for its workflows)."""
    py_compile.compile(str(Path(__file__).with_name("baseline.py")), quiet=2)
    return Worker(
        client, task_queue=settings.task_queue, workflows=[Baseline], activities=[noop],
        workflow_runner=sandbox_runner(extra=("bench.baseline",), converter=client.data_converter),
        activity_executor=executor,
        max_concurrent_activities=settings.activity_threads,
        graceful_shutdown_timeout=timedelta(seconds=settings.shutdown_grace_seconds),
        sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
    )


def build(kind: str, client: Client, settings: Settings, executor: ThreadPoolExecutor) -> Worker:
    if kind == "baseline":
        return baseline_worker(client, settings, executor)
    if kind == "stub":
        stand_ins = SimpleNamespace(deliver=stubs.deliver, record=stubs.record,
                                    customer_holds=stubs.customer_holds)
        return build_worker(client, settings, stand_ins,  # type: ignore[arg-type]
                            executor, max_concurrent_activities=settings.activity_threads)
    return build_worker(client, settings, build_activities(settings), executor,
                        max_concurrent_activities=settings.activity_threads)


async def serve(kind: str, address: str, namespace: str, task_queue: str, database_url: str,
                policy_file: str) -> None:
    settings = Settings(database_url=database_url, policy_file=Path(policy_file), task_queue=task_queue,
                        temporal_address=address, temporal_namespace=namespace, _env_file=None)
    client = await Client.connect(address, namespace=namespace, data_converter=PLAIN)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(settings.activity_threads, thread_name_prefix=ACTIVITY_THREADS) as executor:
        async with build(kind, client, settings, executor):
            print("ready", flush=True)
            await loop.run_in_executor(None, answer_until_closed)


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] not in KINDS:
        sys.exit(__doc__)
    asyncio.run(serve(*sys.argv[1:]))
