"""The ``dunning`` command driven as a user would: subprocesses against a real dev server + worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

import devserver
from settings import Settings
from tests.conftest import policies_any_time, sample_invoice

DUNNING = str(Path(sys.executable).parent / "dunning")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`dunning server` and `dunning worker` as child processes; yields their environment."""
    if not Path(DUNNING).exists():
        pytest.skip("the dunning console script is not installed (pip install -e .)")
    home = tmp_path_factory.mktemp("cli")
    # production policies plus the seconds-long demo one
    policies = policies_any_time(home, "default.toml", "demo.toml")
    port, ui_port, metrics_port = devserver.free_ports(3)
    env = {
        **os.environ,
        "DUNNING_TEMPORAL_ADDRESS": f"127.0.0.1:{port}",
        "DUNNING_TASK_QUEUE": f"cli-{uuid.uuid4().hex[:6]}",
        "DUNNING_DATABASE_URL": f"sqlite:///{home / 'dunning.db'}",
        "DUNNING_POLICY_FILE": str(policies),
        "DUNNING_METRICS_PORT": str(metrics_port),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    server = subprocess.Popen(
        [DUNNING, "server", "--db-file", str(home / "temporal.db"), "--port", str(port),
         "--ui-port", str(ui_port)], env=env, cwd=home,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        deadline = time.monotonic() + 30
        while devserver.port_free(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = subprocess.Popen([DUNNING, "worker"], env=env, cwd=home,
                                  stdout=subprocess.DEVNULL, stderr=(home / "worker.log").open("wb"))
        yield {**env, "HOME_DIR": str(home)}
    finally:
        codes = []
        for process in (worker, server):
            if process is not None:
                process.terminate()  # SIGTERM, as a service manager stops them
                codes.append(process.wait(timeout=30))
        log = (home / "worker.log").read_text(errors="replace")[-3000:]
        assert codes == [0, 0], f"worker and server must exit cleanly on SIGTERM, got {codes}\n{log}"


def dunning(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DUNNING, *args], env=env, cwd=env.get("HOME_DIR"), input=stdin,
                          capture_output=True, text=True, timeout=60)


def wait_for(predicate: Any, seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("condition not met in time")


def write(path: Path, invoices: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(invoices))
    return path


def test_start_status_pay_log_round_trip(stack: dict[str, str], tmp_path: Path):
    invoice = sample_invoice(policy="demo")
    file = write(tmp_path / "one.json", [invoice])
    started = dunning(stack, "start", str(file))
    assert started.returncode == 0, started.stderr
    assert f"{invoice['invoice_id']}: started" in started.stdout

    again = dunning(stack, "start", str(file))
    assert again.returncode == 0
    assert "unchanged" in again.stdout and "already" in again.stdout

    status = json.loads(dunning(stack, "status", invoice["invoice_id"], "--json").stdout)
    assert {"invoice_id", "workflow_id", "state", "stage", "balance_due", "currency",
            "next_step"} <= status.keys()
    assert status["workflow_id"] == f"dunning-{invoice['invoice_id']}"
    assert status["state"] == "active"
    assert status["balance_due"] == "1250.00"

    def reminded() -> bool:
        current = json.loads(dunning(stack, "status", invoice["invoice_id"], "--json").stdout)
        return current["stage"] == "friendly_reminder"

    wait_for(reminded)
    letter = dunning(stack, "letter", invoice["invoice_id"], "--out", str(tmp_path / "notice.pdf"))
    assert letter.returncode == 0, letter.stderr
    text = " ".join(PdfReader(tmp_path / "notice.pdf").pages[0].extract_text().split())
    assert f"FINAL NOTICE - invoice {invoice['invoice_id']}" in text and "Total due $1,250.00" in text
    assert "Ada Lovelace" in text and "collections agency" in text
    missing = dunning(stack, "letter", "INV-NOPE")
    assert missing.returncode != 0 and "INV-NOPE" in missing.stderr and "Traceback" not in missing.stderr
    unknown = dunning(stack, "log", "INV-NOPE", "--json")  # a script must not read a typo as "nothing"
    assert unknown.returncode == 2 and "nothing recorded for invoice INV-NOPE" in unknown.stderr
    unknown = dunning(stack, "outbox", "INV-NOPE", "--json")
    assert unknown.returncode == 2 and "nothing recorded for invoice INV-NOPE" in unknown.stderr
    wrong = dunning(stack, "pay", invoice["invoice_id"], "10", "--currency", "EUR", "--payment-id", "eur-1")
    assert wrong.returncode == 2
    assert "currency" in wrong.stderr and "Traceback" not in wrong.stderr
    # without the payment's own id a repeated command would book the money twice
    nameless = dunning(stack, "pay", invoice["invoice_id"], "10")
    assert nameless.returncode == 2 and "--payment-id" in nameless.stderr

    for _ in range(50):  # `dunning list` reads Temporal's visibility, which follows in a moment
        listed = json.loads(dunning(stack, "list", "--state", "active", "--json").stdout)
        if any(row["invoice"] == invoice["invoice_id"] for row in listed):
            break
        time.sleep(0.2)
    assert next(row for row in listed if row["invoice"] == invoice["invoice_id"])["balance"] == "1250.00 USD"
    refused = dunning(stack, "list", "--state", "happy")
    assert refused.returncode == 2 and "state: unknown state 'happy'" in refused.stderr

    paid = dunning(stack, "pay", invoice["invoice_id"], "1250.00", "--payment-id", "psp-1")
    assert paid.returncode == 0, paid.stderr

    def settled() -> dict[str, Any] | None:
        current = json.loads(dunning(stack, "status", invoice["invoice_id"], "--json").stdout)
        return current if current["state"] == "paid" else None

    final = wait_for(settled)
    assert final["balance_due"] == "0.00" and final["next_step"] is None

    kept = json.loads(dunning(stack, "outbox", invoice["invoice_id"], "--json").stdout)
    first = kept[0]
    assert first["channel"] == "email" and first["recipient"] == "ada@example.com"
    assert first["subject"].startswith("Friendly reminder") and "$1,250.00" in first["body"]
    assert "Subject: Friendly reminder" in dunning(stack, "outbox", invoice["invoice_id"]).stdout

    trail = json.loads(dunning(stack, "log", invoice["invoice_id"], "--json").stdout)
    assert all({"at", "kind", "step", "channel", "status", "detail"} <= e.keys() for e in trail)
    kinds = [(e["kind"], e["status"], e["step"]) for e in trail]
    assert ("communication", "sent", "friendly_reminder") in kinds
    assert ("payment", "accepted", None) in kinds
    assert kinds[-1] == ("state", "paid", None)
    # The SMS is due 10 s after the email; on a slow machine the CLI calls above can take longer
    # than that, so it may have gone out before the payment. Nothing goes out after it.
    paid_at = datetime.fromisoformat(next(e["at"] for e in trail if e["kind"] == "payment"))
    assert all(datetime.fromisoformat(m["created_at"]) <= paid_at for m in kept), kept


def test_worker_serves_prometheus_metrics(stack: dict[str, str], tmp_path: Path):
    """The SDK's metrics and ours, so an operator can alert on deliveries that keep failing."""
    import urllib.request

    invoice = sample_invoice(policy="demo")
    assert dunning(stack, "start", str(write(tmp_path / "m.json", [invoice]))).returncode == 0
    url = f"http://127.0.0.1:{stack['DUNNING_METRICS_PORT']}/metrics"

    def scraped() -> str | None:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return text if 'dunning_deliveries_total{' in text else None

    text = wait_for(scraped, 40)
    assert 'channel="email"' in text and 'outcome="sent"' in text
    assert "dunning_runs_retrying_over_1h" in text
    assert "temporal_workflow_completed" in text or "temporal_request" in text  # the SDK's own
    dunning(stack, "cancel", invoice["invoice_id"], "--reason", "test done")


def test_customers_unmatched_payments_and_reconcile(stack: dict[str, str], tmp_path: Path):
    invoice = sample_invoice(policy="demo", customer={**sample_invoice()["customer"], "id": "C-CLI-9"})
    assert dunning(stack, "start", str(write(tmp_path / "c.json", [invoice]))).returncode == 0

    bad = dunning(stack, "customer", "update", "C-CLI-9", "--phone", "555-0100")
    assert bad.returncode == 2 and "phone" in bad.stderr
    good = dunning(stack, "customer", "update", "C-CLI-9", "--phone", "+14155550142")
    assert good.returncode == 0, good.stderr

    stray = dunning(stack, "pay", "INV-NOT-HERE", "12.00", "--currency", "USD", "--payment-id", "x1")
    assert stray.returncode == 0 and "unmatched" in stray.stdout
    listed = json.loads(dunning(stack, "unmatched", "--json").stdout)
    assert [(p["invoice_id"], p["amount"]) for p in listed] == [("INV-NOT-HERE", "12.00")]
    assert "no deliveries with an unknown outcome" in dunning(stack, "reconcile").stdout

    cancelled = dunning(stack, "cancel", invoice["invoice_id"], "--reason", "voided", "--actor", "alice")
    assert cancelled.returncode == 0
    trail = json.loads(dunning(stack, "log", invoice["invoice_id"], "--json").stdout)
    assert ("cancel", "alice: voided") in [(e["status"], e["detail"]) for e in trail], trail
    forgot = dunning(stack, "customer", "forget", "C-CLI-9")
    assert forgot.returncode == 0 and "erased" in forgot.stdout
    assert dunning(stack, "customer", "forget", "C-NOBODY").returncode == 2


@pytest.mark.parametrize(("args", "expected"), [
    (["INV-NOPE-1", "abc", "--currency", "USD"], "error: amount 'abc' is not a decimal number"),
    (["INV-NOPE-2", "12.00"], "error: currency: there is no dunning run for invoice INV-NOPE-2"),
    (["INV-NOPE-3", "--currency", "ZZZ", "--", "-7"], "error: currency: unknown currency 'ZZZ'"),
    (["INV-NOPE-4", "--currency", "USD", "--", "-7"], "error: amount must be positive, got -7"),
    (["INV-NOPE-5", "1e3", "--currency", "USD"], "error: amount must be a plain decimal such as 1250.00"),
    (["INV-NOPE-6", "1_000.50", "--currency", "USD"], "error: amount must be a plain decimal"),
    (["INV NOPE", "12.00", "--currency", "USD"], "error: invoice_id: 'INV NOPE' is not an invoice id"),
    (["'INV-5'", "12.00", "--currency", "USD"], "error: invoice_id: \"'INV-5'\" is not an invoice id"),
    (["I" * 104, "12.00", "--currency", "USD"], "is not an invoice id"),
])
def test_a_payment_with_no_run_is_checked_before_it_is_kept(stack: dict[str, str], args: list[str],
                                                             expected: str):
    """An unmatched payment is money to match by hand: kept only with an amount, a currency and an
    invoice id a run could have."""
    result = dunning(stack, "pay", "--payment-id", f"chk-{uuid.uuid4().hex[:8]}", *args)
    assert result.returncode == 2, result.stdout
    assert expected in result.stderr
    kept = json.loads(dunning(stack, "unmatched", "--json").stdout)
    assert args[0] not in {p["invoice_id"] for p in kept}


def test_codec_server_command_decodes_for_the_web_ui(tmp_path: Path):
    """`dunning codec-server` serves the protocol the UI speaks, with the deployment's keys."""
    import base64
    import signal
    import urllib.request

    [port] = devserver.free_ports(1)
    key = base64.b64encode(b"\x01" * 32).decode()
    env = {**os.environ, "DUNNING_PAYLOAD_KEYS": f"k1:{key}", "DUNNING_CODEC_TOKEN": "tok",
           "NO_PROXY": "127.0.0.1,localhost"}
    server = subprocess.Popen([DUNNING, "codec-server", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: not devserver.port_free(port), 20)
        payload = {"payloads": [{"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                                 "data": base64.b64encode(b'"Ada"').decode()}]}

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json", "Authorization": "Bearer tok"})
            return json.loads(urllib.request.urlopen(request, timeout=5).read())

        encoded = post("/encode", payload)
        assert base64.b64decode(encoded["payloads"][0]["metadata"]["encoding"]) == b"binary/encrypted"
        assert post("/decode", encoded) == payload
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert dunning({**env, "DUNNING_PAYLOAD_KEYS": ""}, "codec-server").returncode == 2
    # without a token it serves loopback only: anything reaching the port could decrypt
    open_to_all = dunning({**env, "DUNNING_CODEC_TOKEN": ""}, "codec-server", "--host", "0.0.0.0")
    assert open_to_all.returncode == 2 and "without DUNNING_CODEC_TOKEN" in open_to_all.stderr


def test_batch_starts_valid_rows_and_reports_each_rejected_row(stack: dict[str, str], tmp_path: Path):
    good = sample_invoice(policy="demo")
    bad_email = sample_invoice(policy="demo")
    bad_email["customer"] = {**bad_email["customer"], "email": "not-an-email"}
    lines = [json.dumps(good), json.dumps(bad_email),
             json.dumps(sample_invoice(currency="ZZZ")), "{broken"]
    file = tmp_path / "batch.jsonl"
    file.write_text("\n".join(lines) + "\n")
    result = dunning(stack, "start", str(file))
    assert result.returncode == 2
    assert f"{good['invoice_id']}: started" in result.stdout
    assert "batch.jsonl row 2: rejected: customer.email" in result.stderr
    assert "batch.jsonl row 3: rejected: currency: unknown currency 'ZZZ'" in result.stderr
    assert "batch.jsonl row 4: rejected: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    missing = dunning(stack, "status", bad_email["invoice_id"])
    assert missing.returncode == 2 and "no dunning run" in missing.stderr


def test_a_row_whose_fees_cannot_be_planned_is_rejected_alone(stack: dict[str, str], tmp_path: Path):
    """A late_payment invoice due before the rates file's first German rate is one rejected row;
    the other rows start and the summary counts it."""
    from tests.test_charges import fees_unbacked_invoice

    good = sample_invoice(policy="demo")
    unbacked = fees_unbacked_invoice("C-CLI-FEES")
    result = dunning(stack, "start", str(write(tmp_path / "fees.json", [good, unbacked])))
    assert result.returncode == 2
    assert f"{good['invoice_id']}: started" in result.stdout
    assert "fees.json row 2: rejected: fees: no de reference rate in force" in result.stderr
    assert "1 invoice(s) rejected, 1 submitted" in result.stderr
    assert dunning(stack, "status", unbacked["invoice_id"]).returncode == 2
    dunning(stack, "cancel", good["invoice_id"], "--reason", "test done")


def test_csv_from_stdin(stack: dict[str, str]):
    invoice_id = f"INV-{uuid.uuid4().hex[:8]}"
    csv_text = (
        "invoice_id,amount_due,currency,issued_on,due_on,customer.id,customer.name,"
        "customer.email,customer.phone,customer.timezone,payment_url,policy\n"
        f"{invoice_id},99.90,EUR,2026-10-01,2026-10-31,C-9,Grace Hopper,grace@example.com,,"
        "Europe/Berlin,https://billing.example.com/pay/x,standard\n"
        f"{invoice_id}-B,-5,EUR,2026-10-01,2026-10-31,C-9,Grace Hopper,grace@example.com,,"
        "Europe/Berlin,https://billing.example.com/pay/x,standard\n"
    )
    result = dunning(stack, "start", "-", stdin=csv_text)
    assert result.returncode == 2
    assert f"{invoice_id}: started" in result.stdout
    assert "stdin row 3: rejected: amount_due must be positive" in result.stderr
    status = json.loads(dunning(stack, "status", invoice_id, "--json").stdout)
    assert status["currency"] == "EUR" and status["balance_due"] == "99.90"


def test_unknown_policy_is_refused_before_anything_starts(stack: dict[str, str], tmp_path: Path):
    invoice = sample_invoice(policy="no-such-policy")
    result = dunning(stack, "start", str(write(tmp_path / "p.json", [invoice])))
    assert result.returncode == 2
    assert "policy: unknown policy 'no-such-policy'" in result.stderr
    assert dunning(stack, "status", invoice["invoice_id"]).returncode == 2


def test_unreachable_server_exits_1_with_a_clear_message(tmp_path: Path):
    env = {**os.environ, "DUNNING_TEMPORAL_ADDRESS": f"127.0.0.1:{devserver.free_port()}",
           "DUNNING_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "HOME_DIR": str(tmp_path)}
    result = dunning(env, "status", "INV-1")
    assert result.returncode == 1
    assert "cannot reach the Temporal server" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_start_with_no_starts_in_flight_is_refused(tmp_path: Path, value: str):
    """--concurrency 0 would wait for a free slot forever; a negative one is no number of slots."""
    env = {**os.environ, "DUNNING_TEMPORAL_ADDRESS": f"127.0.0.1:{devserver.free_port()}",
           "DUNNING_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "HOME_DIR": str(tmp_path)}
    file = write(tmp_path / "one.json", [sample_invoice()])
    result = dunning(env, "start", "--concurrency", value, str(file))
    assert result.returncode == 2
    assert f"--concurrency: must be at least 1, got {value}" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_invoice_file_is_an_error_not_silence(tmp_path: Path):
    env = {**os.environ, "DUNNING_TEMPORAL_ADDRESS": f"127.0.0.1:{devserver.free_port()}",
           "DUNNING_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "HOME_DIR": str(tmp_path)}
    empty = tmp_path / "export.jsonl"
    empty.write_text("")
    result = dunning(env, "start", str(empty))
    assert result.returncode == 2
    assert f"no invoices in {empty}" in result.stderr


def test_bad_settings_exit_2_naming_the_setting(tmp_path: Path):
    env = {**os.environ, "DUNNING_DELIVERY": "carrier-pigeon", "HOME_DIR": str(tmp_path)}
    result = dunning(env, "status", "INV-1")
    assert result.returncode == 2
    assert "DUNNING_DELIVERY: Input should be 'outbox' or 'live'" in result.stderr


def test_live_mode_without_credentials_is_refused(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "TWILIO"))}
    env |= {"DUNNING_DELIVERY": "live", "HOME_DIR": str(tmp_path)}
    result = dunning(env, "worker")
    assert result.returncode == 2
    assert "SENDGRID_API_KEY" in result.stderr and "TWILIO_AUTH_TOKEN" in result.stderr


def test_live_mode_with_an_agency_step_needs_the_agency_webhook(tmp_path: Path):
    env = {**os.environ, "DUNNING_DELIVERY": "live", "SENDGRID_API_KEY": "k", "TWILIO_ACCOUNT_SID": "AC1",
           "TWILIO_AUTH_TOKEN": "t", "TWILIO_FROM_NUMBER": "+15005550006", "HOME_DIR": str(tmp_path),
           "DUNNING_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"}
    env.pop("DUNNING_AGENCY_WEBHOOK_URL", None)
    result = dunning(env, "worker")
    assert result.returncode == 2
    assert "DUNNING_AGENCY_WEBHOOK_URL" in result.stderr and "Traceback" not in result.stderr


def test_broken_policy_file_names_policy_step_and_field(tmp_path: Path):
    policy = tmp_path / "policies.toml"
    policy.write_text('[policies.strict]\nversion = 1\nsteps = [\n'
                      '  { name = "first", after_due = "1d", channel = "email" },\n'
                      '  { name = "second", after_due = "2weeks", channel = "sms" },\n]\n')
    env = {**os.environ, "DUNNING_POLICY_FILE": str(policy), "HOME_DIR": str(tmp_path)}
    invoice = tmp_path / "i.json"
    invoice.write_text(json.dumps(sample_invoice()))
    result = dunning(env, "start", str(invoice))
    assert result.returncode == 2
    assert "policy 'strict', step 'second', field 'after_due'" in result.stderr


@pytest.mark.parametrize(("setting", "expected"), [
    ({"DUNNING_METRICS_PORT": "abc"}, "settings: DUNNING_METRICS_PORT: Input should be a valid integer"),
    ({"DUNNING_TEMPORAL_TLS_CERT": "{tmp}/client.pem"},
     "settings: DUNNING_TEMPORAL_TLS_CERT and DUNNING_TEMPORAL_TLS_KEY: set both"),
    ({"DUNNING_TEMPORAL_TLS_CERT": "{tmp}/client.pem", "DUNNING_TEMPORAL_TLS_KEY": "{tmp}/missing.key"},
     "settings: DUNNING_TEMPORAL_TLS_KEY: no file at"),
    ({"DUNNING_POLICY_FILE": ""}, "policy file . cannot be read: Is a directory"),
    ({"DUNNING_PUBLIC_URL": "not a url"}, "settings: DUNNING_PUBLIC_URL: 'not a url' is not an http(s) URL"),
    ({"DUNNING_AGENCY_WEBHOOK_URL": "ftp://x"}, "settings: DUNNING_AGENCY_WEBHOOK_URL: 'ftp://x' is not an"),
    ({"DUNNING_EMAIL_FROM": "billing"}, "settings: DUNNING_EMAIL_FROM: 'billing' is not an email address"),
    ({"DUNNING_AGENCY_WEBHOOK_SECRET": "s"}, "settings: DUNNING_AGENCY_WEBHOOK_SECRET: at least 16"),
    ({"DUNNING_DATABASE_URL": "postgresql://u:secretpw@db:notaport/d"},
     "settings: DUNNING_DATABASE_URL: not a database URL"),
])
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path: Path, setting: dict[str, str],
                                                       expected: str):
    """Operators set environment variables, not field names; a certificate without its key must
    not fall back to a plain connection, and an empty policy path is not a traceback."""
    (tmp_path / "client.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    invoice = tmp_path / "i.json"
    invoice.write_text(json.dumps(sample_invoice()))
    env = {**os.environ, "HOME_DIR": str(tmp_path), "DUNNING_DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
           **{name: value.format(tmp=tmp_path) for name, value in setting.items()}}
    result = dunning(env, "policy", "explain", str(invoice))
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "secretpw" not in result.stderr


def test_settings_take_real_world_addresses_and_an_empty_line_as_unset():
    """The checks refuse what cannot work, not what operators write: an empty value (a blank
    line in an .env file) is unset, a scheme in capitals or a port is a URL, and a sender with a
    display name or on an internal domain is an address."""
    taken = Settings(_env_file=None, public_url="", agency_webhook_url="HTTPS://agency.example.com:8443/in",
                     email_from='"Example Billing, Inc." <billing@corp.local>')
    assert taken.public_url is None and taken.agency_webhook_url == "HTTPS://agency.example.com:8443/in"


def test_failed_webhook_events_are_listed_and_can_be_processed_again(tmp_path: Path):
    """A provider's event the inbox could not take (a payment for an invoice id no run can have)
    is where an operator looks, and goes back to the queue once they have fixed the cause."""
    from inbox import Inbox, Incoming
    from models.database import prepare

    url = f"sqlite:///{tmp_path / 'd.db'}"
    inbox = Inbox(prepare(url))
    inbox.store(Incoming("stripe", "evt_1", "payment_intent.succeeded", {"id": "evt_1"}))
    inbox.store(Incoming("stripe", "evt_2", "payment_intent.succeeded", {"id": "evt_2"}))
    first, second = sorted(e.id or 0 for e in inbox.events("stripe"))
    inbox.settle(first, "failed", "PaymentRefused: invoice_id: 'Rechnung 2024/17' is not an invoice id")
    inbox.settle(second, "done", "accepted")
    env = {**os.environ, "HOME_DIR": str(tmp_path), "DUNNING_DATABASE_URL": url}
    listed = dunning(env, "webhooks", "list")
    assert listed.returncode == 0 and "evt_1" in listed.stdout and "evt_2" not in listed.stdout
    rows = json.loads(dunning(env, "webhooks", "list", "--status", "all", "--json").stdout)
    assert [(r["event_id"], r["status"]) for r in rows] == [("evt_2", "done"), ("evt_1", "failed")]
    assert "Rechnung 2024/17" in rows[1]["detail"]
    again = dunning(env, "webhooks", "retry", str(first))
    assert again.returncode == 0 and f"webhook event {first}: queued again" in again.stdout
    [event] = [e for e in inbox.events("stripe") if e.id == first]
    assert event.status == "pending" and event.attempts == 0 and event.payload != "{}"
    twice = dunning(env, "webhooks", "retry", str(first), str(second))
    assert twice.returncode == 2 and f"no failed webhook event {first}, {second}" in twice.stderr


async def test_register_search_attributes_on_an_existing_cluster(tmp_path: Path):
    """A cluster without our attributes gets them from the one-time command (and twice is fine)."""
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
    from temporalio.testing import WorkflowEnvironment

    from tests.conftest import temporal_binary
    from workflows import search

    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary())
    try:
        address = env.client.service_client.config.target_host
        cli_env = {**os.environ, "DUNNING_TEMPORAL_ADDRESS": address, "HOME_DIR": str(tmp_path)}
        for _ in range(2):
            result = dunning(cli_env, "register-search-attributes")
            assert result.returncode == 0, result.stderr
        listed = await env.client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace="default"))
        for key in search.ALL:
            assert listed.custom_attributes[key.name] == key.indexed_value_type
        printed = dunning(cli_env, "register-search-attributes", "--print-only").stdout
        assert "--name DunningStage --type Keyword" in printed
    finally:
        await env.shutdown()


def test_large_batch_summarises_started_and_unchanged(stack: dict[str, str], tmp_path: Path):
    invoices = [sample_invoice(policy="demo") for _ in range(25)]
    file = write(tmp_path / "many.json", invoices)
    first = dunning(stack, "start", str(file))
    assert first.returncode == 0, first.stderr
    assert "25 started, 0 already had a run" in first.stdout
    again = dunning(stack, "start", str(file))
    assert "0 started, 25 already had a run (unchanged)" in again.stdout


def test_actions_from_the_command_line(stack: dict[str, str], tmp_path: Path):
    invoice = sample_invoice()
    invoice_id = invoice["invoice_id"]
    assert dunning(stack, "start", str(write(tmp_path / "a.json", [invoice]))).returncode == 0
    paused = dunning(stack, "pause", invoice_id, "--reason", "customer called", "--actor", "ops:kim",
                     "--json")
    assert paused.returncode == 0, paused.stderr
    state = json.loads(paused.stdout)
    assert state["state"] == "paused" and state["hold"]["actor"] == "ops:kim"
    shown = dunning(stack, "status", invoice_id)
    assert "pause since" in shown.stdout and "customer called" in shown.stdout
    refused = dunning(stack, "promise", invoice_id, "--amount", "10.00", "--by", "2099-01-01")
    assert refused.returncode == 2 and "resume it first" in refused.stderr
    assert dunning(stack, "resume", invoice_id).returncode == 0
    bad = dunning(stack, "plan", invoice_id, "--instalment", "2099-01-01:100.00")
    assert bad.returncode == 2 and "add up to 100.00" in bad.stderr
    malformed = dunning(stack, "plan", invoice_id, "--instalment", "soon")
    assert malformed.returncode == 2 and "DATE:AMOUNT" in malformed.stderr
    off = dunning(stack, "write-off", invoice_id, "--reason", "goodwill", "--amount", "250.00")
    assert off.returncode == 0 and "1000.00 USD" in off.stdout
    trail = json.loads(dunning(stack, "log", invoice_id, "--json").stdout)
    assert [e["status"] for e in trail if e["kind"] == "action"] == ["pause", "resume", "write-off"]


def test_api_refuses_to_start_without_a_key(tmp_path: Path):
    env = {**os.environ, "DUNNING_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    env.pop("DUNNING_API_KEYS", None)
    result = subprocess.run([DUNNING, "api", "--port", "1"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "DUNNING_API_KEYS" in result.stderr


def local_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The CLI against a SQLite file and a Temporal address nothing listens on."""
    return {**os.environ, "DUNNING_TEMPORAL_ADDRESS": f"127.0.0.1:{devserver.free_port()}",
            "DUNNING_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "HOME_DIR": str(tmp_path), **extra}


MARKUP = "paid already [/] thanks [red]x[/red] [/b]"


def test_text_from_customers_is_printed_as_it_is_not_as_markup(tmp_path: Path):
    """An SMS reply "paid already [/] thanks" crashed `dunning log` (a Rich markup error) and
    "[red]" restyled it: the trail shows data literally."""
    from activities.ledger import Ledger
    from models.audit import AuditEvent, AuditKind
    from models.database import engine_for, prepare

    env = local_env(tmp_path)
    url = env["DUNNING_DATABASE_URL"]
    Ledger(prepare(url)).append(AuditEvent(
        key="k1", workflow_id="dunning-INV-MARKUP", invoice_id="INV-MARKUP", at=datetime.now(UTC),
        kind=AuditKind.COMMUNICATION, status="[red]replied", step="[/]", channel="sms", detail=MARKUP))
    engine_for(url).dispose()
    shown = dunning(env, "log", "INV-MARKUP")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "[/]" in text and "[red]replied" in text and "[/b]" in text and "[red]x[/red]" in text
    # an error message quoting the user's input is shown as it is too
    unknown = dunning(env, "log", "[/]")
    assert unknown.returncode == 2 and "nothing recorded for invoice [/]" in unknown.stderr


def test_a_database_migrated_by_a_newer_release_says_to_deploy_it(tmp_path: Path):
    """After a rollback the schema is ahead of the code: "run dunning migrate" was wrong advice
    (alembic then said "Can't locate revision"); both name the revisions and the way out."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from models.database import DatabaseError, alembic_config, check_schema, engine_for, migrate

    env = local_env(tmp_path)
    url = env["DUNNING_DATABASE_URL"]
    migrate(url)
    with engine_for(url).begin() as db:
        db.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    expected = (f"database schema is at 9999, which this release of dunning does not know (it needs "
                f"{head}): a newer release migrated it; deploy that release")
    with pytest.raises(DatabaseError) as raised:  # PostgreSQL: checked, not migrated
        check_schema(url)
    assert str(raised.value) == expected
    engine_for(url).dispose()
    for args in (["migrate"], ["log", "INV-1"]):  # SQLite is migrated by any command
        result = dunning(env, *args)
        assert result.returncode == 1, result.stdout
        assert expected in " ".join(result.stderr.split())
        assert "Can't locate" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("delivery_id", ["99999999999", "2147483648", "0", "-1"])
def test_reconcile_refuses_a_delivery_id_no_row_can_have(tmp_path: Path, delivery_id: str):
    """Beyond the integer column PostgreSQL answered with a NumericValueOutOfRange traceback."""
    result = dunning(local_env(tmp_path), "reconcile", "--sent", "--note", "console", "--", delivery_id)
    assert result.returncode == 2, result.stderr
    assert f"delivery id {delivery_id}: no such delivery (ids run from 1 to 2147483647" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_one_error_naming_the_setting(tmp_path: Path):
    """The SDK's "Address already in use" came as a 117-line traceback naming no setting."""
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dunning(local_env(tmp_path, DUNNING_METRICS_PORT=str(port)), "worker")
    assert result.returncode == 2, result.stderr
    assert f"error: DUNNING_METRICS_PORT: port {port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_retry_says_when_the_run_is_not_waiting_for_one(stack: dict[str, str], tmp_path: Path):
    """A retry signal to a run with no failed delivery does nothing: "retry sent" misled."""
    invoice = sample_invoice(policy="demo")
    assert dunning(stack, "start", str(write(tmp_path / "r.json", [invoice]))).returncode == 0
    result = dunning(stack, "retry", invoice["invoice_id"])
    assert result.returncode == 2, result.stdout
    assert (f"the run for {invoice['invoice_id']} is not waiting for a retry (state: active)"
            in result.stderr)
    assert "retry sent" not in result.stdout
    dunning(stack, "cancel", invoice["invoice_id"], "--reason", "test done")


def test_retry_of_a_failed_run_sends_the_step_again(stack: dict[str, str], tmp_path: Path):
    """A stored locale Babel refuses fails the first reminder; fixed, `dunning retry` sends it."""
    from sqlalchemy import create_engine, text

    customer = {**sample_invoice()["customer"], "id": f"C-RETRY-{uuid.uuid4().hex[:6]}"}
    due = datetime.now().astimezone() + timedelta(seconds=10)  # time to break the locale first
    invoice = sample_invoice(policy="demo", customer=customer, due_at=due.isoformat())
    invoice_id = invoice["invoice_id"]
    assert dunning(stack, "start", str(write(tmp_path / "f.json", [invoice]))).returncode == 0
    engine = create_engine(stack["DUNNING_DATABASE_URL"])

    def set_locale(locale: str) -> None:
        with engine.begin() as db:
            db.execute(text("UPDATE customers SET locale = :l WHERE id = :c"),
                       {"l": locale, "c": customer["id"]})

    def state() -> str:
        return json.loads(dunning(stack, "status", invoice_id, "--json").stdout)["state"]

    try:
        set_locale("xx_BROKEN")
        wait_for(lambda: state() == "failed", 60)
        set_locale("en_US")
        result = dunning(stack, "retry", invoice_id)
        assert result.returncode == 0, result.stderr
        assert f"{invoice_id}: retry sent" in result.stdout
        wait_for(lambda: json.loads(dunning(stack, "status", invoice_id, "--json").stdout)["stage"]
                 == "friendly_reminder", 60)
        assert state() == "active"
    finally:
        engine.dispose()
        dunning(stack, "cancel", invoice_id, "--reason", "test done")


def test_hold_reasons_are_shown_as_they_are(stack: dict[str, str], tmp_path: Path):
    """A hold reason "[/b]" broke `dunning status`; "[red]" restyled it."""
    invoice = sample_invoice(policy="demo")
    invoice_id = invoice["invoice_id"]
    assert dunning(stack, "start", str(write(tmp_path / "h.json", [invoice]))).returncode == 0
    paused = dunning(stack, "pause", invoice_id, "--reason", MARKUP)
    assert paused.returncode == 0, paused.stderr
    assert MARKUP in " ".join(paused.stdout.split())
    shown = dunning(stack, "status", invoice_id)
    assert shown.returncode == 0, shown.stderr
    assert MARKUP in " ".join(shown.stdout.split())
    trail = dunning(stack, "log", invoice_id)
    assert trail.returncode == 0 and "[red]x[/red]" in trail.stdout, trail.stderr
    dunning(stack, "cancel", invoice_id, "--reason", "test done")


def test_the_status_table_shows_the_customers_holds(capsys):
    """A bankruptcy hold on the customer stops every one of their runs: the plain status said
    "state active, hold -", and only --json showed why nothing went out."""
    from cli import show_status
    from models.run import DunningStatus, HoldStatus

    status = DunningStatus(invoice_id="INV-H", workflow_id="dunning-INV-H", state="active", stage=None,
                           balance_due="100.00", amount_due="100.00", paid="0", credit="0", currency="USD",
                           next_step=None, policy="standard", policy_version=1, customer_id="C-H",
                           customer_holds=["bankruptcy"])
    show_status(status, False)
    shown = " ".join(capsys.readouterr().out.split())
    assert "customer holds bankruptcy (nothing is sent)" in shown, shown
    # a plan shows its instalments and what was paid toward it, not its next reminder as an end
    plan = status.model_copy(update={"customer_holds": [], "hold": HoldStatus(
        kind="plan", since=datetime(2026, 12, 1, tzinfo=UTC), until=datetime(2026, 12, 7, 14, tzinfo=UTC),
        instalments=[(date(2026, 12, 10), "50.00"), (date(2027, 1, 10), "50.00")],
        paid_toward=Decimal("0"))})
    show_status(plan, False)
    shown = " ".join(capsys.readouterr().out.split())
    assert "50.00 on 2026-12-10, 50.00 on 2027-01-10; paid toward it 0 USD" in shown, shown
    assert "until 2026-12-07" not in shown
