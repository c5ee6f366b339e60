"""Money: decimal amounts in an ISO 4217 currency, never floats."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache

from babel.numbers import format_currency, get_currency_precision, list_currencies

# Codes babel knows that are not money anyone can owe: "no currency" and the testing code.
_NOT_PAYABLE = {"XXX", "XTS"}
CURRENCIES: frozenset[str] = frozenset(c for c in list_currencies() if c not in _NOT_PAYABLE)
# No invoice is this large; a bound keeps amounts finite everywhere (a float search attribute
# turns a 400-digit amount into inf and fails the workflow task).
MAX_AMOUNT = Decimal("999999999999.999")


def check_currency(code: str) -> str:
    """Return the upper-case ISO 4217 code, or raise ValueError naming the bad code."""
    normalized = code.strip().upper()
    if normalized not in CURRENCIES:
        raise ValueError(f"unknown currency {code!r} (expected an ISO 4217 code such as USD)")
    return normalized


def minor_digits(currency: str) -> int:
    """How many decimal places the currency has (JPY 0, USD 2, KWD 3)."""
    return get_currency_precision(currency)


_PLAIN = re.compile(r"[-+]?[0-9]+(\.[0-9]+)?")


def plain_decimal(value: object, field: str = "amount") -> None:
    """Refuse numbers nobody writes as money although Python reads them: exponents (``1e3``) and
    digit separators (``1_000``), which would reach the audit trail as written. For input at the
    edges (CLI, API, client) only: the runs' amounts were checked when they came in."""
    if not isinstance(value, str) or _PLAIN.fullmatch(text := value.strip()) is not None:
        return
    try:
        number = Decimal(text)
    except InvalidOperation:
        return  # not a number at all: parse_amount says so
    if number.is_finite():
        raise ValueError(f"{field} must be a plain decimal such as 1250.00, not {text[:40]!r}")


def parse_amount(value: object, currency: str, *, field: str = "amount",
                 digits: int | None = None) -> Decimal:
    """Parse a decimal amount for ``currency``: positive, exact, at most its minor digits
    (``digits`` when the caller has them fixed: a run's, from its start).

    Floats are refused because they cannot represent most cent values exactly.
    """
    if isinstance(value, float):
        raise ValueError(f"{field} must be a decimal string such as '12.50', not a float")
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise ValueError(f"{field} {value!r} is not a decimal number") from None
    if not amount.is_finite():
        raise ValueError(f"{field} must be a finite number")
    if amount <= 0:
        raise ValueError(f"{field} must be positive, got {value}")
    if amount > MAX_AMOUNT:
        raise ValueError(f"{field} must be at most {MAX_AMOUNT:,}")  # exact: rounding would say 10^12
    digits = minor_digits(currency) if digits is None else digits
    quantum = Decimal(1).scaleb(-digits)
    if amount != amount.quantize(quantum):
        raise ValueError(f"{field} {value} has more than {digits} decimal places for {currency}")
    return amount.quantize(quantum)


@lru_cache(maxsize=4096)
def format_money(amount: Decimal, currency: str, locale: str) -> str:
    """Format for a reader in ``locale``: 1250 USD is '$1,250.00' in en_US, '1.250,00 $' in de_DE.
    Cached: the same few amounts are formatted for every message of an invoice."""
    return format_currency(amount, currency, locale=locale)
