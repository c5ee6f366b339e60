"""Signed opaque tokens for links that providers or customers follow: one-click unsubscribe
(RFC 8058) and the call's "press 1" callback.

A token names what it is for and the ids it carries, signed with HMAC-SHA256 and
``DUNNING_SIGNING_SECRET``: no guessable invoice or customer id in a URL is enough to act on
someone else's account, and no database row is needed to check it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

MIN_SECRET = 32
UNSUBSCRIBE = "unsubscribe"
VOICE = "voice"


def _mac(secret: str, purpose: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), purpose.encode() + b"\0" + body, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_token(secret: str, purpose: str, *parts: str) -> str:
    body = base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")
    return f"{body}.{_mac(secret, purpose, body.encode())}"


def read_token(secret: str, purpose: str, token: str) -> tuple[str, ...] | None:
    """The ids of a token this deployment signed for ``purpose``, else None."""
    body, _, mac = token.partition(".")
    if not body or not mac or not hmac.compare_digest(mac, _mac(secret, purpose, body.encode())):
        return None
    try:
        parts = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, TypeError):
        return None
    return tuple(str(p) for p in parts) if isinstance(parts, list) else None
