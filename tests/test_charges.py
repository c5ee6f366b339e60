"""Fees and statutory interest, to the cent: figures worked out by hand for German, UK and EU
business debts after a partial payment, the rules by country and customer type, the rates file,
and a whole run whose status shows principal, fees, interest and the total."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from activities.outbox import messages_for
from models.charges import Fees, FeesError, FeeTerms, account_charges, load_rates, resolve_rule, terms_for
from models.policy import Channel
from models.run import RunState
from tests.conftest import ROOT, Harness, sample_invoice
from tests.test_escalation import until
from tests.test_runs import Outage
from workflows.dunning import InvoiceDunningWorkflow

RATES = load_rates(ROOT / "policies" / "rates.toml")


def noon(day: date) -> datetime:
    return datetime.combine(day, time(12), tzinfo=UTC)


def terms(rule: str, country: str, currency: str, amount: str, due_on: date, kind: str = "business",
          step_fee: str = "0") -> FeeTerms:
    return terms_for(Fees(step_fee=step_fee, statutory=rule), customer_type=kind, country=country,
                     currency=currency, amount=Decimal(amount), due_on=due_on, rates=RATES)


def test_german_business_debt_after_a_partial_payment():
    # EUR 1,000.00 due 15 Jan 2026; base rate 1.27 % (from 1 Jan 2026) + 9 points = 10.27 %.
    # Costs: EUR 40 compensation (16 Jan) and a 5.00 step fee (20 Jan).
    # 1 Mar, EUR 500 paid: interest for 45 days on 1,000 = 1000 x 10.27 % x 45 / 365 = 12.6616 -> 12.66.
    #   costs 45.00 first (455.00 left), then interest 12.66 (442.34 left), then principal: 557.66.
    # 1 Apr: interest for 31 days on 557.66 = 557.66 x 10.27 % x 31 / 365 = 4.8642 -> 4.86.
    t = terms("de", "DE", "EUR", "1000.00", date(2026, 1, 15), step_fee="5.00")
    assert (t.rule, t.rate, t.flat) == ("de", Decimal("10.27"), Decimal(40))
    now = account_charges(t, Decimal("1000.00"), [(noon(date(2026, 3, 1)), Decimal("500.00"))],
                          [(noon(date(2026, 1, 20)), Decimal("5.00"))], noon(date(2026, 4, 1)))
    assert (now.principal, now.fees, now.interest) == (Decimal("557.66"), Decimal("0.00"), Decimal("4.86"))
    assert now.total_due == Decimal("562.52")
    assert now.fees_charged == Decimal("45.00") and now.interest_accrued == Decimal("17.52")


def test_uk_business_debt_after_a_partial_payment():
    # GBP 5,000.00 due 10 Feb 2026; base rate 3.75 % (in force 31 Dec 2025) + 8 = 11.75 %; fixed
    # sum GBP 70 (a debt of 1,000 to 9,999.99).
    # 12 Mar, GBP 2,000 paid: 30 days on 5,000 = 5000 x 11.75 % x 30 / 365 = 48.2877 -> 48.29.
    #   costs 70.00, interest 48.29, principal 1,881.71: 3,118.29 left.
    # 11 Apr: 30 days on 3,118.29 = 10,991.97 / 365 = 30.1150 (30.11499...) -> 30.11; total 3,148.40.
    t = terms("auto", "GB", "GBP", "5000.00", date(2026, 2, 10))
    assert (t.rule, t.rate, t.flat) == ("uk", Decimal("11.75"), Decimal(70))
    now = account_charges(t, Decimal("5000.00"), [(noon(date(2026, 3, 12)), Decimal("2000.00"))], [],
                          noon(date(2026, 4, 11)))
    assert (now.principal, now.interest, now.total_due) == (
        Decimal("3118.29"), Decimal("30.11"), Decimal("3148.40"))
    assert terms("uk", "GB", "GBP", "999.99", date(2026, 2, 10)).flat == 40
    assert terms("uk", "GB", "GBP", "10000.00", date(2026, 2, 10)).flat == 100


def test_eu_business_debt_after_a_partial_payment():
    # EUR 2,400.00 due 31 Mar 2026 from a French business: ECB rate 2.15 % + 8 = 10.15 %, EUR 40.
    # 30 Apr, EUR 100 paid (less than costs + interest): 30 days on 2,400 = 20.0219 -> 20.02;
    #   costs 40.00 paid, interest 20.02 paid, principal 39.98 paid: 2,360.02 left.
    # 30 May: 30 days on 2,360.02 = 19.6884 -> 19.69; total 2,379.71.
    t = terms("auto", "FR", "EUR", "2400.00", date(2026, 3, 31))
    assert (t.rule, t.rate, t.flat) == ("eu", Decimal("10.15"), Decimal(40))
    now = account_charges(t, Decimal("2400.00"), [(noon(date(2026, 4, 30)), Decimal("100.00"))], [],
                          noon(date(2026, 5, 30)))
    assert (now.principal, now.interest, now.total_due) == (
        Decimal("2360.02"), Decimal("19.69"), Decimal("2379.71"))


def test_an_overpayment_is_credit_beyond_fees_and_interest():
    t = terms("de", "DE", "EUR", "1000.00", date(2026, 1, 15))
    now = account_charges(t, Decimal("1000.00"), [(noon(date(2026, 3, 1)), Decimal("1100.00"))], [],
                          noon(date(2026, 3, 1)))
    # owed 1,000 + 40 compensation + 12.66 interest = 1,052.66; 47.34 paid beyond it
    assert (now.total_due, now.credit) == (Decimal("0.00"), Decimal("47.34"))


def test_credit_pays_later_costs_and_a_refund_is_owed_again_as_what_it_paid():
    """What a customer paid beyond the total pays a fee charged after it. A payment taken back is
    owed again as the parts paid last: all of it went back to the principal once, so the
    principal exceeded the invoice and bore interest on the fees. A debt paid on its due date owes
    no fixed compensation (it was counted, so a late-reported transfer was chased for 40.00). A
    run started before these rules (no ``settles_in_order`` in its input) keeps the old ones, so
    its history replays as it ran."""
    t = terms("de", "DE", "EUR", "1000.00", date(2026, 1, 15), step_fee="5.00")
    over = (noon(date(2026, 3, 1)), Decimal("1100.00"))  # 1,052.66 owed on 1 Mar: 47.34 beyond it
    fee = (noon(date(2026, 3, 2)), Decimal("5.00"))
    now = account_charges(t, Decimal("1000.00"), [over], [fee], noon(date(2026, 3, 3)))
    assert (now.total_due, now.credit, now.fees_charged) == (
        Decimal("0.00"), Decimal("42.34"), Decimal("45.00"))
    # exactly what was owed, paid and taken back the next day: 1,000 principal, 40 compensation and
    # 12.66 interest owed again, and a day's interest on the principal (1000 x 10.27 % / 365)
    exact = (noon(date(2026, 3, 1)), Decimal("1052.66"))
    back = (noon(date(2026, 3, 2)), Decimal("-1052.66"))
    now = account_charges(t, Decimal("1000.00"), [exact, back], [], noon(date(2026, 3, 3)))
    assert (now.principal, now.fees, now.interest) == (Decimal("1000.00"), Decimal("40.00"), Decimal("12.94"))
    assert now.total_due == Decimal("1052.94") and now.credit == 0
    # the overpayment taken back: the credit goes first, then the parts it paid
    now = account_charges(t, Decimal("1000.00"), [over, (back[0], Decimal("-1100.00"))], [],
                          noon(date(2026, 3, 2)))
    assert (now.principal, now.fees, now.interest, now.credit) == (
        Decimal("1000.00"), Decimal("40.00"), Decimal("12.66"), Decimal("0.00"))
    # several payments: a fee paid on its own and charged back is owed again as a fee
    fee_paid = [(noon(date(2026, 3, 1)), Decimal("1000.00")), (noon(date(2026, 3, 3)), Decimal("5.00")),
                (noon(date(2026, 3, 4)), Decimal("-5.00"))]
    now = account_charges(t, Decimal("1000.00"), fee_paid, [fee], noon(date(2026, 3, 4)))
    assert (now.principal, now.fees) == (Decimal("52.66"), Decimal("5.00"))
    # paid in full on the due date: never in default, so no fixed compensation either
    on_time = [(noon(date(2026, 1, 15)), Decimal("1000.00"))]
    assert account_charges(t, Decimal("1000.00"), on_time, [], noon(date(2026, 3, 1))).total_due == 0
    # nothing beyond the invoice before it is late: no compensation, no interest
    before = account_charges(t, Decimal("1000.00"), [], [], noon(date(2026, 1, 10)))
    assert (before.total_due, before.fees, before.interest) == (Decimal("1000.00"), 0, 0)
    old = FeeTerms.model_validate(t.model_dump(exclude={"settles_in_order"}))
    assert account_charges(old, Decimal("1000.00"), on_time, [], noon(date(2026, 3, 1))).total_due == 40
    assert account_charges(old, Decimal("1000.00"), [], [], noon(date(2026, 1, 10))).fees == 40
    assert account_charges(old, Decimal("1000.00"), [over], [fee],
                           noon(date(2026, 3, 3))).total_due == Decimal("5.00")
    assert account_charges(old, Decimal("1000.00"), [exact, back], [],
                           noon(date(2026, 3, 2))).principal == Decimal("1052.66")


def test_eu_and_german_interest_follows_each_half_years_rate_and_uk_interest_stays_fixed():
    # EUR 1,000.00 due 31 May 2025 from a German business: June at 2.27 + 9 = 11.27 %, July at
    # 1.27 + 9 = 10.27 %: 1000 x 11.27 % x 30 / 365 = 9.2630 plus 1000 x 10.27 % x 31 / 365 =
    # 8.7225, 17.9855 in all -> 17.99 on 31 July.
    t = terms("de", "DE", "EUR", "1000.00", date(2025, 5, 31))
    now = account_charges(t, Decimal("1000.00"), [], [], noon(date(2025, 7, 31)))
    assert now.interest == Decimal("17.99") and now.interest_rate == Decimal("10.27")
    # the UK rate is the base rate before the debt fell due, for its whole life: 4.75 + 8
    uk = terms("uk", "GB", "GBP", "1000.00", date(2025, 5, 31))
    later = account_charges(uk, Decimal("1000.00"), [], [], noon(date(2025, 7, 31)))
    assert later.interest_rate == Decimal("12.75") and uk.later_rates == ()
    assert later.interest == (Decimal("1000") * Decimal("12.75") / 100 * 61 / 365).quantize(Decimal("0.01"))


def test_payments_can_go_to_the_principal_first():
    t = terms("de", "DE", "EUR", "1000.00", date(2026, 1, 15)).model_copy(
        update={"allocation": ("principal", "interest", "costs")})
    now = account_charges(t, Decimal("1000.00"), [(noon(date(2026, 3, 1)), Decimal("500.00"))], [],
                          noon(date(2026, 3, 1)))
    # the 500 went to the principal; costs 40.00 and interest 12.66 are still owed
    assert (now.principal, now.fees, now.interest) == (Decimal("500.00"), Decimal("40.00"), Decimal("12.66"))


@pytest.mark.parametrize(("statutory", "kind", "country", "rule"), [
    ("auto", "business", "DE", "de"), ("auto", "consumer", "DE", "de-consumer"),
    ("auto", "business", "GB", "uk"), ("auto", "consumer", "GB", "none"),
    ("auto", "business", "IT", "eu"), ("auto", "business", "US", "none"), ("auto", "business", None, "none"),
    ("eu", "consumer", "FR", "none"), ("de", "consumer", "AT", "de-consumer"),
    ("none", "business", "DE", "none"),
])
def test_which_rule_a_debt_gets(statutory, kind, country, rule):
    assert resolve_rule(statutory, kind, country) == rule


def test_a_german_consumer_owes_base_plus_five_and_no_compensation():
    t = terms("auto", "DE", "EUR", "300.00", date(2026, 2, 1), kind="consumer")
    assert (t.rate, t.flat) == (Decimal("6.27"), Decimal(0))


def test_a_run_fixes_the_rate_in_force_when_interest_starts_and_says_when_the_file_is_behind():
    t = terms("de", "DE", "EUR", "100.00", date(2025, 6, 30))
    assert (t.reference_from, t.reference_rate, t.note) == (date(2025, 7, 1), Decimal("1.27"), "")
    late = terms("de", "DE", "EUR", "100.00", date(2027, 3, 1))
    assert "no de rate for the half-year of 2027-03-02" in late.note
    with pytest.raises(FeesError, match="no de reference rate in force on 2020-01-02"):
        terms("de", "DE", "EUR", "100.00", date(2020, 1, 1))


def test_a_broken_rates_file_names_the_entry(tmp_path: Path):
    path = tmp_path / "rates.toml"
    path.write_text('[eu]\nrates = [{ from = 2026-01-01, rate = "two" }]\n')
    with pytest.raises(FeesError, match=r"\[eu\] entry 1, field 'rate'"):
        load_rates(path)


# -- a whole run -----------------------------------------------------------------------------------

def by_hand(principal: Decimal, rate: Decimal, days: int) -> Decimal:
    return (principal * rate / 100 * days / 365).quantize(Decimal("0.01"), ROUND_HALF_UP)


def business_invoice(country: str, currency: str, amount: str, due: datetime) -> dict:
    """A business customer's invoice on ``late_payment`` (a 5.00 fee a step, statutory interest)
    falling due at ``due``."""
    invoice = sample_invoice(policy="late_payment", currency=currency, amount_due=amount,
                             due_on=due.date().isoformat(), due_at=due.isoformat(), issued_on="2026-01-01")
    invoice["customer"] |= {"country": country, "type": "business", "timezone": "Europe/Berlin"}
    return invoice


@pytest.mark.parametrize(("country", "currency", "rate", "flat"), [
    ("DE", "EUR", Decimal("10.27"), Decimal("40")),  # base rate 1.27 % + 9 points, EUR 40
    ("GB", "GBP", Decimal("11.75"), Decimal("70")),  # base rate 3.75 % + 8, GBP 70 for 1,000.00
    ("FR", "EUR", Decimal("10.15"), Decimal("40")),  # ECB rate 2.15 % + 8 points, EUR 40
])
async def test_a_business_run_charges_fee_compensation_and_interest(harness: Harness, capsys, country,
                                                                    currency, rate, flat):
    start = datetime.now(UTC)
    due_on = start.date()
    invoice = business_invoice(country, currency, "1000.00", start)
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=10))  # the first reminder went out on day 1
    paid_at = start + timedelta(days=10)
    outcome = await harness.dunning.pay(invoice["invoice_id"], "500.00", payment_id="pay-part",
                                        paid_at=paid_at)
    assert outcome.outcome == "accepted"
    await harness.advance(handle, timedelta(days=10))
    status = await handle.query(InvoiceDunningWorkflow.status)
    assert status.interest_rate == rate
    # by hand: costs (compensation + a 5.00 fee for day 1); interest to the payment; then the
    # payment goes to costs, interest, principal
    first = by_hand(Decimal("1000.00"), rate, (paid_at.date() - due_on).days)
    principal = Decimal("1000.00") - (Decimal("500.00") - flat - Decimal("5.00") - first)
    later = by_hand(principal, rate, (status.as_of.date() - paid_at.date()).days)
    # the SMS reminder of day 15 came after the payment: its fee is still owed (fees bear no interest)
    assert (status.principal, status.fees, status.interest) == (principal, Decimal("5.00"), later)
    assert status.total_due == status.balance_due == principal + Decimal("5.00") + later
    assert ("payment", "fee", "friendly_reminder", None) in harness.trail(invoice["invoice_id"])
    json = status.model_dump(mode="json")
    assert {"fees", "interest", "interest_rate", "total_due"} <= set(json)
    from cli import show_status

    show_status(status, False)
    shown = " ".join(capsys.readouterr().out.split())
    assert f"principal {principal} {currency}" in shown and f"fees 5.00 {currency}" in shown
    assert f"interest {later} {currency} ({rate}% a year)" in shown
    assert f"total due {status.total_due} {currency}" in shown



async def test_the_payments_trail_entry_states_the_credit_beyond_fees(harness: Harness):
    """An overpayment's audit entry (and the answer to ``pay``) named the credit beyond the
    invoice alone, 50.00, when 5.00 of it had paid a fee: the trail is what a refund is made from."""
    invoice = sample_invoice(policy="late_payment")
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))
    await until(lambda: ("friendly_reminder", "email") in harness.sent(invoice_id))
    while not (status := await harness.dunning.status(invoice_id)).fees:
        await asyncio.sleep(0.1)
    paid = await harness.dunning.pay(invoice_id, "1300.00", payment_id="over", paid_at=status.as_of)
    assert paid.status is not None and paid.status.credit == Decimal("45.00")
    assert "total due with fees and interest 0.00; credit 45.00" in paid.detail, paid.detail
    await harness.finish(handle)
    [entry] = [e.detail for e in harness.ledger.trail(invoice_id) if e.status == "accepted"]
    assert "credit 45.00" in entry and "credit 50" not in entry, entry


async def test_a_status_read_between_steps_shows_the_interest_up_to_then(harness: Harness):
    """The run answers as of its last step and sleeps for weeks between steps: the status a
    reader gets (``DunningClient.status``) is worked out to the moment it is read, and matches
    what the run itself reports when it next wakes."""
    start = datetime.now(UTC)
    invoice = business_invoice("DE", "EUR", "1000.00", start)
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))  # the first reminder went out on day 1
    await until(lambda: ("friendly_reminder", "email") in harness.sent(invoice["invoice_id"]))
    then = await handle.query(InvoiceDunningWorkflow.status)
    assert then.as_of is not None and then.interest_rate is not None
    assert then.at(then.as_of - timedelta(days=1)) == then
    ten_days_on = then.at(then.as_of + timedelta(days=10))
    days = (ten_days_on.as_of.date() - start.date()).days  # type: ignore[union-attr]
    assert ten_days_on.interest == by_hand(Decimal("1000.00"), then.interest_rate, days) > then.interest
    assert ten_days_on.total_due == ten_days_on.balance_due == (
        Decimal("1000.00") + then.fees + ten_days_on.interest)
    await harness.advance(handle, timedelta(days=14))  # the SMS of day 15, and its fee
    await until(lambda: ("sms_reminder", "sms") in harness.sent(invoice["invoice_id"]))
    woke = await handle.query(InvoiceDunningWorkflow.status)
    await harness.dunning.cancel(invoice["invoice_id"], "test over")
    read = then.at(woke.as_of)  # type: ignore[arg-type]
    assert (read.interest, read.principal) == (woke.interest, woke.principal)
    assert read.total_due + Decimal("5.00") == woke.total_due


async def test_paying_the_total_a_reminder_quotes_settles_the_account(harness: Harness):
    """A step's fee is charged when its message goes out, and that message quotes it. It once
    quoted the total without it, so a customer who paid exactly what the reminder said still owed
    the fee and was chased for it, up to the agency."""
    invoice = sample_invoice(policy="late_payment")
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=2))
    await until(lambda: ("friendly_reminder", "email") in harness.sent(invoice_id))
    [email] = [m.body for m in messages_for(harness.ledger.engine, invoice_id) if m.channel == "email"]
    assert "$1,255.00" in email and "fees $5.00" in email, email
    assert Decimal(harness.ledger.run(invoice_id).balance_due) == Decimal("1255.00")
    quoted_at = (await harness.dunning.status(invoice_id)).as_of  # the run's clock (time is skipped)
    outcome = await harness.dunning.pay(invoice_id, "1255.00", payment_id="as-quoted", paid_at=quoted_at)
    assert outcome.outcome == "accepted"
    final = await harness.finish(handle)
    assert final.state is RunState.PAID and final.balance_due == 0 and final.credit == 0


async def test_a_part_payment_while_the_reminder_retries_leaves_its_fee_in_the_quote(harness: Harness):
    """The customer pays 250.00 while the fee's reminder is retrying through a provider outage:
    the email that finally goes out quotes what is owed once it is sent, 1,005.00 (it quoted
    1,000.00, with an itemisation of the older total that did not add up, and then charged 5.00)."""
    outage = harness.senders[Channel.EMAIL] = Outage(then=harness.senders[Channel.EMAIL])
    invoice = sample_invoice(policy="late_payment")
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    forward = asyncio.create_task(harness.advance(handle, timedelta(days=2)))
    await until(lambda: outage.tries >= 1)
    assert (await harness.dunning.pay(invoice_id, "250.00", payment_id="part")).outcome == "accepted"
    assert Decimal(harness.ledger.run(invoice_id).balance_due) == Decimal("1005.00")
    outage.down = False
    await until(lambda: ("friendly_reminder", "email") in harness.sent(invoice_id), timeout=60)
    while not (status := await harness.dunning.status(invoice_id)).fees:  # the fee, once sent
        await asyncio.sleep(0.1)
    owed = status.total_due
    await harness.dunning.cancel(invoice_id, "test over")
    await forward
    [email] = [m.body for m in messages_for(harness.ledger.engine, invoice_id) if m.channel == "email"]
    assert owed == Decimal("1005.00") and "$1,005.00" in email and "$1,250.00" not in email, email


SHARED_FEES = """
[policies.shared_fees]
version = 1
contact_hours = "00:00-24:00"
fees = { step_fee = "5.00" }
steps = [
  { name = "friendly_reminder", after_due = "1d",  channel = "email" },
  { name = "sms_reminder",      after_due = "15d", channel = "sms" },
]
"""


async def test_a_part_payment_while_a_shared_message_gathers_keeps_that_invoices_fee(time_env, settings,
                                                                                     tmp_path: Path):
    """Two invoices of one customer wait to go out in one email, each step charging 5.00; the
    customer pays 250.00 on the second meanwhile. Its line quotes 1,005.00, what it owes once the
    email is sent (it quoted 1,000.00 and then owed 1,005.00)."""
    from tests.conftest import running
    from tests.test_contact import shipped_policies, started_together

    due = datetime.now(UTC) + timedelta(minutes=5)
    async with running(time_env, shipped_policies(settings, tmp_path, SHARED_FEES)) as harness:
        invoices, everyone_by = await started_together(harness, "shared_fees", 2, due)

        await everyone_by(due + timedelta(days=1, seconds=10) - datetime.now(UTC))
        rows = [d.status for i in invoices for d in harness.ledger.deliveries(i["invoice_id"])]
        assert rows == ["bundled"] * 2
        second = invoices[1]["invoice_id"]
        await harness.dunning.pay(second, "250.00", payment_id="part-while-gathering")
        await everyone_by(timedelta(minutes=3))
        await everyone_by(timedelta(minutes=3))
        [email] = [m.body for i in invoices for m in messages_for(harness.ledger.engine, i["invoice_id"])
                   if m.channel == "email"]
        owed = (await harness.dunning.status(second)).total_due
        # `dunning outbox` of either invoice shows the one email that listed both
        listed = [[m.body for m in messages_for(harness.ledger.engine, i["invoice_id"], shared=True)
                   if m.channel == "email"] for i in invoices]
        for invoice in invoices:
            await harness.dunning.cancel(invoice["invoice_id"], "test over")
    assert owed == Decimal("1005.00") and "$1,005.00" in email, email
    assert listed == [[email], [email]]


async def test_a_chargeback_of_the_fees_and_interest_paid_reopens_the_run(harness: Harness):
    """A business customer paid the total, fees and interest included, and the run ended paid;
    the card issuer then took back the fees-and-interest part. That is owed again, as it would be
    on an open run: the run reopens for it (the invoice amount alone said 'settled')."""
    # due three weeks ago, so every date is in the past as in production (enrolled late, its
    # SMS reminder goes out at once)
    invoice = business_invoice("DE", "EUR", "1000.00", datetime.now(UTC) - timedelta(days=21))
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    while (status := await harness.dunning.status(invoice_id)).fees < 45:  # 40 and the SMS's fee
        await asyncio.sleep(0.1)
    extra = status.total_due - Decimal("1000.00")
    assert extra > 45  # the compensation, a fee and three weeks of interest
    await harness.dunning.pay(invoice_id, str(status.total_due), payment_id="all")
    assert (await harness.finish(handle)).state is RunState.PAID
    after = await harness.dunning.reverse(invoice_id, str(extra), key="chargeback", reason="card issuer")
    await harness.dunning.cancel(invoice_id, "test over")
    assert after.state is RunState.ACTIVE and after.balance_due == extra


async def test_a_reminder_that_could_not_go_out_leaves_its_fee_out_of_the_balance(harness: Harness):
    """While the reminder goes out, the runs table shows the total it quotes, fee included; when
    no channel reached the customer the fee is not charged, and the table shows so at once."""
    invoice = sample_invoice(policy="late_payment")
    invoice_id = invoice["invoice_id"]
    handle = await harness.start(invoice)
    for channel in ("email", "sms"):  # the step's channels
        harness.ledger.opt_out(invoice["customer"]["id"], channel, "asked by letter")
    await harness.advance(handle, timedelta(days=2))
    skipped = ("communication", "skipped", "friendly_reminder", "email")
    await until(lambda: skipped in harness.trail(invoice_id))
    status = await harness.dunning.status(invoice_id)
    await harness.dunning.cancel(invoice_id, "test over")
    assert status.fees == 0 and status.total_due == Decimal("1250.00")
    await until(lambda: Decimal(harness.ledger.run(invoice_id).balance_due) == Decimal("1250.00"))


def test_interest_is_in_the_currencys_own_smallest_unit():
    """A yen has no cents and a Kuwaiti dinar has three decimals: interest rounded to cents made
    totals no one could pay (103,859.23 JPY, shown as ¥103,859), so a customer who paid what the
    message showed was still chased for the fraction. A run started before the rule (no
    ``minor_digits`` in its input) keeps rounding to cents, so its history replays as it ran."""
    due, later = date(2026, 1, 15), noon(date(2026, 4, 25))
    for currency, amount, places in (("JPY", "100000", 0), ("KWD", "1000.000", 3), ("EUR", "1000.00", 2)):
        t = terms("de", "DE", currency, amount, due)
        now = account_charges(t, Decimal(amount), [], [], later)
        assert -now.interest.as_tuple().exponent == places, (currency, now.interest)  # type: ignore[operator]
        assert now.total_due == now.total_due.quantize(Decimal(1).scaleb(-places)), (currency, now.total_due)
    recorded = terms("de", "DE", "JPY", "100000", due).model_dump(exclude={"minor_digits"})
    old = FeeTerms.model_validate(recorded)
    assert old.minor_digits == 2


def test_a_fee_or_a_policy_that_cannot_work_in_the_invoices_currency_is_refused_at_the_start():
    """A 2.50 fee on a yen invoice leaves a half yen no one can pay; a policy that promises no
    agency below a minimum must have one in the invoice's currency."""
    from models.policy import load_policy_book
    from starter import InvoiceRejected, parse_invoice, plan_invoice

    with pytest.raises(FeesError, match=r"step_fee 2\.50 has more decimals than JPY has \(0\)"):
        terms_for(Fees(step_fee="2.50", statutory="none"), customer_type="business", country="DE",
                  currency="JPY", amount=Decimal("100000"), due_on=date(2026, 1, 15), rates=RATES)
    book = load_policy_book(ROOT / "policies" / "default.toml")
    yen = sample_invoice(policy="consumer", currency="JPY", amount_due="100000")
    invoice, policy, _ = parse_invoice(yen, book)
    with pytest.raises(InvoiceRejected, match=r"^currency: policy 'consumer' has an agency_min_balance for "
                                              r"EUR, GBP, USD but not JPY"):
        plan_invoice(invoice, policy, RATES)


