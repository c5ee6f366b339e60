"""One-click unsubscribe tokens (RFC 8058): which customer, from which invoice's email, signed.

The token is opaque to the reader (no guessable invoice or customer id in the link is enough to
unsubscribe someone else) and needs no database row: HMAC-SHA256 with ``DUNNING_SIGNING_SECRET``
over the customer and invoice ids.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

MIN_SECRET = 32


def _mac(secret: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), b"unsubscribe\0" + body, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_token(secret: str, customer_id: str, invoice_id: str) -> str:
    body = base64.urlsafe_b64encode(json.dumps([customer_id, invoice_id]).encode()).decode().rstrip("=")
    return f"{body}.{_mac(secret, body.encode())}"


def read_token(secret: str, token: str) -> tuple[str, str] | None:
    """(customer id, invoice id) of a token this deployment signed, else None."""
    body, _, mac = token.partition(".")
    if not body or not mac or not hmac.compare_digest(mac, _mac(secret, body.encode())):
        return None
    try:
        customer_id, invoice_id = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, TypeError):
        return None
    return str(customer_id), str(invoice_id)
