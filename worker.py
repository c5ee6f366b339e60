"""The worker: runs dunning workflows and their activities against one task queue.

Activities are synchronous (database drivers and provider SDKs block), so they run on a thread
pool; workflows run in Temporal's sandbox with the domain models passed through.

Deploy safety: on SIGTERM the worker stops polling and lets running deliveries finish for
``DUNNING_SHUTDOWN_GRACE_SECONDS`` (docker-compose's ``stop_grace_period`` must be longer), so a
deploy never cuts a send in the middle. A worker killed outright is noticed by the server within
the deliveries' heartbeat timeout, and its cached runs move to another worker after the sticky
queue's few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.delivery import DeliveryActivities
from activities.ledger import Ledger
from activities.rendering import Renderer
from activities.senders import build_senders
from models.database import prepare
from models.policy import Channel, PolicyError, load_policies
from runner import ContextFreeRunner
from settings import DeliveryMode, Settings
from starter import ServerUnavailable, connect
from workflows.agency import AgencyNoticeWorkflow
from workflows.dunning import InvoiceDunningWorkflow
from workflows.notice import CustomerNoticeWorkflow

log = logging.getLogger("dunning.worker")
WORKFLOWS: list[type] = [InvoiceDunningWorkflow, AgencyNoticeWorkflow, CustomerNoticeWorkflow]

# Libraries the domain models call lazily while validating (pydantic's EmailStr imports
# email_validator on first use). Passed through so the sandbox does not re-import them per run.
PASSTHROUGH = ("email_validator", "idna", "phonenumbers", "babel", "zoneinfo", "tzdata")
STICKY_TIMEOUT = timedelta(seconds=3)  # a dead worker's cached runs move on after this
RETRYING_FOR = timedelta(hours=1)  # the gauge counts runs whose delivery retries this long
STUCK_MARGIN = 10.0  # seconds past the grace period before a stopping worker leaves regardless
STUCK_EXIT = 75  # EX_TEMPFAIL: stopped, but not cleanly; nothing is lost (see exit_if_stuck)


class Metrics:
    """The worker's own Prometheus metrics, beside the SDK's, on ``DUNNING_METRICS_PORT``."""

    def __init__(self, runtime: Runtime) -> None:
        meter = runtime.metric_meter
        self.deliveries = meter.create_counter(
            "dunning_deliveries_total", "Delivery outcomes recorded, by channel and outcome.")
        self.retrying = meter.create_gauge(
            "dunning_runs_retrying_over_1h",
            "Invoices with a delivery retrying for more than an hour (a provider outage or a "
            "configuration fault: look at the worker log and the ledger).")

    def outcome(self, channel: Channel, outcome: str) -> None:
        self.deliveries.add(1, {"channel": channel.value, "outcome": outcome})


class ConfigurationError(PolicyError):
    """The settings and the policies (or the machine) do not fit together."""


def metrics_runtime(port: int) -> Runtime:
    """The SDK runtime serving Prometheus metrics on ``port``; a port it cannot take is a setting
    to fix (the SDK says only "Address already in use", deep in a traceback)."""
    try:
        return Runtime(telemetry=TelemetryConfig(
            metrics=PrometheusConfig(bind_address=f"0.0.0.0:{port}")))
    except ValueError as exc:
        if "in use" in str(exc):
            raise ConfigurationError(f"DUNNING_METRICS_PORT: port {port} is already in use (another "
                                     "worker or service on this machine?)") from None
        reason = str(exc).removeprefix("Failed starting Prometheus exporter: ")
        raise ConfigurationError(f"DUNNING_METRICS_PORT: cannot serve metrics on port {port}: "
                                 f"{reason}") from None


def build_activities(settings: Settings, metrics: Metrics | None = None) -> DeliveryActivities:
    """Everything the activities need, built once: database, senders, templates."""
    policies = load_policies(settings.policy_file, settings.templates_dir)  # refuse a broken setup
    hands_off = any(s.channel is Channel.AGENCY for p in policies.values() for s in p.steps)
    if settings.delivery is DeliveryMode.LIVE and hands_off and not (
            settings.agency_webhook_url and settings.agency_webhook_secret):
        raise ConfigurationError("a policy hands accounts to the agency: DUNNING_DELIVERY=live needs "
                                 "DUNNING_AGENCY_WEBHOOK_URL and DUNNING_AGENCY_WEBHOOK_SECRET")
    engine = prepare(settings.database())
    renderer = Renderer(
        templates_dir=settings.templates_dir,
        company=settings.company_name,
        email_from=settings.email_from,
        unsubscribe_url=settings.unsubscribe_link(),
        signing_secret=settings.signing_secret.get_secret_value() if settings.signing_secret else None,
        voice_action_url=settings.voice_link(),
        writer=settings.writer(),
        agency_url=settings.agency_webhook_url or "outbox:agency",
    )
    return DeliveryActivities(Ledger(engine), build_senders(settings, engine), renderer,
                              on_outcome=metrics.outcome if metrics else None)


def precompile_workflows() -> None:
    """Write the workflow modules' bytecode if it is missing.

    The sandbox imports a workflow's module afresh for every run it starts or replays; without
    bytecode on disk (PYTHONDONTWRITEBYTECODE, a fresh checkout) each of those imports compiles the
    source again, a few milliseconds of CPU per run. A read-only tree (the container image compiles
    at build time) is fine.
    """
    import compileall

    from settings import ROOT

    with contextlib.suppress(OSError):
        compileall.compile_dir(ROOT / "workflows", quiet=2)


# The workflow modules themselves. Passed through, they are imported once per worker instead of
# once per run (measured: a sleeping run costs 104 KiB instead of 180 KiB); they hold no
# module-level state to share. The tests run them in the strict sandbox (``strict=True``), so a
# call the sandbox forbids (the clock, randomness, I/O) still fails CI.
WORKFLOW_MODULES = ("workflows.dunning", "workflows.actions", "workflows.agency")


def sandbox_runner(*, strict: bool = False, extra: tuple[str, ...] = (),
                   converter: DataConverter | None = None) -> WorkflowRunner:
    """The workflow sandbox with the domain's libraries passed through (and, unless ``strict``,
    the workflow modules, plus ``extra``).

    Given the worker's ``converter``, and if no part of it reads a serialization context, the
    sandbox is not entered to work one out for every payload (``ContextFreeRunner``)."""
    modules = PASSTHROUGH + extra + (() if strict else WORKFLOW_MODULES)
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*modules)
    )
    if converter is not None and ContextFreeRunner.fits(converter):
        return ContextFreeRunner(runner)
    return runner


def build_worker(client: Client, settings: Settings, activities: DeliveryActivities,
                 executor: ThreadPoolExecutor, max_concurrent_activities: int = 8, *,
                 strict_sandbox: bool = False) -> Worker:
    """A worker for the dunning workflow and activities; ``executor`` runs the sync activities
    and must have at least ``max_concurrent_activities`` threads."""
    precompile_workflows()
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        workflow_runner=sandbox_runner(strict=strict_sandbox, converter=client.data_converter),
        activities=[activities.deliver, activities.record, activities.customer_holds],
        activity_executor=executor,
        max_concurrent_activities=max_concurrent_activities,
        graceful_shutdown_timeout=timedelta(seconds=settings.shutdown_grace_seconds),
        sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
    )


async def connect_patiently(settings: Settings, wait_seconds: float = 60.0,
                            runtime: Runtime | None = None) -> Client:
    """Connect, waiting for a server that is still starting (same terminal session, compose)."""
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        try:
            return await connect(settings, runtime=runtime)
        except ServerUnavailable:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            log.warning("waiting for the Temporal server at %s", settings.temporal_address)
            await asyncio.sleep(2)


async def run_worker(settings: Settings, *, ready: asyncio.Event | None = None,
                     stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set, or until SIGINT/SIGTERM when run from the command line."""
    runtime = metrics_runtime(settings.metrics_port) if settings.metrics_port else None
    metrics = Metrics(runtime) if runtime else None
    activities = build_activities(settings, metrics)
    client = await connect_patiently(settings, runtime=runtime)
    own_signals = stop is None  # the command line: a service manager's SIGTERM stops it
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            break
    # a few threads more than delivery slots: local activities (payment records) never queue
    # behind slow sends
    with ThreadPoolExecutor(max_workers=settings.activity_threads + 4) as executor:
        worker = build_worker(client, settings, activities, executor,
                              max_concurrent_activities=settings.activity_threads)
        async with worker:
            log.info("worker polling task queue %r on %s (delivery: %s)", settings.task_queue,
                     settings.temporal_address, settings.delivery)
            if ready is not None:
                ready.set()
            watch = asyncio.create_task(_watch_retrying(activities.ledger, metrics)) if metrics else None
            await stop.wait()
            log.info("stopping: letting running deliveries finish (up to %.0fs)",
                     settings.shutdown_grace_seconds)
            if own_signals:
                exit_if_stuck(settings.shutdown_grace_seconds + STUCK_MARGIN)
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch


def exit_if_stuck(after: float) -> None:
    """Leave the process ``after`` seconds from now if it has not stopped by then.

    Deliveries get the grace period; what can outlast it is a workflow task whose local activity
    (writing a payment's records) retries against a database that does not answer. Waiting for
    it would keep a stopping worker up for as long as the outage lasts. Leaving is safe: the
    server gives the unfinished task to another worker, and every record is keyed.
    """
    def give_up() -> None:
        log.error("still stopping %.0fs after the signal (a workflow task is waiting for the database "
                  "or Temporal): exiting; the server gives its unfinished work to another worker", after)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(STUCK_EXIT)

    timer = threading.Timer(after, give_up)
    timer.daemon = True
    timer.start()


async def _watch_retrying(ledger: Ledger, metrics: Metrics, every: float = 30.0) -> None:
    """Keep the gauge of long-retrying runs current, so an alert fires without anyone looking."""
    while True:
        try:
            count = await asyncio.to_thread(ledger.retrying_runs, RETRYING_FOR)
            metrics.retrying.set(count)
        except Exception:  # the database is away: the next round tries again
            log.exception("cannot count retrying deliveries")
        await asyncio.sleep(every)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(run_worker(Settings()))
