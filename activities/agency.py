"""The collections agency handoff: a signed JSON POST to the agency's webhook.

The body is signed with HMAC-SHA256 over ``"<timestamp>." + body`` so the agency can check it came
from us and is fresh; ``Idempotency-Key`` (the ledger reference) lets it drop a repeated delivery.
No failure here is skipped, because an account that cannot be handed over is an operator's
problem to fix, never a silently dropped debt. How the agency's answers are read (the README's
"The agency webhook" says the same for the agency's developers):

- 2xx: accepted; the ``id`` in a JSON answer, if any, is kept as the agency's reference.
- 3xx: our URL is out of date (a redirect is not followed: it would drop the document); retried
  until an operator sets the new address, like the configuration errors below.
- 408, 409 (a request with this key is still being processed), 425, 429 and 5xx: retried with
  backoff, like a connection that was refused.
- 401, 403, 404, 405, 407: our URL or secret is wrong; retried until an operator fixes the
  configuration (the retrying gauge alerts).
- any other 4xx (400, 413, 422, ...): the agency refused this document. Posting it again cannot
  help, so the run shows ``failed`` with the agency's words until an operator runs
  ``dunning retry``.

A POST that went out and got no answer (a read timeout, a connection dropped after the request was
written) may have reached the agency: that is :class:`AmbiguousSendError`, so the ledger row stays
``ambiguous`` and a run whose handoff was cut off keeps treating the agency as holding the account
(a payment or a recall is reported to it) while the retry posts the same reference again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import datetime

import requests

from activities.channels import (
    OutgoingMessage,
    ProviderConfigError,
    RejectedSendError,
    RetryableSendError,
)
from activities.redact import excerpt
from activities.transport import classify_transport

RETRY_LATER = frozenset({408, 409, 425, 429})  # and every 5xx
MAX_AGE = 300  # seconds a signed request stays acceptable to the agency (clock skew included)
OUR_CONFIGURATION = frozenset({401, 403, 404, 405, 407})  # the URL or the secret is wrong


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, max_age: int = MAX_AGE,
           now: float | None = None) -> bool:
    """What the agency runs: the signature header compared in constant time, and the timestamp
    no more than ``max_age`` seconds off the agency's clock, so a captured request cannot be
    replayed later (every attempt, a retry too, is signed afresh)."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= max_age and hmac.compare_digest(sign(secret, timestamp, body), signature)


class AgencyWebhookSender:
    provider = "agency"

    def __init__(self, *, url: str, secret: str, timeout: float = 10.0) -> None:
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self.session = requests.Session()

    def send(self, message: OutgoingMessage) -> str:
        body = json.dumps(message.payload, sort_keys=True, separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Dunning-Timestamp": timestamp,
            "X-Dunning-Signature": sign(self.secret, timestamp, body),
            "Idempotency-Key": message.reference,
        }
        try:
            # not followed: a redirect of a POST becomes a GET without the document, whose 200
            # (the agency's home page) would have counted as the handoff
            response = self.session.post(self.url, data=body, headers=headers, timeout=self.timeout,
                                         allow_redirects=False)
        except requests.RequestException as err:
            raise classify_transport(err, "agency", "received it") from err
        status = response.status_code
        if 300 <= status < 400:
            where = excerpt(response.headers.get("Location", "nowhere said"), 200)
            raise ProviderConfigError(f"agency {status}: DUNNING_AGENCY_WEBHOOK_URL redirects to {where}; "
                                      "set it to the address that takes the POST", status=status)
        if status in RETRY_LATER or status >= 500:
            raise RetryableSendError(f"agency {status}", status=status)
        if status >= 400:
            # The agency may quote the referred customer's contact details back at us.
            customer = (message.payload or {}).get("customer") or {}
            text = excerpt(f"agency refused the request: {status} {response.text}", 240, message.recipient,
                           *(customer.get(field) for field in ("name", "email", "phone")))
            if status in OUR_CONFIGURATION:
                raise ProviderConfigError(text, status=status)
            raise RejectedSendError(text, status=status)
        try:
            return str(response.json().get("id") or message.reference)
        except ValueError:
            return message.reference

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        """Always None: re-posting is the reconciliation.

        The agency dedupes by ``Idempotency-Key`` (the ledger reference), so a handoff whose
        answer was lost is simply posted again and the agency keeps one.
        """
        return None
