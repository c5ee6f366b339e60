"""Which policy an invoice gets: the invoice's own choice, the ordered rules, the customer's own
policy, the default; excluded customers; `dunning policy explain`; the agency minimum."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from models.policy import PolicyError, load_policy_book
from models.run import RunState
from settings import ROOT
from starter import InvoiceRejected, parse_invoice
from tests.conftest import Harness, sample_invoice

BOOK = load_policy_book(ROOT / "policies" / "default.toml", ROOT / "templates")
DUNNING = str(Path(sys.executable).parent / "dunning")


def invoice_for(named: str | None = None, **customer: object) -> dict:
    invoice = sample_invoice(policy=named)
    invoice["customer"] = {**invoice["customer"], **customer}
    return invoice


def test_the_first_matching_rule_then_the_customer_then_the_default():
    _, policy, why = parse_invoice(invoice_for(type="consumer"), BOOK)
    assert policy.name == "consumer" and why == "rule 1 (when type = consumer)"
    _, policy, why = parse_invoice(invoice_for(policy="courteous"), BOOK)
    assert policy.name == "courteous" and why == "the customer's own policy"
    _, policy, why = parse_invoice(invoice_for(), BOOK)
    assert policy.name == "standard" and why == "the default policy"
    _, policy, why = parse_invoice(invoice_for("courteous", type="consumer"), BOOK)
    assert policy.name == "courteous" and why == "named by the invoice"
    with pytest.raises(InvoiceRejected, match=r"customer\.policy: unknown policy 'gentle'"):
        parse_invoice(invoice_for(policy="gentle"), BOOK)
    # a typo in the customer's own policy is refused even when this invoice names its policy:
    # the customer is stored with it, and their next invoice would be refused for it
    with pytest.raises(InvoiceRejected, match=r"customer\.policy: unknown policy 'gentel'"):
        parse_invoice(invoice_for("courteous", policy="gentel"), BOOK)


def test_rules_match_every_condition(tmp_path: Path):
    file = tmp_path / "p.toml"
    file.write_text((ROOT / "policies" / "default.toml").read_text().replace(
        'default = "standard"', 'default = "standard"\n\n[[rules]]\nwhen = { amount_below = "100.00", '
        'currency = "EUR" }\npolicy = "courteous"\n\n[[rules]]\nwhen = { country = "DE", region = "DE-BY" }\n'
        'policy = "courteous"\n'))
    book = load_policy_book(file)
    small = invoice_for()
    small.update(currency="EUR", amount_due="99.99")
    assert parse_invoice(small, book)[2].startswith("rule 1")
    big = invoice_for()
    big.update(currency="EUR", amount_due="100.00")
    assert parse_invoice(big, book)[2] == "the default policy"
    assert parse_invoice(invoice_for(country="DE", region="DE-BY"), book)[2].startswith("rule 2")
    assert parse_invoice(invoice_for(country="DE", region="DE-BE"), book)[2] == "the default policy"


MINIMAL = """
default = "standard"
{rule}

