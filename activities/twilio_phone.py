"""SMS and calls through the Twilio SDK, with every failure classified for the delivery activity."""

from __future__ import annotations

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
)

OPTED_OUT = 21610
# The recipient cannot get this: invalid number, landline for SMS, region not enabled, blocked.
PERMANENT = {21211, 21214, 21217, 21407, 21408, 21608, 21612, 21614, 30003, 30005, 30006}
RETRYABLE = {20429, 21611, 20500, 20503}  # rate limited, queue full, Twilio-side trouble
CONFIGURATION = {20003, 20005, 20008, 21212, 21606}  # credentials, account, our From number


class _TwilioSender:
    provider = "twilio"

    def __init__(self, *, account_sid: str, auth_token: str, from_number: str,
                 base_url: str | None = None, timeout: float = 10.0) -> None:
        self.from_number = from_number
        # A non-empty environment mapping keeps TWILIO_EDGE/TWILIO_REGION from the process
        # environment out (they rewrite hosts); an empty one would fall back to os.environ.
        self.client = Client(account_sid, auth_token,
                             environment={"TWILIO_EDGE": "", "TWILIO_REGION": ""},
                             http_client=TwilioHttpClient(timeout=timeout))
        if base_url:
            self.client.api.base_url = base_url.rstrip("/")

    def _call(self, create: Any, **kwargs: Any) -> str:
        try:
            return create(from_=self.from_number, **kwargs).sid
        except TwilioException as err:
            raise classify(err) from err
        except requests.ReadTimeout as err:
            raise AmbiguousSendError(f"twilio did not answer in time: {err}") from err
        except (requests.ConnectionError, requests.ConnectTimeout) as err:
            raise RetryableSendError(f"twilio unreachable: {err.__class__.__name__}") from err


class TwilioSmsSender(_TwilioSender):
    """Sends a text message; returns the message SID."""

    def send(self, message: OutgoingMessage) -> str:
        return self._call(self.client.messages.create, to=message.recipient, body=message.body)


class TwilioVoiceSender(_TwilioSender):
    """Places a call that plays the message's TwiML; returns the call SID."""

    def send(self, message: OutgoingMessage) -> str:
        return self._call(self.client.calls.create, to=message.recipient, twiml=message.twiml)


def classify(err: TwilioException) -> Exception:
    status = int(getattr(err, "status", 0) or 0)
    code = getattr(err, "code", None)
    detail = getattr(err, "msg", None) or getattr(err, "detail", None) or getattr(err, "title", "")
    text = f"twilio {status}" + (f" ({code})" if code else "") + (f": {detail}" if detail else "")
    if code == OPTED_OUT:
        return PermanentSendError(text, opted_out=True, status=status, code=code)
    if code in PERMANENT:
        return PermanentSendError(text, status=status, code=code)
    if status in (401, 403) or code in CONFIGURATION:
        return ProviderConfigError(text, status=status, code=code)
    if status == 429 or status >= 500 or code in RETRYABLE or status == 0:
        return RetryableSendError(text, status=status, code=code)
    return PermanentSendError(text, status=status, code=code)
