"""Crash recovery with real processes: a worker SIGKILLed or SIGTERMed in the middle of live sends.

`dunning server` and `dunning worker` run as child processes; the worker talks to the real
SendGrid and Twilio SDKs, pointed at a :class:`FakeProvider` in this process, which answers slowly
so sends are in flight when the worker is stopped. A time-compressed policy (steps 12-14 s apart)
takes each batch of invoices from the first email to the agency handoff in about 45 s.

What is checked, per customer: exactly one SMS and one call reached "Twilio", no step was skipped,
an email went out at most twice (the second marked *possible duplicate*), nothing is left
``unknown``; after a SIGKILL the replacement worker resumes every cut-off run within 10 s; after a
SIGTERM the old worker finishes its in-flight sends, records them ``sent`` and exits by itself.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlmodel import col, select

import devserver
from models.database import prepare, session
from models.records import AuditEntry, Delivery, RunRow
from tests.conftest import sample_invoice
from tests.fakeprovider import FakeProvider, Recorded

DUNNING = Path(sys.executable).parent / "dunning"
INVOICES = 20
SLOW = 2.0  # seconds a provider takes to answer the first send of each step
GRACE = 15  # DUNNING_SHUTDOWN_GRACE_SECONDS
RECOVERY_LIMIT = 10.0
FINAL = ("sent", "failed", "unknown")  # ledger statuses no attempt will change
SMS, CALLS, MAIL = "/Messages.json", "/Calls.json", "/v3/mail/send"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2

POLICY = """\
[policies.crash]
version = 1
contact_hours = "00:00-24:00"
close_after = "5s"
agency_notice = "10s"
steps = [
  { name = "friendly_reminder", after_due = "4s",  channel = "email" },
  { name = "sms_reminder",      after_due = "16s", channel = "sms" },
  { name = "phone_call",        after_due = "30s", channel = "voice" },
  { name = "agency_handoff",    after_due = "42s", channel = "agency" },
]
"""
# 14 s before the call: a run whose workflow task died with a worker waits out the workflow task
# timeout (4 s, set by the client at start) before its text goes out, well ahead of the call.

T = TypeVar("T")


class TimedFake(FakeProvider):
    """The fake provider, also noting when each request arrived (monotonic clock)."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        super().__init__()

    def _reply_for(self, recorded: Recorded) -> Any:
        self.arrived[id(recorded)] = time.monotonic()
        return super()._reply_for(recorded)

    def at(self, recorded: Recorded) -> float:
        return self.arrived[id(recorded)]


@dataclass
class Stack:
    home: Path
    env: dict[str, str]


