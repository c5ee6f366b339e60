"""Entries of the audit trail, as activities write them and `dunning log` shows them."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class AuditKind(StrEnum):
    COMMUNICATION = "communication"
    PAYMENT = "payment"
    STATE = "state"
    ACTION = "action"  # an operator's or the billing system's action: who asked and why


def audit_key(*parts: object) -> str:
    """A collision-free key for an audit entry: a digest of the parts as a JSON list.

    Joining with a separator (``a:b``) lets ``("x:y", "z")`` and ``("x", "y:z")`` collide, and
    invoice ids may contain ``:``; a JSON list cannot be ambiguous.
    """
    encoded = json.dumps([str(p) for p in parts], separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


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
