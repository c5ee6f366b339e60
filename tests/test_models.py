"""The domain without Temporal: invoice validation, policies, payments, intake, rendered messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from activities.channels import OutgoingMessage
from activities.rendering import Renderer
from models.audit import audit_key
from models.delivery import DeliveryRequest, Purpose
from models.errors import describe
from models.intake import read_records
from models.invoice import Invoice, plan_run
from models.payment import Account, PaymentOutcome, PaymentReceived, read_payment
from models.policy import Channel, PolicyError, load_policies, load_policy_book, parse_offset
from models.records import CustomerRecord
from models.run import RunState, advance
from settings import ROOT
from tests.conftest import sample_invoice


def rejection(**changes: Any) -> str:
    with pytest.raises(ValidationError) as raised:
        Invoice.model_validate(sample_invoice(**changes))
    return describe(raised.value)


def customer(**changes: Any) -> dict[str, Any]:
    return {**sample_invoice()["customer"], **changes}


@pytest.mark.parametrize(("changes", "expected"), [
    ({"currency": "ZZZ"}, "currency: unknown currency 'ZZZ'"),
    ({"amount_due": "0"}, "amount_due must be positive"),
    ({"amount_due": "-10.00"}, "amount_due must be positive"),
    ({"amount_due": 12.5}, "amount_due must be a decimal string"),
    ({"amount_due": "10.001"}, "amount_due 10.001 has more than 2 decimal places"),
    ({"amount_due": "10.5", "currency": "JPY"}, "more than 0 decimal places for JPY"),
    ({"due_on": "2026-09-30"}, "due_on 2026-09-30 is before issued_on 2026-10-01"),
    ({"customer": customer(email="ada.example.com")}, "customer.email: value is not a valid email"),
    ({"customer": customer(phone="4155550100")}, "customer.phone must be in E.164 form"),
    ({"customer": customer(phone="+1415555")}, "customer.phone is not a valid"),
    ({"customer": customer(timezone="Mars/Olympus")}, "customer.timezone: unknown time zone"),
    ({"customer": customer(email=None, phone=None)}, "customer needs an email or a phone"),
    ({"due_at": "2026-10-31T09:00:00"}, "due_at needs a UTC offset"),
    ({"payment_url": "javascript:alert(1)"}, "payment_url"),
    ({"payment_url": "http://billing.example.com/pay/1"}, "payment_url must be an https"),
    ({"payment_url": "https://billing.example.com/pay/1 Call +1-900-555-0100 now"},
     "payment_url must not contain whitespace"),
    ({"amount_due": "1" + "0" * 400}, "amount_due must be at most"),
    ({"amount_due": "1000000000000"}, "amount_due must be at most 999,999,999,999.999"),
    ({"amount_due": "1.25e3"}, "amount_due must be a plain decimal such as 1250.00"),
    ({"customer": customer(id="ada@example.com")},
     "customer.id must be the billing system's opaque id, not an email address"),
    ({"customer": customer(id="+14155550100")}, "customer.id must be the billing system's"),
    ({"customer": customer(id="+1-415-555-0100")}, "customer.id must be the billing"),
    ({"customer": customer(id="tel:+14155550100")}, "customer.id must be the billing"),
    ({"customer": customer(id="whatsapp:+14155550100")}, "customer.id must be the billing"),
    ({"customer": customer(id="ada%40example.com")}, "customer.id must be the billing"),
    ({"payment_url": "https://billing.example.com/pay/1?prefilled_email=ada@example.com"},
     "payment_url must not carry an email address or a phone number"),
    ({"payment_url": "https://billing.example.com/pay/1?email=ada%40example.com"},
     "payment_url must not carry an email address"),
    ({"payment_url": "https://billing.example.com/pay/1?phone=%2B14155550100"},
     "payment_url must not carry an email address or a phone number"),
    ({"customer": customer(name="x" * 201)}, "customer.name: String should have at most 200"),
    ({"customer": customer(name="Ada\x00 Lovelace")}, "customer.name: must not contain control characters"),
    ({"customer": customer(id="C-\x001")}, "customer.id: must not contain control characters"),
    ({"policy": "p" * 65}, "policy: String should have at most 64"),
])
def test_invalid_invoices_are_rejected_naming_the_field(changes: dict[str, Any], expected: str):
    assert expected in rejection(**changes)


@pytest.mark.parametrize("customer_id", ["C-1", "cus_N8aPq2xYz", "42", "ACME-2024-000123", "1.5.2",
                                         "10002345", "2024-000123"])
def test_opaque_customer_ids_are_kept(customer_id: str):
    invoice = Invoice.model_validate(sample_invoice(customer=customer(id=customer_id)))
    assert invoice.customer.id == customer_id


def test_valid_invoice_keeps_exact_money_and_anchors_at_nine_local():
    invoice = Invoice.model_validate(sample_invoice(amount_due="1250.5", currency="usd", due_at=None))
    assert invoice.amount_due == Decimal("1250.50") and str(invoice.amount_due) == "1250.50"
    assert invoice.currency == "USD"
    anchor = invoice.anchor()
    assert (anchor.hour, anchor.utcoffset()) == (9, timedelta(hours=-4))  # New York, EDT on Oct 31


def test_standard_policy_is_the_documented_schedule():
    standard = load_policies(ROOT / "policies" / "default.toml", ROOT / "templates")["standard"]
    assert [(s.name, s.after_due.days, s.channel) for s in standard.steps] == [
        ("friendly_reminder", 1, Channel.EMAIL), ("sms_reminder", 15, Channel.SMS),
        ("phone_call", 30, Channel.VOICE), ("agency_handoff", 60, Channel.AGENCY)]
    assert standard.steps[1].when == "day 15"


@pytest.mark.parametrize(("text", "expected"), [
    ("1d", timedelta(days=1)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)),
    ("45s", timedelta(seconds=45)), ("-3d", timedelta(days=-3)),
])
def test_offsets(text: str, expected: timedelta):
    assert parse_offset(text) == expected


@pytest.mark.parametrize(("body", "expected"), [
    ('[policies.p]\nversion = 1\nsteps = [{ name = "a", after_due = "2w", channel = "email" }]',
     "policy 'p', step 'a', field 'after_due': '2w' is not a duration"),
    ('[policies.p]\nversion = 1\nsteps = [{ name = "a", after_due = "1d", channel = "fax" }]',
     "policy 'p', step 'a', field 'channel'"),
    ('[policies.p]\nversion = 1\nsteps = [{ name = "a", after_due = "1d", channel = "email" },'
     '{ name = "b", after_due = "1d", channel = "sms" }]',
     "policy 'p', step 'b', field 'after_due': 1d must come after 'a'"),
    ('[policies.p]\nversion = 1\nsteps = [{ name = "a", after_due = "1d", channel = "agency" },'
     '{ name = "b", after_due = "2d", channel = "sms" }]',
     "policy 'p', step 'a', field 'channel': the agency handoff must be the last step"),
    ('[policies.p]\nversion = 1\nsteps = [{ name = "a", after_due = "1d", channel = "email", '
     'template = "missing_one" }]', "policy 'p', step 'a', field 'template': no template"),
    ('[policies.p]\nsteps = [{ name = "a", after_due = "1d", channel = "email" }]',
     "policy 'p', field 'version'"),
    ("[policies.p\n", "is not valid TOML"),
])
def test_bad_policy_files_are_refused_with_policy_step_and_field(tmp_path: Path, body: str,
                                                                 expected: str):
    path = tmp_path / "p.toml"
    path.write_text(body)
    with pytest.raises(PolicyError) as raised:
        load_policies(path, ROOT / "templates")
    assert expected in str(raised.value)


def test_account_applies_each_payment_id_once_and_keeps_overpayment_as_credit():
    account = Account(currency="EUR", amount_due=Decimal("100.00"))
    at = datetime.now(UTC)
    assert account.apply(PaymentReceived(payment_id="a", amount="60", currency="EUR", paid_at=at))[0] \
        is PaymentOutcome.ACCEPTED
    assert account.apply(PaymentReceived(payment_id="a", amount="60", currency="EUR", paid_at=at))[0] \
        is PaymentOutcome.DUPLICATE
    outcome, reason = account.apply(PaymentReceived(payment_id="b", amount="5", currency="USD",
                                                    paid_at=at))
    assert outcome is PaymentOutcome.REJECTED and "currency USD" in reason
    account.apply(PaymentReceived(payment_id="c", amount="45.50", currency="eur", paid_at=at))
    assert account.settled and account.balance_due == 0 and account.credit == Decimal("5.50")


def test_intake_reads_json_array_lines_and_csv_with_row_numbers():
    assert [r.row for r in read_records('[{"a": 1}, 2]', "f.json")] == [1, 2]
    assert read_records('[{"a": 1}, 2]', "f.json")[1].error == "expected a JSON object for an invoice"
    lines = read_records('{"a": 1}\n\n{"b": 2}\n{oops\n', "f.jsonl")
    assert [(r.row, r.error is None) for r in lines] == [(1, True), (3, True), (4, False)]
    csv_rows = read_records("invoice_id,customer.email,customer.phone\nI-1,a@b.co,\n", "f.csv")
    assert csv_rows[0].data == {"invoice_id": "I-1", "customer": {"email": "a@b.co"}}
    assert csv_rows[0].where == "f.csv row 2"


@pytest.fixture
def renderer() -> Renderer:
    return Renderer(templates_dir=ROOT / "templates", company="Example Billing",
                    email_from="billing@example.com",
                    unsubscribe_url="https://billing.example.com/unsubscribe/{invoice_id}",
                    voice_action_url="https://billing.example.com/voice/pay-link")


STANDARD = load_policies(ROOT / "policies" / "default.toml")["standard"]


def rendered(renderer: Renderer, channel: Channel, step: str = "sms_reminder", days_late: int = 15,
             purpose: Purpose = Purpose.REMINDER, **changes: Any) -> OutgoingMessage:
    """The message for ``channel``, with the customer's details as the database holds them."""
    invoice = Invoice.model_validate(sample_invoice("INV-R1", **changes))
    run = plan_run(invoice, STANDARD).invoice
    request = DeliveryRequest(workflow_id=run.workflow_id, invoice=run, step=step, template=step,
                              channels=(channel,), purpose=purpose, balance_due=Decimal("1250.00"),
                              as_of=invoice.anchor() + timedelta(days=days_late, hours=1))
    customer = CustomerRecord(**invoice.customer.model_dump())
    return renderer.render(request, channel, customer, Decimal("1000.00"))


