"""The invoice a dunning run chases, and the customer it belongs to, as billing code sends them.

Validation happens here, once, at the edge: a run is never started for an invoice that would fail
later (unknown currency, a phone number Twilio would refuse, a time zone the schedule cannot use).
What the workflow receives is the plain :class:`models.run.RunInvoice` (no contact details, no
validators that call phone-number or locale libraries) built by :func:`plan_run`.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit
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

from models.charges import terms_for
from models.contact import customer_zones
from models.money import check_currency, minor_digits, parse_amount, plain_decimal
from models.policy import DEFAULT_SEND_TIME, Policy
from models.run import DunningRun, RunInvoice, ScheduledStep
from models.text import has_control

# An international phone number anywhere in a text: a +, then 7 or more digits with separators
# (``+1 415-555-0100``, ``tel:+14155550100``). Plain digits are not refused in a customer id:
# billing systems number their customers.
_INTERNATIONAL = re.compile(r"\+\d(?:[ ().\-/]*\d){6,}")
_INVOICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
InvoiceId = Annotated[str, Field(min_length=1, max_length=64, pattern=rf"^{_INVOICE_ID.pattern}$")]


def contact_in(text: str) -> bool:
    """Whether ``text`` (percent-decoded too) holds something shaped like an email address or an
    international phone number: never in what Temporal stores unencrypted."""
    decoded = unquote(text)
    return "@" in decoded or _INTERNATIONAL.search(decoded) is not None


def invoice_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an invoice's id, or None: for ids that come without an invoice (a
    payment for an invoice with no run is kept under its id, so it must be one a run could have)."""
    if _INVOICE_ID.fullmatch(value) is None:
        return (f"invoice_id: {value[:40]!r} is not an invoice id (1 to 64 letters, digits, '.', '_', "
                "':' or '-', starting with a letter or digit)")
    return None


