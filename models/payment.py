"""Payments against an invoice, and the account they settle.

The signal payload is deliberately lenient (amount as received, any currency string): a malformed
payment that reaches a workflow must be recorded as rejected, never fail the workflow. The client
API runs the same :func:`payment_problem` check before it signals, so users see the refusal at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from models.money import parse_amount


class PaymentReceived(BaseModel):
    """A payment reported by the billing system (a webhook may deliver it more than once)."""

    model_config = ConfigDict(frozen=True)

    payment_id: Annotated[str, Field(min_length=1, max_length=128)]
    amount: str
    currency: str
    paid_at: datetime


class PaymentOutcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


def payment_problem(payment: PaymentReceived, currency: str) -> str | None:
    """Why this payment cannot be applied to an invoice in ``currency``, or None if it can."""
    if payment.currency.strip().upper() != currency:
        return f"currency {payment.currency} does not match the invoice currency {currency}"
    try:
        parse_amount(payment.amount, currency)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass
class Account:
    """What is owed and what has been paid. Overpayment becomes credit; nothing is ever lost."""

    currency: str
    amount_due: Decimal
    paid: Decimal = Decimal(0)
    payment_ids: set[str] = field(default_factory=set)

    @property
    def balance_due(self) -> Decimal:
        return max(self.amount_due - self.paid, Decimal(0))

    @property
    def credit(self) -> Decimal:
        return max(self.paid - self.amount_due, Decimal(0))

    @property
    def settled(self) -> bool:
        return self.paid >= self.amount_due

    def apply(self, payment: PaymentReceived) -> tuple[PaymentOutcome, str]:
        """Apply a payment once per payment id; return the outcome and a line for the audit trail."""
        if payment.payment_id in self.payment_ids:
            return PaymentOutcome.DUPLICATE, f"payment {payment.payment_id} was already counted"
        problem = payment_problem(payment, self.currency)
        if problem is not None:
            return PaymentOutcome.REJECTED, problem
        self.payment_ids.add(payment.payment_id)
        self.paid += parse_amount(payment.amount, self.currency)
        detail = f"paid {payment.amount} {self.currency}; balance {self.balance_due}"
        if self.credit:
            detail += f"; credit {self.credit}"
        return PaymentOutcome.ACCEPTED, detail
