"""The small interface every delivery channel implements, and the errors it may raise.

A sender takes one fully rendered :class:`OutgoingMessage` and returns the provider's message id.
It classifies every failure into one of four errors, because the right reaction differs:

- :class:`RetryableSendError`: the provider did not take the message (429, 5xx, connection
  refused). Temporal retries with backoff.
- :class:`AmbiguousSendError`: the request may have reached the provider (a read timeout after
  sending). Nothing is re-sent blindly: the next attempt asks the provider first (``find_sent``),
  and only a lookup that cannot tell leaves the outcome ``unknown``.
- :class:`PermanentSendError`: this recipient or message will never work on this channel (invalid
  address, opted out, 400). The step falls back to its next channel.
- :class:`ProviderConfigError`: our credentials or configuration are wrong (401/403). Loud, and
  retried until an operator fixes it, so no customer is silently skipped.
- :class:`RejectedSendError`: the provider refused this request as made (the agency answered 422)
  and no other channel can stand in. Retrying the same request cannot help: the run shows
  ``failed`` until an operator has looked and runs ``dunning retry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from models.policy import Channel


@dataclass(frozen=True)
class OutgoingMessage:
    """A message ready for a provider. ``reference`` is the ledger key, for provider metadata."""

    channel: Channel
    recipient: str  # email address, E.164 number, or the agency webhook URL
    body: str  # plain text (email text part, SMS text, words the call says)
    reference: str
    subject: str | None = None
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # email headers (List-Unsubscribe)
    twiml: str | None = None  # voice: the TwiML document the call plays
    payload: dict[str, Any] | None = None  # agency: the JSON document posted
    attachments: tuple[Attachment, ...] = ()  # email: files (the final notice letter)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    mime: str = "application/pdf"


class Sender(Protocol):
    """Sends one message on one channel; returns the provider's message id."""

    provider: str

    def send(self, message: OutgoingMessage) -> str: ...

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        """The provider's id of this message if it accepted it at or after ``since`` (an earlier
        attempt was cut off), None if it has none; AmbiguousSendError if it cannot tell."""
        ...


class SendError(Exception):
    """Base of the classified delivery failures."""

    def __init__(self, reason: str, *, status: int | None = None, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code


class RetryableSendError(SendError):
    """Not accepted by the provider; safe to try again later."""

    def __init__(self, reason: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(reason, **kw)
        self.retry_after = retry_after


class AmbiguousSendError(SendError):
    """The provider may or may not have accepted the message."""


class PermanentSendError(SendError):
    """Never deliverable on this channel to this recipient. ``opted_out``: the recipient said STOP."""

    def __init__(self, reason: str, *, opted_out: bool = False, **kw: Any) -> None:
        super().__init__(reason, **kw)
        self.opted_out = opted_out


class ProviderConfigError(SendError):
    """Our side is misconfigured (credentials, sender identity, account permissions)."""


class RejectedSendError(SendError):
    """The provider refused this request as made; only an operator can settle it."""