def test_a_policy_may_set_its_step_fee_per_currency(tmp_path: Path):
    """Five of every currency is five dollars but five yen: a policy may give each currency its
    own fee, and an invoice in a currency the table leaves out is refused, naming the field."""
    from models.policy import PolicyError, load_policy_book
    from starter import InvoiceRejected, parse_invoice, plan_invoice

    policy = """
[policies.p]
version = 1
fees = { step_fee = { USD = "5.00", EUR = "4.00", JPY = "700" } }
steps = [{ name = "friendly_reminder", after_due = "1d", channel = "email" }]
"""
    (tmp_path / "p.toml").write_text(policy)
    book = load_policy_book(tmp_path / "p.toml")
    fees = {}
    for currency, amount in (("USD", "1250.00"), ("EUR", "1250.00"), ("JPY", "100000")):
        sample = sample_invoice(policy="p", currency=currency, amount_due=amount)
        invoice, chosen, _ = parse_invoice(sample, book)
        terms = plan_invoice(invoice, chosen, RATES).terms
        fees[currency] = terms.step_fee if terms else None
    assert fees == {"USD": Decimal("5.00"), "EUR": Decimal("4.00"), "JPY": Decimal("700")}
    invoice, chosen, _ = parse_invoice(sample_invoice(policy="p", currency="GBP"), book)
    with pytest.raises(InvoiceRejected, match=r"^currency: policy 'p' has a step_fee for EUR, JPY, USD but "
                                              r"not GBP"):
        plan_invoice(invoice, chosen, RATES)
    (tmp_path / "p.toml").write_text(policy.replace('JPY = "700"', 'yen = "700"'))
    with pytest.raises(PolicyError, match=r"field 'fees\.step_fee\.yen'"):
        load_policy_book(tmp_path / "p.toml")