[policies.standard]
version = 1
steps = [ {{ name = "friendly_reminder", after_due = "1d", channel = "email" }} ]
"""


@pytest.mark.parametrize("rule, message", [
    ('[[rules]]\nwhen = { colour = "red" }\npolicy = "standard"', r"when\.colour': not a condition"),
    ('[[rules]]\nwhen = { type = "consumer" }\npolicy = "nope"', "unknown policy 'nope'"),
    ('[[rules]]\nwhen = { amount_below = "5" }\npolicy = "standard"', "needs a currency"),
])
def test_bad_rules_are_refused_naming_the_rule(tmp_path: Path, rule: str, message: str):
    file = tmp_path / "p.toml"
    file.write_text(MINIMAL.format(rule=rule))
    with pytest.raises(PolicyError, match=message):
        load_policy_book(file)
    file.write_text(MINIMAL.format(rule=""))
    assert load_policy_book(file).default == "standard"


def test_customer_fields_are_checked():
    with pytest.raises(InvoiceRejected, match="region DE-BY is not in country AT"):
        parse_invoice(invoice_for(country="AT", region="DE-BY"), BOOK)
    with pytest.raises(InvoiceRejected, match=r"customer\.type"):
        parse_invoice(invoice_for(type="robot"), BOOK)


async def test_an_excluded_customer_is_never_dunned(harness: Harness):
    invoice = invoice_for(exclude=True)
    result = await harness.dunning.start(invoice)
    assert result.excluded and not result.started and "excluded" in result.detail
    assert harness.ledger.run(invoice["invoice_id"]) is None  # nothing runs


async def test_no_agency_below_the_minimum_balance(harness: Harness):
    invoice = invoice_for(type="consumer")
    invoice["amount_due"] = "40.00"
    handle = await harness.start(invoice)
    final = await harness.finish(handle)
    assert final.state is RunState.EXHAUSTED
    assert not [s for s in harness.sent(invoice["invoice_id"]) if s[1] == "agency"]
    states = [e.detail for e in harness.ledger.trail(invoice["invoice_id"]) if e.status == "exhausted"]
    assert states and "below the agency minimum 50.00 USD" in states[0]


def explain(tmp_path: Path, invoice: dict) -> subprocess.CompletedProcess[str]:
    """`dunning policy explain` of one invoice, which must succeed."""
    file = tmp_path / "one.json"
    file.write_text(json.dumps(invoice))
    shown = subprocess.run([DUNNING, "policy", "explain", str(file)], capture_output=True, text=True,
                           timeout=60, env={"PATH": "", "HOME": str(tmp_path),
                                            "DUNNING_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    assert shown.returncode == 0, shown.stderr
    return shown


def test_policy_explain_shows_the_choice_and_the_dates(tmp_path: Path):
    if not Path(DUNNING).exists():
        pytest.skip("the dunning console script is not installed (pip install -e .)")
    invoice = invoice_for(type="consumer", timezone="Europe/Berlin")
    invoice.pop("due_at")
    invoice["due_on"] = "2026-10-31"
    shown = explain(tmp_path, invoice)
    assert "policy consumer v1 (rule 1 (when type = consumer))" in shown.stdout
    assert "2026-11-03 09:00 CET" in shown.stdout  # 3 days after the due date, 09:00 in Berlin
    assert "2027-01-29 09:00 CET" in shown.stdout  # the agency at 90 days
    assert "no agency below 50.00 USD" in shown.stdout
    assert "caps: voice 7/7d, sms 3/7d, email 3/7d" in shown.stdout


def test_policy_explain_shows_when_holidays_move_a_step(tmp_path: Path):
    if not Path(DUNNING).exists():
        pytest.skip("the dunning console script is not installed (pip install -e .)")
    invoice = invoice_for(type="business", country="DE", timezone="Europe/Berlin")
    invoice.pop("due_at")
    invoice |= {"due_on": "2026-11-25", "policy": "late_payment", "currency": "EUR"}
    shown = explain(tmp_path, invoice)
    # day 30 is Christmas Day; 26 December is a holiday too and the 27th a Sunday
    line = next(row for row in shown.stdout.splitlines() if row.strip().startswith("final_notice"))
    assert "2026-12-25 09:00 CET" in line and "2026-12-28 08:" in line
    assert "statutory interest (de): 10.27% a year" in shown.stdout
    assert "a fee of 5.00 EUR for each step sent" in shown.stdout


def test_a_customer_update_keeps_what_it_does_not_change(tmp_path: Path):
    if not Path(DUNNING).exists():
        pytest.skip("the dunning console script is not installed (pip install -e .)")
    from activities.ledger import Ledger
    from models.database import prepare
    from starter import store_customer

    url = f"sqlite:///{tmp_path / 'c.db'}"
    ledger = Ledger(prepare(url))
    store_customer(ledger, {"id": "C-9", "name": "Grace", "phone": "+14155550123", "type": "consumer",
                            "country": "US", "region": "US-MA", "policy": "courteous"})
    env = {"PATH": "", "HOME": str(tmp_path), "DUNNING_DATABASE_URL": url}
    changed = subprocess.run([DUNNING, "customer", "update", "C-9", "--email", "g@example.com",
                              "--exclude"], capture_output=True, text=True, timeout=60, env=env)
    assert changed.returncode == 0, changed.stderr
    row = ledger.customer("C-9")
    assert row is not None and row.email == "g@example.com" and row.exclude
    assert (row.type, row.country, row.region, row.policy) == ("consumer", "US", "US-MA", "courteous")
    wrong = subprocess.run([DUNNING, "customer", "update", "C-9", "--region", "DE-BY"],
                           capture_output=True, text=True, timeout=60, env=env)
    assert wrong.returncode == 2 and "region DE-BY is not in country US" in wrong.stderr


def test_a_customer_update_refuses_an_unknown_customer_and_an_unknown_policy(tmp_path: Path):
    """An update is for a customer the engine knows: a mistyped id is named, never created; a
    mistyped policy is named too, and nothing changes."""
    if not Path(DUNNING).exists():
        pytest.skip("the dunning console script is not installed (pip install -e .)")
    from activities.ledger import Ledger
    from models.database import prepare
    from starter import store_customer

    url = f"sqlite:///{tmp_path / 'c.db'}"
    ledger = Ledger(prepare(url))
    store_customer(ledger, {"id": "C-9", "name": "Grace", "phone": "+14155550123", "policy": "courteous"})
    env = {"PATH": "", "HOME": str(tmp_path), "DUNNING_DATABASE_URL": url}

    def update(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DUNNING, "customer", "update", *args], capture_output=True, text=True,
                              timeout=60, env=env)

    typo = update("C-TYPO", "--phone", "+14155550199")
    assert typo.returncode == 2 and "no customer C-TYPO exists" in typo.stderr
    created = update("C-TYPO2", "--name", "Bob", "--email", "bob@example.com")
    assert created.returncode == 2 and "no customer C-TYPO2 exists" in created.stderr
    assert ledger.customer("C-TYPO2") is None
    policy = update("C-9", "--policy", "nope")
    assert policy.returncode == 2 and "policy: unknown policy 'nope'" in policy.stderr
    assert update("C-9", "--policy", "standard").returncode == 0
    row = ledger.customer("C-9")
    assert row is not None and row.policy == "standard"


async def test_a_customer_hold_stops_every_invoice_and_release_resumes_them(harness: Harness):
    from decimal import Decimal

    from starter import ActionRefused

    customer = f"C-hold-{sample_invoice()['invoice_id']}"
    first, second = invoice_for(id=customer), invoice_for(id=customer)
    handles = [await harness.start(first), await harness.start(second)]
    for handle in handles:
        await harness.advance(handle, timedelta(days=2))
    kinds = await harness.dunning.hold_customer(customer, "bankruptcy", "chapter 7 filed", actor="ops")
    assert kinds == ["bankruptcy"]
    for handle in handles:
        await harness.advance(handle, timedelta(days=70))  # past every step and the handoff
    for invoice in (first, second):
        assert harness.sent(invoice["invoice_id"]) == [("friendly_reminder", "email")]
        status = await harness.dunning.status(invoice["invoice_id"])
        assert status.customer_holds == ["bankruptcy"] and status.state is RunState.ACTIVE
    paid = await harness.dunning.pay(first["invoice_id"], "100.00", payment_id="during-hold")
    assert paid.status is not None and paid.status.balance_due == Decimal("1150.00")  # still counts
    # a new invoice of a held customer starts held
    third = invoice_for(id=customer)
    third_handle = await harness.start(third)
    await harness.advance(third_handle, timedelta(days=2))
    assert harness.sent(third["invoice_id"]) == []
    with pytest.raises(ActionRefused, match="kind: one of"):
        await harness.dunning.hold_customer(customer, "holiday", "x")
    assert await harness.dunning.hold_customer(customer, "bankruptcy", "", release=True) == []
    for handle in handles:
        await harness.advance(handle, timedelta(hours=1))
    # the usual rule: overtaken reminders are skipped; the most recent one goes out now
    await until_sent(harness, first["invoice_id"], "phone_call")
    await until_sent(harness, second["invoice_id"], "phone_call")
    assert not [s for s in harness.sent(first["invoice_id"]) if s[0] == "sms_reminder"]
    trail = [(e.kind, e.status) for e in harness.ledger.trail(first["invoice_id"])]
    assert ("action", "hold") in trail and ("action", "release") in trail


async def until_sent(harness: Harness, invoice_id: str, step: str) -> None:
    from tests.test_escalation import until

    await until(lambda: any(s[0] == step for s in harness.sent(invoice_id)))


async def test_a_run_the_hold_signal_missed_learns_it_from_the_database(harness: Harness):
    """Fail closed: the hold is in the database but the run never heard (the signal failed): its
    next send is stopped and the run holds itself, without spinning."""
    customer = f"C-db-{sample_invoice()['invoice_id']}"
    invoice = invoice_for(id=customer)
    handle = await harness.start(invoice)
    harness.ledger.set_holds(customer, lambda kinds: kinds | {"deceased"})  # no signal sent
    await harness.advance(handle, timedelta(days=20))
    assert harness.sent(invoice["invoice_id"]) == []
    status = await harness.dunning.status(invoice["invoice_id"])
    assert status.customer_holds == ["deceased"]
    assert len([e async for e in handle.fetch_history_events()]) < 60
    await harness.dunning.hold_customer(customer, "deceased", "", release=True)
    await harness.advance(handle, timedelta(hours=1))
    await until_sent(harness, invoice["invoice_id"], "sms_reminder")


async def test_a_handoff_stopped_by_a_hold_happens_after_the_release(harness: Harness):
    from tests.test_runs import agency_messages

    customer = f"C-ho-{sample_invoice()['invoice_id']}"
    invoice = invoice_for(id=customer)
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=59))
    harness.ledger.set_holds(customer, lambda kinds: kinds | {"dispute"})  # the database only
    await harness.advance(handle, timedelta(days=3))
    assert not agency_messages(harness, invoice["invoice_id"])
    await harness.dunning.hold_customer(customer, "dispute", "", release=True)
    await harness.advance(handle, timedelta(hours=1))
    await until_sent(harness, invoice["invoice_id"], "agency_handoff")
    assert (await harness.dunning.status(invoice["invoice_id"])).state is RunState.HANDED_OFF


async def test_an_exclusion_set_by_an_operator_survives_the_next_import(harness: Harness):
    from starter import store_customer

    customer = f"C-ex-{sample_invoice()['invoice_id']}"
    first = invoice_for(id=customer)
    await harness.start(first)
    stored = harness.ledger.customer(customer)
    assert stored is not None
    store_customer(harness.ledger, {"id": customer, "name": stored.name, "email": stored.email,
                                    "exclude": True})
    again = await harness.dunning.start(invoice_for(id=customer))  # the import does not say exclude
    assert again.excluded and not again.started
    assert harness.ledger.holds_of(customer) == ["excluded"]


async def test_bankruptcy_takes_an_account_back_from_the_agency(harness: Harness):
    """A bankruptcy (or death) stops collection even where the agency holds the account already:
    it is recalled; payments are still reported."""
    from tests.test_runs import agency_messages

    customer = f"C-bk-{sample_invoice()['invoice_id']}"
    invoice, ended = invoice_for(id=customer), invoice_for(id=customer)
    ended_handle = await harness.start(ended)  # handed off, and its run over after listening
    await harness.advance(ended_handle, timedelta(days=61))
    assert (await harness.finish(ended_handle)).state is RunState.HANDED_OFF
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=61))
    assert [m["event"] for m in agency_messages(harness, invoice["invoice_id"])] == ["account.referred"]
    await harness.dunning.hold_customer(customer, "bankruptcy", "chapter 7 filed", actor="ops")
    await harness.advance(handle, timedelta(minutes=1))
    events = agency_messages(harness, invoice["invoice_id"])
    assert [m["event"] for m in events] == ["account.referred", "account.recalled"]
    assert "bankruptcy" in events[-1]["reason"]
    for _ in range(40):  # the ended run's recall goes out in a short run of its own
        if len(agency_messages(harness, ended["invoice_id"])) == 2:
            break
        await asyncio.sleep(0.25)
    assert [m["event"] for m in agency_messages(harness, ended["invoice_id"])] == [
        "account.referred", "account.recalled"]
    await harness.dunning.hold_customer(customer, "dispute", "says it was never delivered", actor="ops")
    await harness.advance(handle, timedelta(minutes=1))
    assert len(agency_messages(harness, invoice["invoice_id"])) == 2  # a dispute does not recall


async def test_cease_communication_sends_one_confirmation_and_nothing_after(harness: Harness):
    """A customer who asks us to stop gets one message saying so (not one per invoice), and no
    reminder after it on any invoice."""
    from activities.outbox import messages_for

    customer = f"C-cease-{sample_invoice()['invoice_id']}"
    first, second = invoice_for(id=customer), invoice_for(id=customer)
    handles = [await harness.start(first), await harness.start(second)]
    for handle in handles:
        await harness.advance(handle, timedelta(days=2))
    await harness.dunning.hold_customer(customer, "cease-communication", "asked us to stop", actor="ops")
    for handle in handles:
        await harness.advance(handle, timedelta(days=40))
    sent = [m for i in (first, second) for m in messages_for(harness.ledger.engine, i["invoice_id"])]
    confirmations = [m for m in sent if m.subject == "We will stop contacting you"]
    assert len(confirmations) == 1 and "last message" in confirmations[0].body
    assert sorted(m.reference.split("/")[1] for m in sent if m not in confirmations) == [
        "friendly_reminder", "friendly_reminder"]  # nothing after the hold but the confirmation
    await harness.dunning.hold_customer(customer, "cease-communication", "asked again", actor="ops")
    await harness.advance(handles[0], timedelta(days=1))
    again = [m for i in (first, second) for m in messages_for(harness.ledger.engine, i["invoice_id"])]
    assert len(again) == len(sent)  # already on hold: no second confirmation
