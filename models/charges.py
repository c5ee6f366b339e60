"""Fees and statutory interest: what a creditor may add to an overdue invoice, to the cent.

A policy's ``fees`` table asks for a fixed fee per step sent (``step_fee``) and statutory late
payment interest (``statutory``). When a run starts, the rule, the reference rate in force and
the fixed compensation are resolved once into ``FeeTerms`` and carried in the run's input, so a
later edit of the rates file never changes a running debt.

The rules (engineering notes, not legal advice):

- ``eu``: EU Directive 2011/7, business debts: reference rate + 8 points, and EUR 40 fixed
  compensation (in EUR invoices).
- ``uk``: Late Payment of Commercial Debts (Interest) Act, business debts: base rate + 8 %, and
  GBP 40 / 70 / 100 for debts under 1,000 / under 10,000 / above (in GBP invoices).
- ``de``: BGB 288: base rate + 9 points and EUR 40 from businesses; + 5 points from consumers.
- ``auto``: by the customer's country (DE, GB, other EU members) for business debts; a German
  consumer gets the consumer rule; anywhere else none.

How it is computed (:func:`account_charges`): interest accrues from the day after the due date,
per calendar day (UTC), on the principal still unpaid, at rate / 365 per day (actual/365); the
exact sum is rounded half-up to the cent whenever a payment is applied and when it is shown
(never per day, so no cent is lost or gained by the number of days).
A payment goes to costs (fees and the fixed compensation) first, then interest, then principal
(the order is configurable with ``allocation``); what is paid beyond everything owed is credit,
which pays costs charged later. A payment taken back takes the credit back first, then is owed
again as what it had paid, the last part paid first. The UK rate is the base rate in force when the
debt fell due, for its whole life; EU and German interest follows each half-year's reference rate
(each day at the rate of its half-year). A run takes the rates file as it is when it starts: later
edits never change a running debt, and past the file's last entry that rate goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from models.duration import read_toml
from models.money import minor_digits

RULES = ("auto", "eu", "uk", "de", "none")
PARTS = ("costs", "interest", "principal")
EU_MEMBERS = frozenset({"AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE",
                        "IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE"})


class FeesError(ValueError):
    """A fees table or a rates file that cannot be used; the message names the field."""


class Fees(BaseModel):
    """A policy's ``fees = { step_fee = "5.00", statutory = "auto" }`` (both optional).

    ``step_fee`` is one amount in every currency, or one per currency
    (``{ USD = "5.00", EUR = "5.00", JPY = "700" }``): five of every currency is five dollars but
    five yen, and an invoice in a currency the table leaves out is refused at the start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_fee: str | dict[str, str] = "0"
    statutory: str = "none"
    allocation: tuple[str, ...] = PARTS

    def fee_in(self, currency: str) -> Decimal | None:
        """The step fee for an invoice in ``currency``; None when the table has none for it."""
        if isinstance(self.step_fee, str):
            return Decimal(self.step_fee)
        amount = self.step_fee.get(currency)
        return Decimal(amount) if amount is not None else None

    @property
    def charges_a_fee(self) -> bool:
        amounts = [self.step_fee] if isinstance(self.step_fee, str) else list(self.step_fee.values())
        return any(Decimal(amount) for amount in amounts)

    def check(self, where: str) -> None:
        table = {"": self.step_fee} if isinstance(self.step_fee, str) else self.step_fee
        for currency, amount in table.items():
            try:
                ok = Decimal(amount) >= 0 and (not currency or (len(currency) == 3 and currency.isupper()))
            except InvalidOperation:
                ok = False
            if not ok:
                field = f"fees.step_fee.{currency}" if currency else "fees.step_fee"
                raise FeesError(f"{where}, field {field!r}: {amount!r} is not an amount like \"5.00\""
                                + (" (or the key is not a currency code like EUR)" if currency else ""))
        if not table:
            raise FeesError(f"{where}, field 'fees.step_fee': give an amount, or one per currency")
        if self.statutory not in RULES:
            raise FeesError(f"{where}, field 'fees.statutory': {self.statutory!r} is not one of "
                            f"{', '.join(RULES)}")
        if sorted(self.allocation) != sorted(PARTS):
            raise FeesError(f"{where}, field 'fees.allocation': give costs, interest and principal in the "
                            "order payments go to them")


