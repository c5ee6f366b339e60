"""Custom search attributes operators filter on in the Temporal UI.

No personal data here: search attributes are stored unencrypted. The customer id is the billing
system's opaque id, never a name, email or phone number.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

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
