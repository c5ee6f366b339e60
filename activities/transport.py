"""Whether a failed HTTP request can have reached the provider: the one question that decides
between sending again and looking first.

Twilio and the agency webhook are plain HTTPS POSTs. A failure before any byte of the request was
written (refused, unresolvable, a failed certificate check, a connect timeout) proves nothing was
sent, so retrying is safe. Anything later (a read timeout, a reset, a cut-off answer) may follow
an accepted request: ambiguous, and the next attempt must not trust that nothing happened.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from activities.channels import AmbiguousSendError, ProviderConfigError, RetryableSendError, SendError
from activities.redact import redact

# Causes that prove the request never reached the provider: no connection was ever established.
_NEVER_SENT: tuple[type[BaseException], ...] = (
    NewConnectionError,  # refused, unreachable, name resolution failed (NameResolutionError)
    ConnectTimeoutError,
    ConnectionRefusedError,
    socket.gaierror,
    ssl.SSLCertVerificationError,  # the handshake failed before any request byte was written
)


def classify_transport(err: requests.RequestException, provider: str, maybe: str,
                       *secrets: str | None) -> SendError:
    """Split a failed request by whether it can have reached ``provider``.

    Retryable only when the failure proves nothing was sent. Ambiguous otherwise, with
    ``maybe`` saying what the provider may have done (``"accepted it"``). A request that could
    not even be built (an invalid URL, a missing schema) is our configuration's fault.
    """
    detail = describe(err)
    if isinstance(err, requests.ConnectTimeout) or (
            isinstance(err, requests.ConnectionError) and never_sent(err)):
        return RetryableSendError(redact(f"{provider} unreachable, nothing sent: {detail}", *secrets))
    if isinstance(err, requests.ConnectionError | requests.Timeout
                  | requests.exceptions.ChunkedEncodingError
                  | requests.exceptions.ContentDecodingError):
        return AmbiguousSendError(redact(f"{provider} may have {maybe}, no answer: {detail}", *secrets))
    return ProviderConfigError(redact(f"{provider} request could not be made: {detail}", *secrets))


def _causes(err: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: requests puts urllib3's error in ``args``, urllib3 its cause
    in ``reason``, Python in ``__cause__``. ``__context__`` is left out on purpose: an exception
    merely handled nearby proves nothing about this request."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(a for a in current.args if isinstance(a, BaseException))
        for linked in (getattr(current, "reason", None), current.__cause__):
            if isinstance(linked, BaseException):
                pending.append(linked)


def never_sent(err: BaseException) -> bool:
    """True when a cause of ``err`` proves no connection was ever established."""
    return any(isinstance(cause, _NEVER_SENT) for cause in _causes(err))


def describe(err: BaseException) -> str:
    """The class of the error and of its innermost cause, with that cause's own words.

    Not ``str(err)``: requests quotes the whole URL, whose query string may hold a phone number.
    """
    innermost = err
    for cause in _causes(err):
        innermost = cause
    if innermost is err:
        return err.__class__.__name__
    words = str(innermost)
    # urllib3 prefixes "<HTTPConnection object at 0x...>: " to connection errors.
    words = words.split(">: ", 1)[-1]
    return f"{err.__class__.__name__} ({innermost.__class__.__name__}: {words})"
