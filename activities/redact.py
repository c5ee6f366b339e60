"""Keep personal data out of failure texts.

Provider errors are stored in the ledger, the audit trail, Temporal's failure history and the logs,
all of which outlive the customer's right to be forgotten and are read by people who need the
error, not the address. Twilio echoes the phone number ("The 'To' number +14155550100 is not a
valid phone number"), SendGrid can echo an email address, and a requests exception quotes the URL
with its query string. Everything that leaves a sender as a reason goes through :func:`redact`.

Error codes (21211), HTTP statuses (400) and provider ids (``SM...``, ``AC...``) survive: they are
not about a person, and they are what an operator searches for.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"

_EMAIL = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# "+" (or its URL encoding) then 7-15 digits, single spaces or dashes allowed between them:
# +14155550100, +1 415-555-0100, %2B14155550100.
_INTERNATIONAL = re.compile(r"(?:\+|%2[Bb])\d(?:[ -]?\d){6,14}(?!\d)")
# A national number written with separators: 415-555-0100, (415) 555 0100, 415.555.0100.
_NATIONAL = re.compile(r"(?<![\w.-])\(?\d{3}\)?[ .-]?\d{3}[ .-]\d{4}(?![\w-])")
# Bare runs of 8+ digits (a number without its "+"), unless part of an id such as a Twilio SID.
_DIGITS = re.compile(r"(?<![A-Za-z0-9])\d{8,}(?![A-Za-z0-9])")


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with each secret, and anything shaped like an email address or phone number, masked.

    Secrets are matched case-insensitively (``Ada@Example.com`` is the same mailbox) and also in
    their URL-encoded forms, since exceptions quote request URLs, and JSON-escaped (``Zo\\u00eb``),
    since a provider may quote back the JSON we sent it. The generic patterns catch what the caller
    could not name, such as a number Twilio reformatted.
    """
    if not text:
        return text
    variants = {variant for secret in secrets if secret and secret.strip()
                for variant in (secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1])}
    # Longest first, so a secret that contains another is masked whole.
    for variant in sorted(variants, key=len, reverse=True):
        text = re.sub(re.escape(variant), REDACTED, text, flags=re.IGNORECASE)
    for pattern in (_EMAIL, _INTERNATIONAL, _NATIONAL, _DIGITS):
        text = pattern.sub(REDACTED, text)
    return text


LONGEST_SECRET = 256  # an email address is at most 254 characters; names are cut to 200


def excerpt(text: str, size: int, *secrets: str | None) -> str:
    """The start of a provider's answer, at most ``size`` characters, with personal data masked.

    Masked first and cut after: an address cut in two no longer looks like one, so cutting first
    would leak its first half. A long answer is masked in a window of its first ``size * 10``
    characters (at least ``4 * LONGEST_SECRET``), and the window's last ``LONGEST_SECRET``
    characters, where a secret may have been cut by the window, are dropped before the final cut.
    """
    window = max(size * 10, 4 * LONGEST_SECRET)
    masked = redact(text[:window], *secrets)
    if len(text) > window:
        masked = masked[:-LONGEST_SECRET]
    return masked[:size]