class FeeTerms(BaseModel):
    """What a run charges, resolved when it starts and fixed for its life."""

    model_config = ConfigDict(frozen=True)

    step_fee: Decimal = Decimal(0)
    rule: str = "none"  # eu, uk, de, de-consumer or none: what was applied
    reference_rate: Decimal | None = None  # percent per year, as in force when interest started
    reference_from: date | None = None  # the date that rate took effect
    points: Decimal = Decimal(0)  # added to the reference rate
    flat: Decimal = Decimal(0)  # fixed compensation, charged when interest starts
    interest_from: date | None = None  # the day after the due date
    allocation: tuple[str, ...] = PARTS
    note: str = ""  # e.g. the rates file had no rate for that half-year yet
    # EU and German rates follow each half-year's reference rate: the later entries of the rates
    # file known when the run started, (from, reference rate); the UK rate stays fixed.
    later_rates: tuple[tuple[date, Decimal], ...] = ()
    # Interest is rounded to the invoice currency's smallest unit, fixed at the start like the
    # rest (runs started before this field existed round to cents, as they always did): a total
    # of 103,859.23 JPY cannot be paid, and a customer who paid the ¥103,859 shown was chased.
    minor_digits: int = 2
    # A credit pays costs charged after it, and a payment taken back is owed again as what it had
    # paid (the last part paid first), not all as principal. Fixed at the start like the rest: runs
    # started before this field existed keep the old rule, so their histories replay as they ran.
    settles_in_order: bool = False

    def rate_on(self, day: date) -> Decimal:
        """The interest rate in percent per year on ``day``."""
        reference = self.reference_rate
        if reference is None:
            return Decimal(0)
        for start, later in self.later_rates:
            if start <= day:
                reference = later
        return max(reference + self.points, Decimal(0))

    @property
    def rate(self) -> Decimal:
        """The interest rate in percent per year (0 when no statutory interest applies)."""
        if self.reference_rate is None:
            return Decimal(0)
        return max(self.reference_rate + self.points, Decimal(0))

    @property
    def charges_anything(self) -> bool:
        return bool(self.step_fee or self.rate or self.flat)