@dataclass
class Live:
    """One test's fake provider, database, task queue and workers."""

    fake: TimedFake
    env: dict[str, str]
    home: Path
    db_url: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen[bytes]:
        """A `dunning worker` child process, returned once it polls the task queue."""
        log = self.home / f"worker-{len(self.workers) + 1}.log"
        with log.open("wb") as out:
            worker = subprocess.Popen([str(DUNNING), "worker"], env=self.env, cwd=self.home,
                                      stdout=out, stderr=subprocess.STDOUT)
        self.workers.append(worker)
        self.logs.append(log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "worker polling task queue" in log.read_text(errors="replace"):
                return worker
            if worker.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker did not start (exit {worker.poll()}):\n{self.tail(log)}")

    @staticmethod
    def tail(log: Path, lines: int = 40) -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def all_logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{self.tail(log)}" for log in self.logs)


def stop(process: subprocess.Popen[bytes] | None, wait: float = GRACE + 5) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def wait_for(predicate: Callable[[], T], seconds: float, what: str, every: float = 0.1) -> T:
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {seconds:.0f}s")
        time.sleep(every)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`dunning server` as a child process, with the environment every test builds on."""
    if not DUNNING.exists():
        pytest.skip("the dunning console script is not installed (pip install -e .)")
    try:
        devserver.temporal_binary()
    except devserver.ServerError as exc:
        pytest.skip(str(exc))
    home = tmp_path_factory.mktemp("crash")
    policy = home / "policies.toml"
    policy.write_text(POLICY)
    port, ui_port = devserver.free_ports(2)
    cleared = ("DUNNING_", "SENDGRID_", "TWILIO_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
               "https_proxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cleared)}
    env |= {
        "DUNNING_TEMPORAL_ADDRESS": f"127.0.0.1:{port}",
        "DUNNING_POLICY_FILE": str(policy),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [str(DUNNING), "server", "--db-file", str(home / "temporal.db"), "--port", str(port),
         "--ui-port", str(ui_port)], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: not devserver.port_free(port) or server.poll() is not None, 30,
                 "Temporal dev server port open")
        assert server.poll() is None, (home / "server.log").read_text(errors="replace")
        yield Stack(home, env)
    finally:
        stop(server, wait=15)
        log.close()


@pytest.fixture
def live(stack: Stack, tmp_path: Path) -> Iterator[Live]:
    """Live delivery against a fresh fake provider, with this test's own database and queue."""
    fake = TimedFake()
    db_url = f"sqlite:///{tmp_path / 'dunning.db'}"
    env = stack.env | {
        "DUNNING_DELIVERY": "live",
        "SENDGRID_API_KEY": "SG.test",
        "DUNNING_SENDGRID_BASE_URL": fake.url,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": "x",
        "TWILIO_FROM_NUMBER": "+15005550006",
        "DUNNING_TWILIO_BASE_URL": fake.url,
        "DUNNING_AGENCY_WEBHOOK_URL": f"{fake.url}/agency",
        "DUNNING_AGENCY_WEBHOOK_SECRET": "agency-secret-0123456789",
        "DUNNING_DATABASE_URL": db_url,
        "DUNNING_TASK_QUEUE": f"crash-{uuid.uuid4().hex[:8]}",
        "DUNNING_SHUTDOWN_GRACE_SECONDS": str(GRACE),
    }
    state = Live(fake, env, tmp_path, db_url)
    try:
        yield state
    finally:
        for worker in state.workers:
            stop(worker)
        fake.close()


# -- invoices, the ledger and the fake's records --------------------------------------------------


def invoices(first_number: int, tag: str) -> list[dict[str, Any]]:
    """``INVOICES`` invoices due now, each for its own customer with its own phone and email."""
    due = datetime.now(UTC).isoformat()
    made = []
    for n in range(INVOICES):
        number = first_number + n
        made.append(sample_invoice(
            f"INV-{tag}-{n:02d}", policy="crash", due_at=due,
            customer={"id": f"C-{tag}-{n:02d}", "name": f"Customer {n}",
                      "email": f"c{number}@example.com", "phone": f"+1415555{number:04d}",
                      "timezone": "UTC", "locale": "en_US"},
        ))
    return made


def start_runs(live: Live, batch: list[dict[str, Any]]) -> None:
    file = live.home / "invoices.jsonl"
    file.write_text("".join(json.dumps(invoice) + "\n" for invoice in batch))
    result = subprocess.run([str(DUNNING), "start", str(file)], env=live.env, cwd=live.home,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def rows_of(live: Live, step: str, channel: str) -> dict[str, Delivery]:
    """One step's ledger rows on one channel, by invoice."""
    with session(prepare(live.db_url)) as db:
        rows = db.exec(select(Delivery).where(Delivery.step == step, Delivery.channel == channel)).all()
    return {row.invoice_id: row for row in rows}


def sms_rows(live: Live) -> dict[str, Delivery]:
    return rows_of(live, "sms_reminder", "sms")


def all_rows(live: Live) -> list[Delivery]:
    with session(prepare(live.db_url)) as db:
        return list(db.exec(select(Delivery).order_by(col(Delivery.id))).all())


def run_states(live: Live) -> dict[str, str]:
    with session(prepare(live.db_url)) as db:
        return {run.invoice_id: run.state for run in db.exec(select(RunRow)).all()}


def trail(live: Live) -> list[AuditEntry]:
    with session(prepare(live.db_url)) as db:
        return list(db.exec(select(AuditEntry).order_by(col(AuditEntry.id))).all())


def sms_posts(fake: FakeProvider, phones: set[str]) -> list[Recorded]:
    return posts_to(fake, SMS, phones)


def posts_to(fake: FakeProvider, path: str, recipients: set[str]) -> list[Recorded]:
    return [r for r in fake.to(path) if set(r.recipients) & recipients]


def about(fake: FakeProvider, recipient: str) -> list[Recorded]:
    """Every request about ``recipient``: sends (its address or ``To``) and Twilio lookups."""
    return [r for r in list(fake.requests)
            if recipient in r.recipients or (r.method == "GET" and r.query.get("To") == recipient)]


def wait_for_handoff(live: Live, batch: list[dict[str, Any]], seconds: float = 60) -> None:
    """Until every run is handed to the agency and its notice to the customer is recorded (the
    run's state changes with the referral, before the notice goes out)."""
    ids = {invoice["invoice_id"] for invoice in batch}

    def done() -> bool:
        states = run_states(live)
        if not all(states.get(i) == "handed_off" for i in ids):
            return False
        rows = [d for d in all_rows(live) if d.invoice_id in ids]
        noticed = {d.invoice_id for d in rows if d.step == "agency_handoff" and d.channel != "agency"}
        return noticed == ids and all(d.status in FINAL for d in rows)

    try:
        wait_for(done, seconds, "every run handed to the agency and its notice recorded", every=0.5)
    except AssertionError as exc:
        states = Counter(run_states(live).get(i) for i in ids)
        open_rows = [(d.invoice_id, d.step, d.channel, d.status) for d in all_rows(live)
                     if d.invoice_id in ids and d.status not in FINAL]
        raise AssertionError(f"{exc}; run states {dict(states)}; open deliveries {open_rows}\n"
                             f"{live.all_logs()}") from None


def check_counts(live: Live, batch: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Exactly one text and one call per customer, at most two emails per step (the second
    marked a possible duplicate), one agency referral, nothing skipped, nothing unknown."""
    fake = live.fake
    texts, calls = fake.count_by_recipient(SMS), fake.count_by_recipient(CALLS)
    mails: Counter[tuple[str, str]] = Counter()
    for request in fake.to(MAIL):
        ref = (request.json.get("custom_args") or {}).get("dunning_ref", "//")
        for recipient in request.recipients:
            mails[(recipient, ref.split("/")[1])] += 1
    referrals = Counter(json.loads(r.body).get("reference", "").split("/")[0]
                        for r in fake.to("/agency"))
    entries = trail(live)
    per_customer: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for invoice in batch:
        customer, invoice_id = invoice["customer"], invoice["invoice_id"]
        phone, email = customer["phone"], customer["email"]
        counts = {"sms": texts.get(phone, 0), "calls": calls.get(phone, 0),
                  "reminder_emails": mails[(email, "friendly_reminder")],
                  "notice_emails": mails[(email, "agency_handoff")],
                  "agency": referrals[invoice_id]}
        per_customer[invoice_id] = counts
        if counts["sms"] != 1 or counts["calls"] != 1 or counts["agency"] != 1:
            problems.append(f"{invoice_id}: {counts}")
        for step, key in (("friendly_reminder", "reminder_emails"), ("agency_handoff", "notice_emails")):
            if not 1 <= counts[key] <= 2:
                problems.append(f"{invoice_id}: {counts[key]} {step} emails")
            elif counts[key] == 2 and not any(
                    e.invoice_id == invoice_id and e.step == step and e.channel == "email"
                    and "possible duplicate" in e.detail for e in entries):
                problems.append(f"{invoice_id}: second {step} email not marked possible duplicate")
    ids = {invoice["invoice_id"] for invoice in batch}
    skipped = [(e.invoice_id, e.step, e.detail) for e in entries
               if e.invoice_id in ids and e.status == "skipped"]
    unknown = [(d.invoice_id, d.step, d.channel, d.detail) for d in all_rows(live)
               if d.invoice_id in ids and d.status not in ("sent",)]
    assert not problems, f"per-customer counts wrong: {problems}"
    assert not skipped, f"steps skipped: {skipped}"
    assert not unknown, f"deliveries not sent: {unknown}"
    return per_customer


def summary(per_customer: dict[str, dict[str, int]]) -> str:
    shapes = Counter(tuple(sorted(c.items())) for c in per_customer.values())
    return "; ".join(f"{n} customers: {dict(shape)}" for shape, n in shapes.items())


# -- the tests -----------------------------------------------------------------------------------


@dataclass
class Kill:
    """One SIGKILL in the middle of a step's sends, and how the runs it cut off recovered."""

    step: str
    path: str
    killed_at: float
    recipient: dict[str, str]  # invoice -> its address on this step's channel
    posted: set[str]  # recipients whose send reached the provider before the kill
    cut: dict[str, str]  # invoice -> recipient, for ledger rows left `calling` by the dead worker
    settled: dict[str, float]  # seconds from the kill to a cut-off row turning `sent`
    pending: set[str] = field(default_factory=set)  # invoices whose step had not begun its send

    def after_kill(self, fake: TimedFake, invoice_id: str) -> list[Recorded]:
        return [r for r in about(fake, self.recipient[invoice_id])
                if self.path in r.path and fake.at(r) > self.killed_at]

    def resumed(self, fake: TimedFake, invoices: Iterable[str]) -> dict[str, float]:
        """Seconds from the kill to each run's first request to the provider after it."""
        return {i: min((fake.at(r) - self.killed_at for r in self.after_kill(fake, i)),
                       default=float("inf")) for i in invoices}

    def figures(self, fake: TimedFake) -> str:
        def stats(values: dict[str, float]) -> str:
            if not values:
                return "none"
            late = sum(1 for v in values.values() if v > RECOVERY_LIMIT)
            return (f"max {max(values.values()):.2f}s, median {statistics.median(values.values()):.2f}s"
                    f" ({len(values)} runs, {late} over {RECOVERY_LIMIT:.0f}s)")

        lookups = sum(1 for i in self.cut for r in self.after_kill(fake, i) if r.method == "GET")
        return (f"{self.step}: {len(self.posted)} POSTs received, {len(self.cut)} rows `calling` at "
                f"the kill; cut-off sends resumed {stats(self.resumed(fake, self.cut))}, row `sent` "
                f"{stats(self.settled)}, {lookups} reconciliation lookups; sends not begun at the "
                f"kill began {stats(self.resumed(fake, self.pending))}")


def kill_mid_step(live: Live, batch: list[dict[str, Any]], step: str, channel: str, path: str,
                  address: str) -> Kill:
    """Wait until ``step``'s sends are in flight, SIGKILL the worker, start a replacement at
    once, and wait until the sends it cut off are recorded."""
    fake = live.fake
    recipient = {invoice["invoice_id"]: invoice["customer"][address] for invoice in batch}
    recipients = set(recipient.values())
    wait_for(lambda: len(posts_to(fake, path, recipients)) >= 8, 40, f"{step} sends in flight")
    victim = live.workers[-1]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait(timeout=10)
    rows = rows_of(live, step, channel)  # as the dead worker left them
    live.start_worker()  # the replacement, at once
    posted = {r.recipients[0] for r in posts_to(fake, path, recipients) if fake.at(r) < killed_at}
    cut = {i: recipient[i] for i, row in rows.items() if row.status == "calling"}
    assert cut, f"no {step} send was in flight at the kill: {[(i, r.status) for i, r in rows.items()]}"
    kill = Kill(step, path, killed_at, recipient, posted, cut, {},
                pending={i for i in recipient if i not in rows})

    def all_settled() -> bool:
        now = time.monotonic()
        for invoice_id, row in rows_of(live, step, channel).items():
            if invoice_id in cut and invoice_id not in kill.settled and row.status == "sent":
                kill.settled[invoice_id] = now - killed_at
        return kill.settled.keys() == cut.keys()

    try:
        wait_for(all_settled, 30, f"every cut-off {step} send settled", every=0.05)
    except AssertionError as exc:
        states = {i: r.status for i, r in rows_of(live, step, channel).items() if i in cut}
        raise AssertionError(f"{exc}: {states}\n{live.all_logs()}") from None
    return kill


def test_sigkill_mid_send_resumes_within_10s_without_duplicate_texts_or_calls(live: Live):
    """The worker is SIGKILLed three times: in the middle of the email, the SMS and the call step."""
    fake = live.fake
    for _ in range(INVOICES):  # every first send is slow: each kill lands while a provider thinks
        fake.script(MAIL, 202, b"", {"X-Message-Id": f"sg-{uuid.uuid4().hex[:16]}"}, delay=SLOW)
        fake.script(SMS, 201, {"sid": f"SM{uuid.uuid4().hex}", "status": "queued"}, delay=SLOW)
        fake.script(CALLS, 201, {"sid": f"CA{uuid.uuid4().hex}", "status": "queued"}, delay=SLOW)
    live.start_worker()
    batch = invoices(100, "K")
    start_runs(live, batch)

    kills = [kill_mid_step(live, batch, "friendly_reminder", "email", MAIL, "email"),
             kill_mid_step(live, batch, "sms_reminder", "sms", SMS, "phone"),
             kill_mid_step(live, batch, "phone_call", "voice", CALLS, "phone")]
    wait_for_handoff(live, batch)
    per_customer = check_counts(live, batch)

    figures = "\n  ".join(kill.figures(fake) for kill in kills)
    print(f"\nSIGKILL:\n  {figures}\nSIGKILL counts: {summary(per_customer)}")
    for kill in kills:  # every send cut off by a kill moved on within the limit
        assert max(kill.resumed(fake, kill.cut).values()) <= RECOVERY_LIMIT, figures
        assert max(kill.settled.values()) <= RECOVERY_LIMIT, figures
        # and runs whose send had not begun (their workflow task died with the worker) too
        assert max(kill.resumed(fake, kill.pending).values(), default=0.0) <= RECOVERY_LIMIT, figures
    email, *phone = kills
    by_email = {invoice["customer"]["email"]: invoice["invoice_id"] for invoice in batch}
    for address in email.posted:  # cut off after the POST: sent once more, and marked
        assert per_customer[by_email[address]]["reminder_emails"] == 2, (address, figures)
    for kill in phone:  # cut off after the POST: found at Twilio, never sent again
        found = [row for i, row in rows_of(live, kill.step, "sms" if kill.step == "sms_reminder"
                                           else "voice").items() if kill.cut.get(i) in kill.posted]
        assert all("earlier attempt was cut off" in row.detail for row in found), [
            row.detail for row in found]


def test_sigterm_lets_in_flight_sends_finish_then_a_new_worker_finishes_the_runs(live: Live):
    fake = live.fake
    slow = 3.0
    for _ in range(INVOICES):
        fake.script(SMS, 201, {"sid": f"SM{uuid.uuid4().hex}", "status": "queued"}, delay=slow)
    worker = live.start_worker()
    batch = invoices(140, "T")
    phones = {invoice["customer"]["phone"] for invoice in batch}
    by_phone = {invoice["customer"]["phone"]: invoice["invoice_id"] for invoice in batch}
    start_runs(live, batch)

    wait_for(lambda: len(sms_posts(fake, phones)) >= 8, 40, "texts in flight")
    worker.send_signal(signal.SIGTERM)
    termed_at = time.monotonic()
    posted = {by_phone[r.recipients[0]] for r in sms_posts(fake, phones)}
    calling = {i for i, row in sms_rows(live).items() if row.status == "calling"}
    try:
        code = worker.wait(timeout=GRACE + 10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not exit within {GRACE + 10}s of SIGTERM\n"
                             f"{live.all_logs()}") from None
    exited_after = time.monotonic() - termed_at
    rows = sms_rows(live)  # everything the stopped worker claimed, as it left it
    posts = Counter(by_phone[r.recipients[0]] for r in sms_posts(fake, phones))
    in_flight = posted | calling
    outcome = {i: rows[i].status if i in rows else None for i in in_flight}
    figures = (f"{len(posted)} texts POSTed and {len(calling)} rows `calling` at SIGTERM, worker "
               f"exited {exited_after:.2f}s after SIGTERM with code {code}; their ledger rows: "
               f"{dict(Counter(outcome.values()))}; all rows it left: "
               f"{dict(Counter(row.status for row in rows.values()))}")
    print(f"\nSIGTERM: {figures}")
    assert code == 0 and exited_after <= GRACE, figures
    assert all(status == "sent" for status in outcome.values()), f"{figures}: {outcome}"
    assert all(row.status == "sent" for row in rows.values()), figures
    assert all(posts[i] == 1 for i in rows), f"{figures}: POSTs {dict(posts)}"
    assert not any(e.status in ("unknown", "ambiguous") for e in trail(live)), figures

    live.start_worker()
    wait_for_handoff(live, batch)
    per_customer = check_counts(live, batch)
    print(f"SIGTERM counts: {summary(per_customer)}")


def test_a_worker_stopping_while_the_database_holds_a_record_leaves_and_nothing_is_lost(live: Live):
    """A payment's records wait in a local activity for a database that does not answer (here:
    a write lock held). A SIGTERM must not keep the worker up for as long as that lasts: it
    leaves 10 s after its grace period, and the next worker records the payment."""
    import sqlite3

    grace = 2
    live.env["DUNNING_SHUTDOWN_GRACE_SECONDS"] = str(grace)
    worker = live.start_worker()
    [invoice] = invoices(900, "D")[:1]
    invoice_id = invoice["invoice_id"]
    start_runs(live, [invoice])
    wait_for(lambda: any(e.status == "started" for e in trail(live) if e.invoice_id == invoice_id),
             30, "the run's start recorded")
    lock = sqlite3.connect(live.db_url.removeprefix("sqlite:///"), timeout=5, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # every write waits (readers do not, in WAL mode)
    try:
        paying = subprocess.Popen([str(DUNNING), "pay", invoice_id, "100.00", "--payment-id", "pi_stuck"],
                                  env=live.env, cwd=live.home, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(3)  # the update reached the worker; its records wait for the lock
        worker.send_signal(signal.SIGTERM)
        termed_at = time.monotonic()
        try:
            code = worker.wait(timeout=grace + 10 + 5)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker was still up {grace + 15}s after SIGTERM\n"
                                 f"{live.all_logs()}") from None
        left_after = time.monotonic() - termed_at
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    print(f"\nstuck SIGTERM: left {left_after:.1f}s after the signal with code {code}")
    assert code == 75 and left_after >= grace + 10 - 1, (code, left_after, live.all_logs())
    assert "still stopping" in live.tail(live.logs[-1])
    paying.wait(timeout=60)
    live.start_worker()
    wait_for(lambda: any(e.invoice_id == invoice_id and e.kind == "payment" and e.status == "accepted"
                         for e in trail(live)), 60, "the payment recorded by the next worker")
    # counted once (the CLI also signalled it when the update got no answer: a duplicate)
    statuses = [e.status for e in trail(live) if e.invoice_id == invoice_id and e.kind == "payment"]
    assert statuses.count("accepted") == 1 and set(statuses) <= {"accepted", "duplicate"}, statuses
    with session(prepare(live.db_url)) as db:
        run = db.exec(select(RunRow).where(RunRow.invoice_id == invoice_id)).one()
    assert Decimal(run.paid) == Decimal("100.00")
