"""Entries of the audit trail, as activities write them and `dunning log` shows them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class AuditKind(StrEnum):
    COMMUNICATION = "communication"
    PAYMENT = "payment"
    STATE = "state"


class AuditEvent(BaseModel):
    """One fact about a run. ``key`` makes recording idempotent across activity retries."""

    model_config = ConfigDict(frozen=True)

    key: str
    workflow_id: str
    invoice_id: str
    at: datetime
    kind: AuditKind
    status: str
    step: str | None = None
    channel: str | None = None
    detail: str = ""
