"""SMS and calls through the Twilio SDK, with every failure classified for the delivery activity.

Twilio takes no idempotency key, so a text or call whose request went out but whose answer never
came back may or may not exist. Two things keep that from turning into a second text or call:

- transport failures are split by what they prove. A refused connection, a failed DNS lookup or a
  connect timeout means the request never left: retrying is safe. A read timeout or a connection
  dropped after the request was written means Twilio may have accepted it: that is ambiguous, and
  the delivery activity does not re-send blindly.
- :meth:`find_sent` asks Twilio what it really accepted, so a later attempt can reconcile instead
  of guessing.

Every reason text goes through :func:`activities.redact.redact`: Twilio echoes phone numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from activities.channels import (
    AmbiguousSendError,
    OutgoingMessage,
    PermanentSendError,
    ProviderConfigError,
    RetryableSendError,
    SendError,
)
from activities.redact import redact
from activities.transport import classify_transport, describe

OPTED_OUT = 21610
# The recipient cannot get this: invalid number, landline for SMS, region not enabled, blocked.
PERMANENT = {21211, 21214, 21217, 21407, 21408, 21608, 21612, 21614, 30003, 30005, 30006}
RETRYABLE = {20429, 21611, 20500, 20503}  # rate limited, queue full, Twilio-side trouble
CONFIGURATION = {20003, 20005, 20008, 21212, 21606}  # credentials, account, our From number

# Our clock and Twilio's disagree a little; a record this much older than ``since`` still counts.
CLOCK_SKEW = timedelta(seconds=120)
# How many of the newest records to a number are read to find ones Twilio has not sent yet.
RECENT = 20


class _TwilioSender:
    provider = "twilio"

    def __init__(self, *, account_sid: str, auth_token: str, from_number: str,
                 base_url: str | None = None, timeout: float = 10.0,
                 status_callback: str | None = None) -> None:
        self.from_number = from_number
        # Where Twilio reports the message's or call's fate (an SMS undelivered, a call unanswered).
        self.status_callback = status_callback
        # A non-empty environment mapping keeps TWILIO_EDGE/TWILIO_REGION from the process
        # environment out (they rewrite hosts); an empty one would fall back to os.environ.
        self.client = Client(account_sid, auth_token,
                             environment={"TWILIO_EDGE": "", "TWILIO_REGION": ""},
                             http_client=TwilioHttpClient(timeout=timeout))
        if base_url:
            self.client.api.base_url = base_url.rstrip("/")

    def _call(self, create: Callable[..., Any], message: OutgoingMessage, **kwargs: Any) -> str:
        if self.status_callback:
            kwargs["status_callback"] = self.status_callback
        try:
            return str(create(from_=self.from_number, to=message.recipient, **kwargs).sid)
        except TwilioException as err:
            raise classify(err, message.recipient) from err
        except requests.RequestException as err:
            raise classify_transport(err, "twilio", "accepted it", message.recipient) from err

    def _records(self, list_records: Callable[..., list[Any]], message: OutgoingMessage,
                 **filters: Any) -> list[Any]:
        """One list lookup of what we sent to this recipient from our number.

        A lookup changes nothing at Twilio, so any transport failure is simply retryable; an HTTP
        error is classified, except that it can never make the message permanently undeliverable.
        """
        try:
            return list_records(to=message.recipient, from_=self.from_number, **filters)
        except TwilioException as err:
            raise classify_lookup(err, message.recipient) from err
        except requests.RequestException as err:
            reason = f"twilio lookup failed, nothing was changed: {describe(err)}"
            raise RetryableSendError(redact(reason, message.recipient)) from err

    def _ours_since(self, records: list[Any], since: datetime) -> list[Any]:
        """Records from our number created at or after ``since`` minus the clock skew.

        Twilio's date filters are documented to compare whole days, so the server-side filter
        only narrows the search; this is the precise cut. A record without any date (never seen
        in practice) is kept: ignoring it could mean sending twice.
        """
        floor = _utc(since) - CLOCK_SKEW
        kept: list[Any] = []
        seen: set[str] = set()
        for record in records:
            when = _first_date(record)
            if record.sid in seen or _sender_of(record) != self.from_number:
                continue
            if when is None or when >= floor:
                kept.append(record)
                seen.add(record.sid)
        return kept


class TwilioSmsSender(_TwilioSender):
    """Sends a text message; returns the message SID."""

    def send(self, message: OutgoingMessage) -> str:
        return self._call(self.client.messages.create, message, body=message.body)

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        """The SID of a text Twilio accepted for ``message`` at or after ``since``, else None.

        Asked after an attempt died while calling Twilio. A text to this number from our number
        with exactly this body is that attempt's. Texts to the number but none with this body
        cannot be told apart from a send Twilio rewrote (a trial-account prefix, a changed
        encoding), so that is :class:`AmbiguousSendError`, for an operator, rather than a guess.

        Two lookups: ``DateSent>=`` finds every text already handed to the carrier, and the newest
        texts to the number find one still queued (a queued text has no ``date_sent`` yet, so the
        date filter hides it; a long-code backlog can hold texts for hours).
        """
        floor = _utc(since) - CLOCK_SKEW
        found = self._ours_since(
            self._records(self.client.messages.list, message, date_sent_after=floor), since)
        match = _same_body(found, message.body)
        if match is None:
            found = self._ours_since(
                found + self._records(self.client.messages.list, message, limit=RECENT), since)
            match = _same_body(found, message.body)
        if match is not None:
            return str(match.sid)
        if found:
            raise AmbiguousSendError(
                f"twilio shows {len(found)} text(s) to this number since the attempt started but "
                "none with this body; cannot tell whether this one was sent")
        return None


class TwilioVoiceSender(_TwilioSender):
    """Places a call that plays the message's TwiML; returns the call SID."""

    def send(self, message: OutgoingMessage) -> str:
        return self._call(self.client.calls.create, message, twiml=message.twiml)

    def find_sent(self, message: OutgoingMessage, since: datetime) -> str | None:
        """The SID of a call Twilio accepted to this number from ours at or after ``since``.

        A call has no body to compare, and a step places one call, so any call from our number
        to the recipient in the window is the one an earlier attempt placed. ``StartTime>=``
        finds calls that were dialled; the newest calls to the number find one still queued
        (Twilio dials one call per second per account; a queued call has no start time yet).
        """
        floor = _utc(since) - CLOCK_SKEW
        found = self._ours_since(
            self._records(self.client.calls.list, message, start_time_after=floor), since)
        if not found:
            found = self._ours_since(
                self._records(self.client.calls.list, message, limit=RECENT), since)
        return str(found[0].sid) if found else None