class Dated(BaseModel):
    """A step fee charged, or a payment counted (negative: taken back), at a moment."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    amount: Decimal
    what: str = ""


class Charges(BaseModel):
    """Where an account stands at one moment: each part still unpaid, and the total."""

    principal: Decimal
    fees: Decimal  # step fees and fixed compensation not yet paid
    interest: Decimal  # interest accrued and not yet paid
    interest_rate: Decimal  # percent per year
    total_due: Decimal
    fees_charged: Decimal  # all costs charged so far, paid or not
    interest_accrued: Decimal  # all interest accrued so far, paid or not
    credit: Decimal = Decimal(0)  # paid beyond everything owed

    def waived(self) -> Charges:
        """Nothing owed any more: the principal written off or credited (a write-off, an upheld
        dispute) takes the fees and interest with it; what was charged stays on record."""
        zero = Decimal(0)
        return self.model_copy(update={"principal": zero, "fees": zero, "interest": zero, "total_due": zero})


# -- the rates file --------------------------------------------------------------------------------

def load_rates(path: Path) -> dict[str, list[tuple[date, Decimal]]]:
    """``[eu] rates = [{ from = 2026-01-01, rate = "2.15" }, ...]`` per rule: the reference
    rate (percent per year) applicable from each date, in date order."""
    document = read_toml(path, "rates file", FeesError)
    table: dict[str, list[tuple[date, Decimal]]] = {}
    for rule in ("eu", "uk", "de"):
        entries = []
        for number, entry in enumerate((document.get(rule) or {}).get("rates") or [], start=1):
            where = f"rates file {path}, [{rule}] entry {number}"
            start = entry.get("from") if isinstance(entry, dict) else None
            if not isinstance(start, date):
                raise FeesError(f"{where}, field 'from': give a date like 2026-01-01")
            try:
                rate = Decimal(str(entry.get("rate")))
            except InvalidOperation:
                raise FeesError(f"{where}, field 'rate': {entry.get('rate')!r} is not a percentage") from None
            entries.append((start, rate))
        table[rule] = sorted(entries)
    return table


def rate_on(rates: Sequence[tuple[date, Decimal]], day: date) -> tuple[date, Decimal] | None:
    """The entry in force on ``day`` (the latest that took effect on or before it)."""
    found = None
    for start, rate in rates:
        if start <= day:
            found = (start, rate)
    return found


# -- resolving a run's terms -----------------------------------------------------------------------

def resolve_rule(statutory: str, customer_type: str, country: str | None) -> str:
    """Which statutory rule applies to a debt (``none`` for consumers but German ones)."""
    consumer = customer_type == "consumer"
    if statutory == "auto":
        if country == "DE":
            return "de-consumer" if consumer else "de"
        if consumer:
            return "none"
        if country == "GB":
            return "uk"
        return "eu" if country in EU_MEMBERS else "none"
    if statutory == "de":
        return "de-consumer" if consumer else "de"
    if statutory in ("eu", "uk") and consumer:
        return "none"  # the Directive and the Act are about business debts
    return statutory


def uk_fixed_sum(amount: Decimal) -> Decimal:
    if amount < 1000:
        return Decimal(40)
    if amount < 10000:
        return Decimal(70)
    return Decimal(100)


def terms_for(fees: Fees, *, customer_type: str, country: str | None, currency: str, amount: Decimal,
              due_on: date, rates: dict[str, list[tuple[date, Decimal]]]) -> FeeTerms:
    """The terms of one run. Raises FeesError when the rule needs a rate the file lacks."""
    rule = resolve_rule(fees.statutory, customer_type, country)
    fee, digits = fees.fee_in(currency), minor_digits(currency)
    if fee is None:
        assert isinstance(fees.step_fee, dict)
        raise FeesError(f"the policy's step_fee has an amount for {', '.join(sorted(fees.step_fee))} but "
                        f"not {currency}")
    if fee != fee.quantize(Decimal(1).scaleb(-digits)):  # a balance no one could pay to the end
        raise FeesError(f"the policy's step_fee {fee} has more decimals than {currency} has "
                        f"({digits})")
    starts = due_on + timedelta(days=1)
    terms: dict[str, Any] = {"step_fee": fee, "rule": rule, "interest_from": starts,
                             "allocation": fees.allocation, "minor_digits": digits,
                             "settles_in_order": True}
    if rule == "none":
        return FeeTerms(**terms)
    table = "de" if rule == "de-consumer" else rule
    entry = rate_on(rates.get(table, []), starts)
    if entry is None:
        raise FeesError(f"no {table} reference rate in force on {starts} in the rates file")
    points = {"eu": 8, "uk": 8, "de": 9, "de-consumer": 5}[rule]
    flat = Decimal(0)
    if rule in ("eu", "de") and currency == "EUR":
        flat = Decimal(40)
    elif rule == "uk" and currency == "GBP":
        flat = uk_fixed_sum(amount)
    later = tuple((start, rate) for start, rate in rates.get(table, []) if start > entry[0]) \
        if table in ("eu", "de") else ()
    note = ""
    if starts >= _next_half_year(entry[0]):
        note = (f"the rates file has no {table} rate for the half-year of {starts}; "
                f"used the one from {entry[0]}")
    return FeeTerms(**terms, reference_from=entry[0], reference_rate=entry[1], points=Decimal(points),
                    flat=flat, note=note, later_rates=later)


def _move_credit(paid: list[list[Any]], amount: Decimal) -> None:
    """``amount`` of the credit went to costs: the newest credit entries become costs paid."""
    left = amount
    for entry in reversed(paid):
        if left <= 0:
            break
        if entry[0] == "credit":
            taken = min(left, entry[1])
            entry[1] -= taken
            left -= taken
    paid[:] = [entry for entry in paid if entry[1] > 0]
    paid.append(["costs", amount])


def _next_half_year(day: date) -> date:
    return date(day.year, 7, 1) if day.month < 7 else date(day.year + 1, 1, 1)


# -- the account -----------------------------------------------------------------------------------

def account_charges(terms: FeeTerms, owed: Decimal, payments: Sequence[tuple[datetime, Decimal]],
                    costs: Sequence[tuple[datetime, Decimal]], at: datetime) -> Charges:
    """The account at ``at``: ``owed`` principal, ``costs`` charged (step fees, when), and
    ``payments`` applied in time order to the parts in the terms' allocation order."""
    events: list[tuple[date, int, Decimal]] = []
    if terms.flat and terms.interest_from is not None and (
            terms.interest_from <= at.date() or not terms.settles_in_order):  # (not before it is due)
        events.append((terms.interest_from, -1, terms.flat))  # -1: the fixed compensation
    events += [(when.date(), 0, amount) for when, amount in costs if when <= at]
    events += [(when.date(), 1, amount) for when, amount in payments if when <= at]
    events.sort(key=lambda e: (e[0], e[1]))
    principal, fees, interest, credit = owed, Decimal(0), Decimal(0), Decimal(0)
    charged, accrued = Decimal(0), Decimal(0)
    since = terms.interest_from - timedelta(days=1) if terms.interest_from else None

    def accrue(until: date) -> None:
        nonlocal interest, accrued, since
        if since is None or until <= since or terms.reference_rate is None:
            since = max(since, until) if since is not None else None
            return
        # day by day would do; a day's rate is that of the half-year it is in, so cut there
        cuts = sorted({start - timedelta(days=1) for start, _ in terms.later_rates
                       if since < start - timedelta(days=1) < until} | {until})
        for cut in cuts:
            gained = principal * terms.rate_on(since + timedelta(days=1)) / 100 * (cut - since).days / 365
            interest += gained  # exact until rounded
            accrued += gained
            since = cut

    unit = Decimal(1).scaleb(-terms.minor_digits)  # a cent, a yen, a fils

    def to_cents() -> None:
        nonlocal interest, accrued
        rounded = interest.quantize(unit, ROUND_HALF_UP)
        accrued += rounded - interest
        interest = rounded

    # What payments paid, newest last, (part, amount): a payment taken back is owed again as
    # what was paid last (``settles_in_order``), the credit first.
    paid: list[list[Any]] = []
    for day, kind, amount in events:
        accrue(day)
        if kind == -1 and terms.settles_in_order and principal <= 0:
            continue  # paid by the due date: no default, so no compensation for it
        if kind <= 0:
            fees += amount
            charged += amount
            if terms.settles_in_order and credit > 0:  # paid already, by what was paid beyond the rest
                taken = min(credit, amount)
                credit -= taken
                fees -= taken
                _move_credit(paid, taken)
            continue
        to_cents()
        if amount < 0 and not terms.settles_in_order:  # (runs started before the rule below)
            principal -= amount
            continue
        if amount < 0:
            back = -amount
            while back > 0 and paid:
                part, was = paid[-1]
                taken = min(back, was)
                if part == "credit":
                    credit -= taken
                elif part == "costs":
                    fees += taken
                elif part == "interest":
                    interest += taken
                else:
                    principal += taken
                back -= taken
                if taken == was:
                    paid.pop()
                else:
                    paid[-1][1] = was - taken
            principal += back  # more taken back than was ever paid: owed all the same
            continue
        left = amount
        for part in terms.allocation:
            if part == "costs":
                taken = min(left, fees)
                fees -= taken
            elif part == "interest":
                taken = min(left, interest)
                interest -= taken
            else:
                taken = min(left, principal)
                principal -= taken
            left -= taken
            if taken:
                paid.append([part, taken])
        credit += left
        if left:
            paid.append(["credit", left])
    accrue(at.date())
    to_cents()
    return Charges(principal=principal, fees=fees, interest=interest,
                   interest_rate=terms.rate_on(at.date()),
                   total_due=principal + fees + interest, fees_charged=charged,
                   interest_accrued=accrued.quantize(unit, ROUND_HALF_UP), credit=credit)
