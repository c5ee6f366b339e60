"""The invoice a dunning run chases, and the customer it belongs to.

Validation happens here, once, at the edge: a run is never started for an invoice that would fail
later (unknown currency, a phone number Twilio would refuse, a time zone the schedule cannot use).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from babel import Locale, UnknownLocaleError
from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.money import check_currency, parse_amount

# Reminders are anchored to this local time on the due date unless ``due_at`` pins an instant.
DEFAULT_SEND_TIME = time(9, 0)

InvoiceId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]


class Customer(BaseModel):
    """Who owes the money and how to reach them. Personal data: never put it in search attributes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Annotated[str, Field(min_length=1, max_length=64)]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    email: EmailStr | None = None
    phone: str | None = None
    timezone: str = "UTC"
    locale: str = "en_US"

    @field_validator("phone")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("+"):
            raise ValueError("phone must be in E.164 form, e.g. +14155550100")
        try:
            parsed = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException as exc:
            raise ValueError(f"phone {value!r} is not a phone number ({exc})") from None
        if not phonenumbers.is_valid_number(parsed):
            raise ValueError(f"phone {value!r} is not a valid E.164 number")
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (expected an IANA name)") from None
        return value

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        try:
            return str(Locale.parse(value.replace("-", "_")))
        except (UnknownLocaleError, ValueError):
            raise ValueError(f"unknown locale {value!r}") from None

    @model_validator(mode="after")
    def _reachable(self) -> Customer:
        if self.email is None and self.phone is None:
            raise ValueError("customer needs an email or a phone to be reminded")
        return self


class Invoice(BaseModel):
    """An overdue (or soon due) invoice. Amounts are Decimals quantized to the currency."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    invoice_id: InvoiceId
    currency: str  # declared before amount_due: the amount is validated against it
    amount_due: Decimal
    issued_on: date
    due_on: date
    due_at: datetime | None = None
    customer: Customer
    payment_url: Annotated[str, Field(pattern=r"^https?://", max_length=2000)]
    policy: str = "standard"

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)

    @field_validator("amount_due", mode="before")
    @classmethod
    def _amount(cls, value: object, info: ValidationInfo) -> object:
        currency = info.data.get("currency")
        if currency is None:  # the currency error is already reported
            return value
        return parse_amount(value, currency, field="amount_due")

    @field_validator("due_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("due_at needs a UTC offset, e.g. 2026-10-31T09:00:00+00:00")
        return value

    @field_validator("due_on")
    @classmethod
    def _after_issue(cls, value: date, info: ValidationInfo) -> date:
        issued_on = info.data.get("issued_on")
        if issued_on is not None and value < issued_on:
            raise ValueError(f"due_on {value} is before issued_on {issued_on}")
        return value

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.invoice_id)

    def anchor(self) -> datetime:
        """The instant every step offset counts from: ``due_at``, else 09:00 local on ``due_on``."""
        if self.due_at is not None:
            return self.due_at
        zone = ZoneInfo(self.customer.timezone)
        return datetime.combine(self.due_on, DEFAULT_SEND_TIME, tzinfo=zone)

    def day_of(self, at: datetime) -> int:
        """Whole days past the anchor, as finance people count them ("day 15")."""
        return (at - self.anchor()) // timedelta(days=1)


def workflow_id_for(invoice_id: str) -> str:
    """The workflow id of an invoice's run. Invoice ids are not personal data; names are not used."""
    return f"dunning-{invoice_id}"