def classify(err: TwilioException, *secrets: str | None) -> SendError:
    """Map a Twilio API error to the delivery outcome; the reason text is redacted."""
    status, code, text = _details(err, secrets)
    if code == OPTED_OUT:
        return PermanentSendError(text, opted_out=True, status=status, code=code)
    if code in PERMANENT:
        return PermanentSendError(text, status=status, code=code)
    if status in (401, 403) or code in CONFIGURATION:
        return ProviderConfigError(text, status=status, code=code)
    if status == 429 or status >= 500 or code in RETRYABLE or status == 0:
        return RetryableSendError(text, status=status, code=code)
    return PermanentSendError(text, status=status, code=code)


def classify_lookup(err: TwilioException, *secrets: str | None) -> SendError:
    """Like :func:`classify`, for a list request: a refused lookup says nothing about the recipient.

    429/5xx: retry; 401/403: our credentials. Any other refusal (a 400 or 404 on a list) means we
    cannot find out what was sent, which is exactly the undecidable case: ambiguous.
    """
    outcome = classify(err, *secrets)
    if isinstance(outcome, RetryableSendError | ProviderConfigError):
        return outcome
    return AmbiguousSendError(f"lookup refused, cannot tell what was sent: {outcome.reason}",
                              status=outcome.status, code=outcome.code)


def _details(err: TwilioException, secrets: tuple[str | None, ...]) -> tuple[int, int | None, str]:
    """Status, Twilio error code and a redacted text from any of the SDK's error shapes.

    ``TwilioRestException`` and ``TwilioServiceException`` carry them as attributes; a failed
    list page raises a plain ``TwilioException("Unable to fetch page", response)`` where they are
    only in the response.
    """
    status = int(getattr(err, "status", 0) or 0)
    code = getattr(err, "code", None)
    detail = getattr(err, "msg", None) or getattr(err, "detail", None) or getattr(err, "title", "")
    response = err.args[1] if len(err.args) > 1 else None
    if not status and response is not None and hasattr(response, "status_code"):
        status = int(response.status_code or 0)
        try:
            payload = json.loads(response.text or "{}")
        except ValueError:
            payload = {}
        if isinstance(payload, dict):
            code = code or payload.get("code")
            detail = payload.get("message") or detail
        detail = detail or str(err.args[0])
    code = int(code) if isinstance(code, int | str) and str(code).isdigit() else None
    text = f"twilio {status}" + (f" ({code})" if code else "") + (f": {detail}" if detail else "")
    return status, code, redact(text, *secrets)


def _sender_of(record: Any) -> str | None:
    """The From number: the SDK names it ``from_`` on messages but ``_from`` on calls."""
    return getattr(record, "from_", None) or getattr(record, "_from", None)


def _same_body(records: list[Any], body: str) -> Any | None:
    return next((record for record in records if record.body == body), None)


def _first_date(record: Any) -> datetime | None:
    for name in ("date_created", "date_sent", "start_time"):
        value = getattr(record, name, None)
        if isinstance(value, datetime):
            return _utc(value)
    return None


def _utc(moment: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already (as the ledger stores it)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