def test_email_carries_amount_link_opt_out_and_unsubscribe_headers(renderer: Renderer):
    message = rendered(renderer, Channel.EMAIL)
    assert message.recipient == "ada@example.com"
    assert message.subject == "Second notice: invoice INV-R1 is 15 days overdue"
    assert "$1,000.00" in message.body and "https://billing.example.com/pay/INV-1001" in message.body
    assert "To stop these emails" in message.body and "To stop these emails" in (message.html or "")
    assert message.headers["List-Unsubscribe"].startswith(
        "<https://billing.example.com/unsubscribe/INV-R1>, <mailto:billing@example.com")
    assert message.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_amount_is_formatted_for_the_customers_locale(renderer: Renderer):
    german = rendered(renderer, Channel.SMS, currency="EUR",
                      customer={**sample_invoice()["customer"], "locale": "de_DE"})
    assert "1.000,00\xa0€" in german.body


def test_a_call_says_the_amount_as_its_english_voice_reads_it(renderer: Renderer):
    """The call's words are English: "1.000,00 €" read by an English voice is "one point zero"."""
    german = {**sample_invoice()["customer"], "locale": "de_DE"}
    call = rendered(renderer, Channel.VOICE, step="phone_call", days_late=30, currency="EUR", customer=german)
    assert "€1,000.00" in (call.twiml or "") and "1.000,00" not in (call.twiml or "")
    assert "1.000,00\xa0€" in rendered(renderer, Channel.EMAIL, currency="EUR", customer=german).body


