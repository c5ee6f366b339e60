"""Email through the SendGrid SDK, with every failure classified for the delivery activity."""

from __future__ import annotations

import json
import time
from urllib.error import URLError

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import CustomArg, Header, Mail

from activities.channels import (
    OutgoingMessage,
    PermanentSendError,
    ProviderConfigError,
    RetryableSendError,
)


class SendGridEmailSender:
    """Sends through ``/v3/mail/send``; returns SendGrid's ``X-Message-Id``."""

    provider = "sendgrid"

    def __init__(self, *, api_key: str, from_email: str, base_url: str | None = None,
                 timeout: float = 10.0) -> None:
        self.from_email = from_email
        self.client = (SendGridAPIClient(api_key, host=base_url.rstrip("/")) if base_url
                       else SendGridAPIClient(api_key))
        self.client.client.timeout = timeout  # the constructor takes none

    def build(self, message: OutgoingMessage) -> Mail:
        mail = Mail(from_email=self.from_email, to_emails=message.recipient,
                    subject=message.subject or "", plain_text_content=message.body,
                    html_content=message.html)
        for name, value in message.headers.items():
            mail.header = Header(name, value)
        mail.custom_arg = CustomArg("dunning_ref", message.reference)  # no personal data
        return mail

    def send(self, message: OutgoingMessage) -> str:
        try:
            response = self.client.send(self.build(message))
        except HTTPError as err:
            raise classify(err) from err
        except (URLError, ConnectionError, TimeoutError) as err:
            raise RetryableSendError(f"sendgrid unreachable: {_reason(err)}") from err
        headers = {k.lower(): v for k, v in dict(response.headers or {}).items()}
        return headers.get("x-message-id") or message.reference


def classify(err: HTTPError) -> Exception:
    """429/5xx: retry later; 401/403: our configuration; other 4xx: this message, for good."""
    status = int(getattr(err, "status_code", 0) or 0)
    detail = _provider_message(getattr(err, "body", b""))
    text = f"sendgrid {status}: {detail}" if detail else f"sendgrid {status}"
    if status == 429:
        reset = (getattr(err, "headers", None) or {}).get("X-RateLimit-Reset")
        return RetryableSendError(text, status=status, retry_after=_seconds_until(reset))
    if status >= 500 or status == 0:
        return RetryableSendError(text, status=status)
    if status in (401, 403):
        return ProviderConfigError(text, status=status)
    return PermanentSendError(text, status=status)


def _provider_message(body: bytes | str | None) -> str:
    if not body:
        return ""
    raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        errors = json.loads(raw).get("errors") or []
        return "; ".join(str(e.get("message", "")) for e in errors if isinstance(e, dict)) or raw
    except (ValueError, AttributeError):
        return raw[:300]


def _seconds_until(reset: str | None) -> float | None:
    """SendGrid's X-RateLimit-Reset is a Unix time; Temporal wants a delay."""
    try:
        return max(float(reset) - time.time(), 1.0) if reset else None
    except ValueError:
        return None


def _reason(err: Exception) -> str:
    return str(getattr(err, "reason", None) or err) or err.__class__.__name__
