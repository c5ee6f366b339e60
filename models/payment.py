"""Payments against an invoice, and the account they settle.

A payment signal is read leniently (:func:`read_payment`): amount as a string or a number, any
field that cannot be read makes it a *rejected* payment in the audit trail. The SDK would drop a
signal whose payload fails to decode into a strict type with only a log line, and a lost payment
is the worst thing a dunning engine can do. The client API runs the same checks before it
signals, so users see a refusal at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from models.money import minor_digits, parse_amount

PAYMENT_ID_MAX = 128


class PaymentReceived(BaseModel):
    """A payment reported by the billing system (a webhook may deliver it more than once)."""

    model_config = ConfigDict(frozen=True)

    payment_id: str
    amount: str
    currency: str
    paid_at: datetime
    source: str = ""  # who reported it (an API key's name, a webhook, a CLI login): for the trail

    @field_validator("paid_at")
    @classmethod
    def _utc_when_naive(cls, value: datetime) -> datetime:
        """A time without an offset is taken as UTC, as billing exports usually mean it: refusing
        it would leave a paid customer chased, and comparing it with the run's clock would fail."""
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class PaymentOutcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


def read_payment(raw: Any) -> tuple[PaymentReceived | None, str]:
    """A payment from a decoded signal payload, or None and why it cannot be read."""
    if not isinstance(raw, dict):
        return None, f"payment payload is not an object ({type(raw).__name__})"
    data = dict(raw)
    payment_id = data.get("payment_id")
    if not isinstance(payment_id, str) or not payment_id.strip():
        return None, "payment_id: missing or not a string"
    if len(payment_id) > PAYMENT_ID_MAX:
        return None, f"payment_id: longer than {PAYMENT_ID_MAX} characters ({payment_id[:40]}...)"
    amount = data.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, str | int | float | Decimal):
        return None, f"amount: not a decimal string or number ({amount!r:.40})"
    data["amount"] = str(amount)
    if not isinstance(data.get("source", ""), str):
        data.pop("source")  # who reported it is for the trail only: never a reason to refuse
    try:
        return PaymentReceived.model_validate(data), ""
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payment"
        return None, f"{where}: {first['msg']}"


def payment_problem(payment: PaymentReceived, currency: str, digits: int | None = None) -> str | None:
    """Why this payment cannot be applied to an invoice in ``currency`` (of ``digits`` decimal
    places, when fixed), or None if it can."""
    if payment.currency.strip().upper() != currency:
        return f"currency {payment.currency:.8} does not match the invoice currency {currency}"
    try:
        parse_amount(payment.amount, currency, digits=digits)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass
class Account:
    """What is owed and what has been paid. Overpayment becomes credit; nothing is ever lost.

    ``adjusted`` is what was taken off the invoice without a payment: a disputed amount credited,
    a part written off.
    """

    currency: str
    amount_due: Decimal
    paid: Decimal = Decimal(0)
    payment_ids: set[str] = field(default_factory=set)
    adjusted: Decimal = Decimal(0)
    digits: int | None = None  # the currency's decimal places, fixed at the run's start

    @property
    def owed(self) -> Decimal:
        return self.amount_due - self.adjusted

    @property
    def balance_due(self) -> Decimal:
        return max(self.owed - self.paid, Decimal(0))

    @property
    def credit(self) -> Decimal:
        return max(self.paid - self.owed, Decimal(0))

    @property
    def settled(self) -> bool:
        return self.paid >= self.owed

    def adjust(self, amount: Decimal) -> None:
        """Take ``amount`` off what is owed (never more than the balance)."""
        self.adjusted += min(amount, self.balance_due)

    def apply(self, payment: PaymentReceived) -> tuple[PaymentOutcome, str]:
        """Apply a payment once per payment id; return the outcome and a line for the audit trail."""
        if payment.payment_id in self.payment_ids:
            return PaymentOutcome.DUPLICATE, f"payment {payment.payment_id} was already counted"
        problem = payment_problem(payment, self.currency, self.digits)
        if problem is not None:
            return PaymentOutcome.REJECTED, problem
        self.payment_ids.add(payment.payment_id)
        self.paid += parse_amount(payment.amount, self.currency, digits=self.digits)
        return PaymentOutcome.ACCEPTED, self.describe(payment, self.balance_due, self.credit)

    def describe(self, payment: PaymentReceived, owed: Decimal, credit: Decimal, *,
                 what: str = "balance") -> str:
        """The audit line of an accepted payment: what is ``owed`` after it (``what``: the
        balance, or with fees and interest the total) and any ``credit``."""
        digits = minor_digits(self.currency) if self.digits is None else self.digits
        unit = Decimal(1).scaleb(-digits)  # "balance 0.00", not "balance 0"
        paid = parse_amount(payment.amount, self.currency, digits=digits).quantize(unit)
        detail = f"paid {paid} {self.currency}; {what} {owed.quantize(unit)}"
        if credit:
            detail += f"; credit {credit.quantize(unit)}"
        if payment.source:
            detail += f" (reported by {payment.source[:100]})"
        return detail