def test_html_email_escapes_customer_data(renderer: Renderer):
    hostile = rendered(renderer, Channel.EMAIL, customer={**sample_invoice()["customer"],
                                                          "name": "<script>x</script>"})
    assert "<script>" not in (hostile.html or "")


def test_sms_has_pay_link_and_stop_line(renderer: Renderer):
    message = rendered(renderer, Channel.SMS)
    assert message.recipient == "+14155550100"
    assert message.body.endswith("Reply STOP to opt out.")
    assert "Pay: https://billing.example.com/pay/INV-1001" in message.body


def test_call_says_the_amount_and_offers_press_1_for_a_link(renderer: Renderer):
    message = rendered(renderer, Channel.VOICE, step="phone_call", days_late=30)
    assert "$1,000.00" in (message.twiml or "")
    assert '<Gather action="https://billing.example.com/voice/pay-link"' in (message.twiml or "")
    assert "press 1" in (message.twiml or "")


def test_tone_escalates_from_friendly_to_urgent(renderer: Renderer):
    friendly = rendered(renderer, Channel.EMAIL, step="friendly_reminder", days_late=1)
    urgent = rendered(renderer, Channel.EMAIL, step="phone_call", days_late=30)
    assert friendly.subject and friendly.subject.startswith("Friendly reminder")
    assert urgent.subject and urgent.subject.startswith("Urgent")
    assert "collections agency" in urgent.body and "collections" not in friendly.body


