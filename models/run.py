"""What a dunning run starts with and what it reports: the workflow's input, status and result."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from models.invoice import Invoice
from models.policy import Channel, Policy


class DunningRun(BaseModel):
    """The workflow input: the invoice and the policy resolved when the run started."""

    model_config = ConfigDict(frozen=True)

    invoice: Invoice
    policy: Policy


class RunState(StrEnum):
    ACTIVE = "active"
    PAID = "paid"
    HANDED_OFF = "handed_off"
    CANCELLED = "cancelled"
    EXHAUSTED = "exhausted"  # every step done, nothing paid, no agency in the policy


class NextStep(BaseModel):
    name: str
    channel: Channel
    at: datetime


class DunningStatus(BaseModel):
    """The live state of a run, as the ``status`` query and the CLI report it."""

    invoice_id: str
    workflow_id: str
    state: RunState
    stage: str | None
    balance_due: Decimal
    amount_due: Decimal
    paid: Decimal
    credit: Decimal
    currency: str
    next_step: NextStep | None
    policy: str
    policy_version: int
    customer_id: str