async def test_a_yen_invoice_paid_as_shown_ends_paid(harness: Harness):
    invoice = business_invoice("DE", "JPY", "100000", datetime.now(UTC))
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=40))
    status = await handle.query(InvoiceDunningWorkflow.status)
    assert status.interest > 0 and status.balance_due == status.balance_due.to_integral_value()
    paid = await harness.dunning.pay(invoice["invoice_id"], str(status.balance_due), payment_id="pay-all",
                                     paid_at=status.as_of)
    assert paid.status.state.value == "paid", (paid.outcome, paid.detail, paid.status.balance_due)


def fees_unbacked_invoice(customer_id: str) -> dict:
    """A German business invoice on late_payment due before the rates file's first DE rate."""
    invoice = sample_invoice(policy="late_payment", currency="EUR", issued_on="2019-12-01",
                             due_on="2020-01-01", due_at=None)
    invoice["customer"] |= {"id": customer_id, "country": "DE", "type": "business"}
    return invoice


async def test_a_start_refused_for_fees_stores_nothing(settings):
    """The refusal comes before the customer's contact details are written: no half-done record."""
    from activities.ledger import Ledger
    from models.database import prepare
    from starter import DunningClient, InvoiceRejected

    dunning = DunningClient(None, settings)  # type: ignore[arg-type]  # nothing may reach Temporal
    with pytest.raises(InvoiceRejected, match=r"^fees: no de reference rate in force on 2020-01-02"):
        await dunning.start(fees_unbacked_invoice("C-fees-1"))
    assert Ledger(prepare(settings.database())).customer("C-fees-1") is None