def test_agency_payload_describes_the_account(renderer: Renderer):
    handoff = rendered(renderer, Channel.AGENCY, step="agency_handoff", days_late=60,
                       purpose=Purpose.HANDOFF)
    payload = handoff.payload or {}
    assert payload["event"] == "account.referred"
    assert payload["balance_due"] == "1000.00" and payload["currency"] == "USD"
    assert payload["customer"]["email"] == "ada@example.com"


@pytest.mark.parametrize(("days", "phrase"), [(0, "is overdue"), (1, "is 1 day overdue"),
                                               (15, "is 15 days overdue")])
def test_overdue_wording(renderer: Renderer, days: int, phrase: str):
    assert phrase in rendered(renderer, Channel.SMS, days_late=days).body


def test_payment_signals_are_read_leniently_and_never_silently_dropped():
    paid_at = "2026-11-01T10:00:00+00:00"
    number, problem = read_payment({"payment_id": "p1", "amount": 12.5, "currency": "USD",
                                    "paid_at": paid_at})
    assert number is not None and number.amount == "12.5" and problem == ""
    for raw, reason in [
        ({"payment_id": "x" * 129, "amount": "1", "currency": "USD", "paid_at": paid_at},
         "payment_id: longer than 128"),
        ({"amount": "1", "currency": "USD", "paid_at": paid_at}, "payment_id: missing"),
        ({"payment_id": "p", "amount": True, "currency": "USD", "paid_at": paid_at}, "amount: not"),
        ({"payment_id": "p", "amount": "1", "currency": "USD", "paid_at": "yesterday"}, "paid_at"),
        ("a string", "not an object"),
    ]:
        payment, problem = read_payment(raw)
        assert payment is None and reason in problem


def test_paid_and_cancelled_are_final():
    assert advance(RunState.PAID, RunState.HANDED_OFF) is RunState.PAID
    assert advance(RunState.CANCELLED, RunState.ACTIVE) is RunState.CANCELLED
    assert advance(RunState.HANDED_OFF, RunState.PAID) is RunState.PAID
    assert advance(RunState.FAILED, RunState.ACTIVE) is RunState.ACTIVE
    assert advance(RunState.EXHAUSTED, RunState.HANDED_OFF) is RunState.EXHAUSTED


