"""Email through the SendGrid SDK, with every failure classified for the delivery activity.

The SDK sends with urllib, which draws the line we need: an ``OSError`` while connecting or writing
the request comes wrapped in ``URLError`` (the request was not completely sent, so SendGrid cannot
have accepted it), while a timeout or a dropped connection while waiting for the answer comes raw
(SendGrid may have accepted the mail). Reason texts are redacted: SendGrid can echo addresses.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from http.client import HTTPException
from urllib.error import URLError

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Attachment as SendGridAttachment
from sendgrid.helpers.mail import CustomArg, Disposition, FileContent, FileName, FileType, Header, Mail

from activities.channels import (
    AmbiguousSendError,
    OutgoingMessage,
    PermanentSendError,
    ProviderConfigError,
    RetryableSendError,
    SendError,
)
from activities.redact import excerpt, redact


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
        for attached in message.attachments:  # the final notice letter
            mail.attachment = SendGridAttachment(
                FileContent(base64.b64encode(attached.content).decode()), FileName(attached.filename),
                FileType(attached.mime), Disposition("attachment"))
        # No personal data: the ledger key, so webhook events find their invoice and step.
        mail.custom_arg = CustomArg("dunning_ref", message.reference)
        invoice_id, _, rest = message.reference.partition("/")
        mail.custom_arg = CustomArg("dunning_invoice", invoice_id)
        mail.custom_arg = CustomArg("dunning_step", rest.rpartition("/")[0])
        return mail

    def send(self, message: OutgoingMessage) -> str:
        try:
            response = self.client.send(self.build(message))
        except HTTPError as err:
            raise classify(err, message.recipient) from err
        except (OSError, HTTPException) as err:
            raise classify_transport(err, message.recipient) from err
        headers = {k.lower(): v for k, v in dict(response.headers or {}).items()}
        return headers.get("x-message-id") or message.reference

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        """Always None: SendGrid offers no lookup of what a mail send accepted.

        The send answers with nothing to fetch later, and the Email Activity API (a paid add-on)
        is filled asynchronously, so neither settles a crash seconds old. An email cut off by a
        crash may therefore be sent once more; the caller marks it as a possible duplicate.
        """
        return None


def classify(err: HTTPError, *secrets: str | None) -> SendError:
    """429/5xx: retry later; 401/403: our configuration; other 4xx: this message, for good."""
    status = int(getattr(err, "status_code", 0) or 0)
    detail = _provider_message(getattr(err, "body", b""))
    text = excerpt(f"sendgrid {status}: {detail}" if detail else f"sendgrid {status}", 400, *secrets)
    if status == 429:
        reset = (getattr(err, "headers", None) or {}).get("X-RateLimit-Reset")
        return RetryableSendError(text, status=status, retry_after=_seconds_until(reset))
    if status >= 500 or status == 0:
        return RetryableSendError(text, status=status)
    if status in (401, 403):
        return ProviderConfigError(text, status=status)
    return PermanentSendError(text, status=status)


def classify_transport(err: OSError | HTTPException, *secrets: str | None) -> SendError:
    """Retryable when the request cannot have been received whole, ambiguous otherwise.

    ``URLError`` wraps failures inside urllib's connect-and-write step (refused, DNS, connect
    timeout, reset while writing): SendGrid never got a complete request. A raw ``TimeoutError``,
    ``RemoteDisconnected``/``ConnectionResetError`` or an ``HTTPException`` (a cut-off answer)
    comes from waiting for or reading the response: the mail may already be queued.
    """
    if isinstance(err, URLError):
        text = f"sendgrid unreachable, nothing sent: {_reason(err)}"
        return RetryableSendError(redact(text, *secrets))
    text = f"sendgrid may have accepted it, no answer: {err.__class__.__name__}: {_reason(err)}"
    return AmbiguousSendError(redact(text, *secrets))


def _provider_message(body: bytes | str | None) -> str:
    if not body:
        return ""
    raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        errors = json.loads(raw).get("errors") or []
        return "; ".join(str(e.get("message", "")) for e in errors if isinstance(e, dict)) or raw
    except (ValueError, AttributeError):
        return raw  # cut by the caller, after masking


def _seconds_until(reset: str | None) -> float | None:
    """SendGrid's X-RateLimit-Reset is a Unix time; Temporal wants a delay."""
    try:
        return max(float(reset) - time.time(), 1.0) if reset else None
    except ValueError:
        return None


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    if isinstance(reason, BaseException):
        return f"{reason.__class__.__name__}: {reason}"
    return str(reason or err) or err.__class__.__name__
