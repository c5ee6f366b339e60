"""One bench worker in a process of its own: the baseline, the dunning worker, or the dunning
workflows on stub activities.

    python -m bench.host KIND ADDRESS NAMESPACE TASK_QUEUE DATABASE_URL POLICY_FILE

``bench.lifecycle`` starts one of these per worker so the CPU and memory it reports are the
worker's alone, as a deployment has them: the billing code that starts runs (here the bench
client, with the dunning start's validation and database writes) lives in another process. The
worker is built exactly as ``worker.build_worker`` builds it (the baseline in the same kind of
worker). It prints ``ready`` once it has run a moment without failing (the bench warms every worker
up before it times one), and stops when its standard input closes; if the worker fails, the
process exits at once with code 1, so the bench fails instead of waiting. Asked ``threads`` on its
standard input, it answers one JSON line: its CPU seconds so far by kind of thread
(``thread_cpu``). Its standard output carries only those replies: anything else written there (the
SDK's core logs) goes to standard error.
"""

from __future__ import annotations

import asyncio
import json
import os
import py_compile
import sys
import threading
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

from temporalio.client import Client
from temporalio.worker import Worker

from bench import stubs
from bench.baseline import Baseline, noop
from codec import PLAIN
from settings import Settings
from worker import STICKY_TIMEOUT, build_activities, build_worker, sandbox_runner

KINDS = ("baseline", "dunning", "stub")
ACTIVITY_THREADS = "activity"  # the name prefix of the activity executor's threads
STARTUP_GRACE = 1.0  # seconds a new worker must run without failing before it reports ready


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


def read_stat(path: Path) -> tuple[int, float]:
    """A process's or thread's ``/proc/.../stat``: (parent pid, CPU seconds so far, user + system
    over every thread). Raises OSError when it has gone."""
    fields = path.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """This process's CPU seconds so far (user + system, in clock ticks of 10 ms), by kind of
    thread. Only threads alive now are counted, so the kinds need not add up to the process's
    CPU (a thread that ended took its seconds with it)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    totals: Counter[str] = Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            _, seconds = read_stat(task / "stat")
            name = names.get(int(task.name)) or (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        totals[thread_kind(name)] += seconds
    return dict(totals)


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
                policy_file: str, replies: TextIO) -> None:
    """Run the worker until the bench closes our standard input; raise if the worker fails."""
    settings = Settings(database_url=database_url, policy_file=Path(policy_file), task_queue=task_queue,
                        temporal_address=address, temporal_namespace=namespace, _env_file=None)
    client = await Client.connect(address, namespace=namespace, data_converter=PLAIN)
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def answer_until_closed() -> None:
        for line in sys.stdin:
            if line.strip() == "threads":
                replies.write(json.dumps(thread_cpu()) + "\n")
                replies.flush()
        loop.call_soon_threadsafe(closed.set)

    with ThreadPoolExecutor(settings.activity_threads, thread_name_prefix=ACTIVITY_THREADS) as executor:
        worker = build(kind, client, settings, executor)
        running = asyncio.create_task(worker.run())
        await asyncio.wait({running}, timeout=STARTUP_GRACE)  # a worker that cannot start fails here
        if running.done():
            running.result()
            raise RuntimeError("the worker stopped by itself")
        replies.write("ready\n")
        replies.flush()
        threading.Thread(target=answer_until_closed, name="bench-replies", daemon=True).start()
        stop = asyncio.create_task(closed.wait())
        await asyncio.wait({running, stop}, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            running.result()
            raise RuntimeError("the worker stopped by itself")
        await worker.shutdown()
        await running


def main(argv: list[str]) -> int:
    if len(argv) != 6 or argv[0] not in KINDS:
        print(__doc__, file=sys.stderr)
        return 2
    # Our standard output is the bench's reply channel: keep it to ourselves, and send whatever
    # else writes to file descriptor 1 (the SDK's Rust core logs there) to standard error.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        asyncio.run(serve(*argv, replies=replies))
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    # Skip interpreter teardown, as bench.lifecycle does: the SDK's Rust threads can abort it.
    os._exit(code)