def test_audit_keys_cannot_collide_between_ids_containing_colons():
    assert audit_key("dunning-A:B", "state", 1) != audit_key("dunning-A", "B:state", 1)
    assert audit_key("w", "state", 1) == audit_key("w", "state", 1)


def test_the_schedule_is_fixed_in_the_run_input_when_it_starts():
    invoice = Invoice.model_validate(sample_invoice(due_at="2026-10-31T13:00:00+00:00"))
    run = plan_run(invoice, STANDARD)
    assert [s.at.isoformat() for s in run.schedule] == [
        "2026-11-01T13:00:00+00:00", "2026-11-15T13:00:00+00:00", "2026-11-30T13:00:00+00:00",
        "2026-12-30T13:00:00+00:00"]
    dumped = run.model_dump_json()
    for personal in ("Ada Lovelace", "ada@example.com", "+14155550100"):
        assert personal not in dumped


def test_production_policies_do_not_offer_the_demo_schedule():
    policies = load_policies(ROOT / "policies" / "default.toml")
    assert "demo" not in policies
    assert policies["standard"].agency_notice == timedelta(days=14)
    assert "demo" in load_policies(ROOT / "policies" / "demo.toml")


def test_payment_links_must_point_to_the_deployments_payment_hosts():
    from starter import InvoiceRejected, parse_invoice

    book = load_policy_book(ROOT / "policies" / "default.toml")
    hosts = frozenset({"pay.example.com"})
    with pytest.raises(InvoiceRejected, match=r"payment_url: host 'billing\.example\.com' is not one of"):
        parse_invoice(sample_invoice(), book, hosts)
    invoice, _, _ = parse_invoice(sample_invoice(payment_url="https://PAY.example.com/i/1"), book, hosts)
    assert invoice.payment_url == "https://PAY.example.com/i/1"
    parse_invoice(sample_invoice(), book)  # no hosts configured: any https host


def test_a_pay_link_carrying_the_customers_phone_without_its_plus_is_refused():
    from starter import InvoiceRejected, parse_invoice

    book = load_policy_book(ROOT / "policies" / "default.toml")
    phone = sample_invoice()["customer"]["phone"]
    url = f"https://billing.example.com/pay/1?msisdn={phone.removeprefix('+')}"
    with pytest.raises(InvoiceRejected, match=r"^payment_url must not carry the customer's phone number"):
        parse_invoice(sample_invoice(payment_url=url), book)


def test_a_refused_phone_number_is_not_quoted_back():
    """Refusals are logged and the API keeps its answers for replays: the number stays out."""
    reason = rejection(customer=customer(phone="+1415555010"))
    assert reason.startswith("customer.phone is not a valid E.164 number") and "1415555010" not in reason


@pytest.mark.parametrize("url", [
    "https://evil.com\\@billing.example.com/pay/1",  # a browser opens evil.com
    "https://evil.com\\billing.example.com/pay/1",
    "https://evil.com@billing.example.com/pay/1",
    "https://user:pw@billing.example.com/pay/1",
    "https://billing.example.com/pay/1\x00",
    "https://billing.example.com/pay/\u202e1",  # right-to-left override
])
def test_pay_links_browsers_read_differently_are_refused_whatever_the_hosts(url: str):
    """The allow-list checks the host ``urlsplit`` sees; a URL a browser reads otherwise (a
    backslash, userinfo, control characters) must not get past it to a customer."""
    from starter import InvoiceRejected, parse_invoice

    book = load_policy_book(ROOT / "policies" / "default.toml")
    with pytest.raises(InvoiceRejected, match=r"^payment_url must not contain"):
        parse_invoice(sample_invoice(payment_url=url), book, frozenset({"billing.example.com"}))