class Customer(BaseModel):
    """Who owes the money and how to reach them. Personal data: never put it in search attributes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\s]+$")]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    email: Annotated[EmailStr, Field(max_length=254)] | None = None
    phone: Annotated[str, Field(max_length=32)] | None = None
    # IANA zone; None: derived from the phone number (or the policy's default_timezone)
    timezone: Annotated[str, Field(max_length=64)] | None = None
    locale: Annotated[str, Field(max_length=32)] = "en_US"
    type: Literal["consumer", "business"] = "business"
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None  # ISO 3166-1 alpha-2
    region: Annotated[str, Field(pattern=r"^[A-Z]{2}-[A-Z0-9]{1,3}$")] | None = None  # ISO 3166-2
    policy: Annotated[str, Field(max_length=64)] | None = None  # used when no selection rule matches
    exclude: bool = False  # never dunned: a start reports "excluded" and nothing runs

    @field_validator("id", "name")
    @classmethod
    def _storable(cls, value: str) -> str:
        if has_control(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("id")
    @classmethod
    def _opaque_id(cls, value: str) -> str:
        """The id is the run's DunningCustomerId search attribute, which Temporal stores and lists
        unencrypted: an email address or a phone number used as the id would be personal data
        there. (Checked here at the edge only: the runs' own inputs are never re-validated.)"""
        if contact_in(value):
            raise ValueError("customer.id must be the billing system's opaque id, not an email address "
                             "or a phone number (it is stored unencrypted in Temporal)")
        return value

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
            # the number itself is not quoted: refusals are logged and kept (the API's replays)
            raise ValueError(f"phone is not a phone number ({exc})") from None
        if not phonenumbers.is_valid_number(parsed):
            raise ValueError("phone is not a valid E.164 number (no such number in its country's plan)")
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
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
    def _region_in_country(self) -> Customer:
        if self.region and self.country and not self.region.startswith(f"{self.country}-"):
            raise ValueError(f"region {self.region} is not in country {self.country}")
        return self

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
    payment_url: Annotated[str, Field(max_length=2000)]
    policy: Annotated[str, Field(max_length=64)] | None = None  # None: the policy file's rules choose

    @field_validator("payment_url")
    @classmethod
    def _pay_link(cls, value: str) -> str:
        """The link goes into SMS and emails: https only, one token (no text smuggled after it).

        Only URLs that browsers and ``urlsplit`` read alike are taken, so the host checked against
        DUNNING_PAY_URL_HOSTS is the host the customer's browser opens: a browser reads ``\\`` as
        ``/`` (``https://evil.com\\@billing.example.com`` opens evil.com), and control characters
        and userinfo (``user@host``) are where the two readings part too.
        """
        if any(c.isspace() for c in value):
            raise ValueError("payment_url must not contain whitespace")
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
            raise ValueError("payment_url must not contain control characters")
        if "\\" in value:
            raise ValueError("payment_url must not contain a backslash")
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("payment_url must be an https:// URL")
        if "@" in parts.netloc:
            raise ValueError("payment_url must not contain a user name or password ('@' before the host)")
        if contact_in(value[len(f"{parts.scheme}://{parts.netloc}"):]):
            raise ValueError("payment_url must not carry an email address or a phone number (the link "
                             "travels with the run through Temporal, unencrypted by default)")
        return value

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
        plain_decimal(value, "amount_due")
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

    def zone(self, default: str = "UTC") -> str:
        """The customer's time zone: their own, else their phone's first, else ``default``."""
        return customer_zones(self.customer.timezone, self.customer.phone, default)[0]

    def anchor(self, default_zone: str = "UTC") -> datetime:
        """The instant every step offset counts from: ``due_at``, else 09:00 local on ``due_on``."""
        if self.due_at is not None:
            return self.due_at
        return datetime.combine(self.due_on, DEFAULT_SEND_TIME, tzinfo=ZoneInfo(self.zone(default_zone)))


def pay_url_problem(invoice: Invoice, allowed_hosts: frozenset[str]) -> str | None:
    """Why the invoice's pay link is not on one of the deployment's payment hosts (any host is
    fine when none are set), or carries the customer's phone number written without its +."""
    host = (urlsplit(invoice.payment_url).hostname or "").lower()
    if allowed_hosts and host not in allowed_hosts:
        return f"payment_url: host {host!r} is not one of DUNNING_PAY_URL_HOSTS"
    phone = invoice.customer.phone
    if phone and phone.removeprefix("+") in re.sub(r"\D", "", unquote(invoice.payment_url)):
        return "payment_url must not carry the customer's phone number"
    return None


def plan_run(invoice: Invoice, policy: Policy,
             rates: dict[str, list[tuple[date, Decimal]]] | None = None) -> DunningRun:
    """The workflow input: plain invoice facts, the schedule and the fees and interest terms,
    fixed now for the run's life. Raises FeesError when the policy's statutory interest needs a
    rate ``rates`` lacks."""
    anchor = invoice.anchor(policy.default_timezone)
    fees, terms = policy.fees, None
    if fees.charges_a_fee or fees.statutory != "none":
        terms = terms_for(fees, customer_type=invoice.customer.type, country=invoice.customer.country,
                          currency=invoice.currency, amount=invoice.amount_due, due_on=invoice.due_on,
                          rates=rates or {})
        terms = terms if terms.charges_anything else None
    return DunningRun(
        terms=terms,
        invoice=RunInvoice(
            invoice_id=invoice.invoice_id, customer_id=invoice.customer.id,
            currency=invoice.currency, amount_due=invoice.amount_due,
            issued_on=invoice.issued_on, due_on=invoice.due_on, anchor=anchor,
            payment_url=invoice.payment_url, minor_digits=minor_digits(invoice.currency),
        ),
        policy=policy,
        schedule=tuple(ScheduledStep(step=step, at=at) for step, at in policy.schedule(anchor)),
    )


def workflow_id_for(invoice_id: str) -> str:
    """The workflow id of an invoice's run. Invoice ids are not personal data; names are not used."""
    return f"dunning-{invoice_id}"
