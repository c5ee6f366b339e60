"""Custom search attributes operators filter on in the Temporal UI.

No personal data here: search attributes are stored unencrypted. The customer id is the billing
system's opaque id, never a name, email or phone number.
"""

from __future__ import annotations

from decimal import Decimal

from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    SearchAttributeUpdate,
    TypedSearchAttributes,
)

from models.run import RunInvoice

STAGE = SearchAttributeKey.for_keyword("DunningStage")
STATE = SearchAttributeKey.for_keyword("DunningState")
CUSTOMER_ID = SearchAttributeKey.for_keyword("DunningCustomerId")
AMOUNT_DUE = SearchAttributeKey.for_float("DunningAmountDue")
CURRENCY = SearchAttributeKey.for_keyword("DunningCurrency")
DUE_DATE = SearchAttributeKey.for_datetime("DunningDueDate")

ALL = (STAGE, STATE, CUSTOMER_ID, AMOUNT_DUE, CURRENCY, DUE_DATE)

_CLI_TYPES = {"KEYWORD": "Keyword", "DOUBLE": "Double", "DATETIME": "Datetime"}


def cli_type(key: SearchAttributeKey) -> str:
    """The type name the ``temporal`` CLI expects (``Keyword``, ``Double``, ``Datetime``)."""
    return _CLI_TYPES[key.indexed_value_type.name.removeprefix("INDEXED_VALUE_TYPE_")]


def current(state: str, stage: str | None, balance_due: Decimal) -> dict[str, object]:
    """The attributes that change during a run, by name."""
    return {STAGE.name: stage or "not_started", STATE.name: state, AMOUNT_DUE.name: float(balance_due)}


def at_start(invoice: RunInvoice) -> dict[str, object]:
    """Every attribute of a new run, by name: set with the start, which costs no extra action."""
    return current("active", None, invoice.amount_due) | {
        CUSTOMER_ID.name: invoice.customer_id,
        CURRENCY.name: invoice.currency,
        DUE_DATE.name: invoice.anchor,
    }


def typed(values: dict[str, object]) -> TypedSearchAttributes:
    keys = {key.name: key for key in ALL}
    return TypedSearchAttributes([
        SearchAttributePair(keys[name], value)  # type: ignore[arg-type]
        for name, value in values.items()
    ])


def updates(values: dict[str, object]) -> list[SearchAttributeUpdate]:
    keys = {key.name: key for key in ALL}
    return [keys[name].value_set(value) for name, value in values.items()]  # type: ignore[attr-defined]