def _prepare(url: str) -> None:
    from models.database import prepare

    prepare(url)


def test_processes_starting_at_once_on_a_new_sqlite_file_all_start(tmp_path: Path):
    """A worker and the first command on a fresh database migrate it at the same moment: each
    waits its turn (the first creates the tables, the others find them)."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert at_once(_prepare, url, 4) == [0, 0, 0, 0]


def at_once(target: Any, url: str, count: int) -> list[int | None]:
    """Run ``target(url)`` in ``count`` processes started together; their exit codes."""
    import multiprocessing

    processes = [multiprocessing.Process(target=target, args=(url,)) for _ in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    return [p.exitcode for p in processes]


def _migrate(url: str) -> None:
    from models.database import migrate

    migrate(url)


def test_migrations_started_at_once_on_an_empty_postgresql_all_succeed():
    """Two servers' migrate jobs at the same moment: one migrates, the others wait (an advisory
    lock) and find the schema up to date, instead of failing on tables created meanwhile."""
    from tests.test_ledger import private_schema

    with private_schema("dunning_migrate") as url:
        assert at_once(_migrate, url, 3) == [0, 0, 0]


def test_a_database_url_as_hosting_providers_write_it_is_taken_and_a_missing_driver_named():
    from settings import Settings

    assert Settings(database_url="postgres://u:pw@db/dunning", _env_file=None).database() \
        == "postgresql+psycopg://u:pw@db/dunning"
    with pytest.raises(ValidationError) as raised:
        Settings(database_url="postgresql+psycopg2://u:hunter2@db/dunning", _env_file=None)
    assert "postgresql+psycopg2 is not supported" in str(raised.value)
    assert "hunter2" not in str(raised.value)  # the URL's password never in an error


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("due_on", "31/10/2026", "due_on: Input should be a valid date or datetime, invalid character in year "
                             "(give a date like 2026-12-01)"),
    ("due_at", "tomorrow", "(give a date-time like 2026-12-01T09:00:00+01:00)"),
])
def test_a_date_that_cannot_be_read_is_refused_saying_what_a_date_looks_like(field: str, value: str,
                                                                           expected: str):
    with pytest.raises(ValidationError) as refused:
        Invoice.model_validate(sample_invoice(**{field: value}))
    assert expected in describe(refused.value)


def test_a_payments_trail_line_writes_amounts_in_the_currencys_units():
    """"paid 100 USD; balance 0" read like two different kinds of number in one trail."""
    account = Account(currency="USD", amount_due=Decimal("100.00"))
    when = datetime.now(UTC)
    _, line = account.apply(PaymentReceived(payment_id="p", amount="100", currency="USD", paid_at=when))
    assert line == "paid 100.00 USD; balance 0.00"
    yen = Account(currency="JPY", amount_due=Decimal("1000"))
    _, line = yen.apply(PaymentReceived(payment_id="p", amount="1500", currency="JPY", paid_at=when))
    assert line == "paid 1500 JPY; balance 0; credit 500"


def test_a_database_error_says_whether_the_database_answered():
    """A lost connection 'cannot reach the database'; a deadlock or a busy SQLite is the
    database answering that it cannot do it now, and is worded so (it was 'cannot reach')."""
    import sqlite3

    import psycopg
    from psycopg import errors
    from sqlalchemy.exc import OperationalError

    from models.database import database_error

    lost = OperationalError("SELECT 1", {}, psycopg.OperationalError("connection failed: Connection refused"))
    deadlock = OperationalError("UPDATE runs", {}, errors.DeadlockDetected("deadlock detected"))
    busy = OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    assert str(database_error(lost)) == ("cannot reach the database: OperationalError: connection failed: "
                                         "Connection refused")
    assert str(database_error(deadlock)).startswith("the database could not do it now, try again: "
                                                    "DeadlockDetected: deadlock detected")
    assert str(database_error(busy)).startswith("the database could not do it now, try again:")
