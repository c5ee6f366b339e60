"""Live delivery through the real SendGrid and Twilio SDKs, against a local fake provider."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.client import RemoteDisconnected
from pathlib import Path

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NameResolutionError, ProtocolError

from activities.agency import AgencyWebhookSender, verify
from activities.channels import (
    AmbiguousSendError,
    OutgoingMessage,
    PermanentSendError,
    ProviderConfigError,
    RejectedSendError,
    RetryableSendError,
    SendError,
)
from activities.outbox import OutboxSender
from activities.redact import REDACTED, redact
from activities.sendgrid_email import SendGridEmailSender
from activities.transport import classify_transport
from activities.twilio_phone import CLOCK_SKEW, TwilioSmsSender, TwilioVoiceSender
from devserver import free_port as closed_port
from models.database import prepare
from models.policy import Channel
from settings import DeliveryMode, Settings
from tests.conftest import running, sample_invoice
from tests.fakeprovider import FakeProvider

SID = "AC" + "0" * 32

EMAIL = OutgoingMessage(
    channel=Channel.EMAIL, recipient="ada@example.com", subject="Invoice INV-1 is past due",
    body="Please pay.\n\nReply unsubscribe to stop.", html="<p>Please pay.</p>",
    headers={"List-Unsubscribe": "<mailto:billing@example.com?subject=unsubscribe>"},
    reference="INV-1/friendly_reminder/email",
)
SMS = OutgoingMessage(channel=Channel.SMS, recipient="+14155550100",
                      body="Invoice INV-1 is overdue. Reply STOP to opt out.",
                      reference="INV-1/sms_reminder/sms")
CALL = OutgoingMessage(channel=Channel.VOICE, recipient="+14155550100", body="words",
                       twiml="<Response><Say>Pay</Say><Gather numDigits=\"1\"><Say>press 1</Say>"
                             "</Gather></Response>", reference="INV-1/phone_call/voice")


def sendgrid(fake: FakeProvider, timeout: float = 5.0) -> SendGridEmailSender:
    return SendGridEmailSender(api_key="SG.test-key", from_email="billing@example.com",
                               base_url=fake.url, timeout=timeout)


def twilio(fake: FakeProvider, kind: type = TwilioSmsSender, timeout: float = 5.0):
    return kind(account_sid=SID, auth_token="secret-token", from_number="+15005550006",
                base_url=fake.url, timeout=timeout)


def test_sendgrid_request_carries_the_rendered_message(fake_provider: FakeProvider):
    fake_provider.script("/mail/send", 202, b"", {"X-Message-Id": "sg-abc"})
    assert sendgrid(fake_provider).send(EMAIL) == "sg-abc"
    [request] = fake_provider.to("/v3/mail/send")
    assert request.headers["Authorization"] == "Bearer SG.test-key"
    mail = request.json
    assert mail["from"]["email"] == "billing@example.com"
    assert mail["personalizations"][0]["to"][0]["email"] == "ada@example.com"
    assert mail["subject"] == "Invoice INV-1 is past due"
    assert {c["type"]: c["value"] for c in mail["content"]} == {
        "text/plain": EMAIL.body, "text/html": "<p>Please pay.</p>"}
    assert mail["headers"]["List-Unsubscribe"] == EMAIL.headers["List-Unsubscribe"]
    assert mail["custom_args"]["dunning_ref"] == EMAIL.reference
    invoice_id, step, _channel = EMAIL.reference.split("/")
    assert mail["custom_args"]["dunning_invoice"] == invoice_id  # webhook events find their invoice
    assert mail["custom_args"]["dunning_step"] == step


@pytest.mark.parametrize(("status", "body", "expected"), [
    (429, {"errors": [{"message": "too many requests"}]}, RetryableSendError),
    (500, None, RetryableSendError),
    (502, None, RetryableSendError),
    (503, None, RetryableSendError),
    (400, {"errors": [{"message": "Does not contain a valid address."}]}, PermanentSendError),
    (413, None, PermanentSendError),
    (401, {"errors": [{"message": "bad key"}]}, ProviderConfigError),
    (403, None, ProviderConfigError),
])
def test_sendgrid_failures_are_classified(fake_provider: FakeProvider, status, body, expected):
    fake_provider.script("/mail/send", status, body)
    with pytest.raises(expected) as raised:
        sendgrid(fake_provider).send(EMAIL)
    assert raised.value.status == status
    if status == 400:
        assert "Does not contain a valid address." in raised.value.reason


def test_sendgrid_unreachable_is_retryable():
    sender = SendGridEmailSender(api_key="k", from_email="b@example.com",
                                 base_url=f"http://127.0.0.1:{closed_port()}", timeout=2)
    with pytest.raises(RetryableSendError):
        sender.send(EMAIL)


def test_twilio_sms_request_and_sid(fake_provider: FakeProvider):
    sid = twilio(fake_provider).send(SMS)
    assert sid.startswith("SM")
    [request] = fake_provider.to("/Messages.json")
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request.headers["Authorization"].startswith("Basic ")
    assert request.form == {"To": "+14155550100", "From": "+15005550006", "Body": SMS.body}


def test_twilio_call_plays_twiml_with_gather(fake_provider: FakeProvider):
    sid = twilio(fake_provider, TwilioVoiceSender).send(CALL)
    assert sid.startswith("CA")
    [request] = fake_provider.to("/Calls.json")
    assert "<Gather" in request.form["Twiml"] and "<Say>" in request.form["Twiml"]


def twilio_error(code: int, status: int = 400) -> dict:
    return {"code": code, "message": f"error {code}", "status": status,
            "more_info": f"https://www.twilio.com/docs/errors/{code}"}


@pytest.mark.parametrize(("status", "code", "expected"), [
    (400, 21211, PermanentSendError),  # invalid To
    (400, 21614, PermanentSendError),  # not a mobile number
    (400, 21408, PermanentSendError),  # region not enabled
    (429, 20429, RetryableSendError),
    (503, None, RetryableSendError),
    (401, 20003, ProviderConfigError),
])
def test_twilio_failures_are_classified(fake_provider: FakeProvider, status, code, expected):
    fake_provider.script("/Messages.json", status, twilio_error(code, status) if code else None)
    with pytest.raises(expected) as raised:
        twilio(fake_provider).send(SMS)
    assert raised.value.status == status
    if code:
        assert raised.value.code == code


def test_twilio_opt_out_is_permanent_and_marked(fake_provider: FakeProvider):
    fake_provider.script("/Messages.json", 400, twilio_error(21610))
    with pytest.raises(PermanentSendError) as raised:
        twilio(fake_provider).send(SMS)
    assert raised.value.opted_out and raised.value.code == 21610


def test_twilio_timeout_after_sending_is_ambiguous(fake_provider: FakeProvider):
    fake_provider.script("/Messages.json", 201, {"sid": "SMlate"}, delay=1.5)
    with pytest.raises(AmbiguousSendError):
        twilio(fake_provider, timeout=0.5).send(SMS)


def test_twilio_environment_edge_cannot_redirect(fake_provider: FakeProvider, monkeypatch):
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    monkeypatch.setenv("TWILIO_REGION", "au1")
    assert twilio(fake_provider).send(SMS).startswith("SM")


def agency_message() -> OutgoingMessage:
    return OutgoingMessage(channel=Channel.AGENCY, recipient="", body="", reference="INV-1/agency",
                           payload={"event": "account.referred", "invoice_id": "INV-1"})


def test_agency_post_is_signed_and_idempotent(fake_provider: FakeProvider):
    sender = AgencyWebhookSender(url=f"{fake_provider.url}/handoff", secret="s3cret")
    assert sender.send(agency_message()).startswith("agency-")
    [request] = fake_provider.to("/handoff")
    timestamp = request.headers["X-Dunning-Timestamp"]
    assert verify("s3cret", timestamp, request.body, request.headers["X-Dunning-Signature"])
    assert not verify("s3cret", timestamp, request.body + b" ", request.headers["X-Dunning-Signature"])
    assert not verify("other", timestamp, request.body, request.headers["X-Dunning-Signature"])
    # a request captured and replayed later is refused, though its signature is right
    later = int(timestamp) + 301
    assert not verify("s3cret", timestamp, request.body, request.headers["X-Dunning-Signature"], now=later)
    assert verify("s3cret", timestamp, request.body, request.headers["X-Dunning-Signature"], now=later - 2)
    assert request.headers["Idempotency-Key"] == "INV-1/agency"
    assert json.loads(request.body)["event"] == "account.referred"


def test_an_agency_url_that_redirects_is_a_configuration_error_not_a_handoff(fake_provider: FakeProvider):
    """Followed, the redirect turned the POST into a GET without the document, and the page it
    led to answered 200: the handoff counted as made though the agency never got the account."""
    fake_provider.script("/handoff", 301, headers={"Location": f"{fake_provider.url}/new-handoff"})
    fake_provider.script("/new-handoff", 200, {"id": "home-page"}, method="GET")
    with pytest.raises(ProviderConfigError) as raised:
        AgencyWebhookSender(url=f"{fake_provider.url}/handoff", secret="s").send(agency_message())
    assert "redirects to" in raised.value.reason and "/new-handoff" in raised.value.reason
    assert not fake_provider.to("/new-handoff", method=None)


@pytest.mark.parametrize(("status", "expected"), [
    (503, RetryableSendError), (429, RetryableSendError), (409, RetryableSendError),
    (401, ProviderConfigError), (404, ProviderConfigError),
    (400, RejectedSendError), (422, RejectedSendError),
])
def test_agency_failures_are_retried_or_loud_or_left_to_an_operator(fake_provider: FakeProvider, status,
                                                                      expected):
    """Busy or down: retried. Our URL or secret wrong: retried loudly until fixed. The document
    refused (400, 422): posting it again cannot help, so an operator must look."""
    fake_provider.script("/handoff", status, {"error": "no such debtor field"})
    with pytest.raises(SendError) as raised:
        AgencyWebhookSender(url=f"{fake_provider.url}/handoff", secret="s").send(agency_message())
    assert type(raised.value) is expected
    if expected is RejectedSendError:
        assert f"{status}" in raised.value.reason and "no such debtor field" in raised.value.reason


def test_an_agency_refusal_quoting_the_account_is_masked_before_it_is_cut(fake_provider: FakeProvider):
    """The agency quotes back the JSON we sent: the customer's details are masked in their JSON
    escaping too, and masked before the answer is cut, so no half of an address survives."""
    customer = {"id": "C-1", "name": "Zoë Ångström", "email": "zoe.angstrom@example.com",
                "phone": "+14155550100"}
    message = replace(agency_message(), payload={"event": "account.referred", "customer": customer})
    for pad in range(180, 240, 7):  # the address falls across the cut somewhere here
        quoted = "x" * pad + json.dumps({"customer": customer})
        fake_provider.script("/handoff", 422, {"error": quoted})
        with pytest.raises(RejectedSendError) as raised:
            AgencyWebhookSender(url=f"{fake_provider.url}/handoff", secret="s").send(message)
        reason = raised.value.reason
        assert reason.startswith("agency refused the request: 422") and len(reason) <= 240
        assert "zoe" not in reason.lower() and "\\u00eb" not in reason and "1415555" not in reason, reason


def live_settings(settings: Settings, fake: FakeProvider) -> Settings:
    """Live delivery with every provider pointed at the fake; validated like the real thing."""
    return Settings(
        database_url=settings.database_url, task_queue=settings.task_queue,
        policy_file=settings.policy_file, delivery=DeliveryMode.LIVE, sendgrid_api_key="SG.k",
        sendgrid_base_url=fake.url,
        twilio_account_sid=SID, twilio_auth_token="t", twilio_from_number="+15005550006",
        twilio_base_url=fake.url, agency_webhook_url=f"{fake.url}/handoff",
        agency_webhook_secret="agency-secret-0123456789",
    )


async def test_live_escalation_reaches_every_provider_once(time_env, settings, fake_provider):
    """The whole standard escalation in live mode: SendGrid, Twilio SMS and call, the agency."""
    live = live_settings(settings, fake_provider)
    # the first SMS attempt is rate limited: Temporal retries it, and it is sent once
    fake_provider.script("/Messages.json", 429, twilio_error(20429, 429))
    async with running(time_env, live) as harness:
        invoice = sample_invoice()
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=61))
        await harness.dunning.pay(invoice["invoice_id"], "1250.00", payment_id="collected")
        await harness.finish(handle)
        deliveries = {(d.step, d.channel): d for d in harness.ledger.deliveries(invoice["invoice_id"])}
    assert len(fake_provider.to("/v3/mail/send")) == 2  # day 1 reminder + referral notice
    assert len(fake_provider.to("/Messages.json")) == 2  # one 429, then the one sent
    assert len(fake_provider.to("/Calls.json")) == 1
    assert [json.loads(r.body)["event"] for r in fake_provider.to("/handoff")] == [
        "account.referred", "account.payment"]
    assert deliveries[("sms_reminder", "sms")].provider_message_id.startswith("SM")
    assert deliveries[("sms_reminder", "sms")].attempts == 2
    assert deliveries[("phone_call", "voice")].provider_message_id.startswith("CA")
    assert deliveries[("friendly_reminder", "email")].provider_message_id.startswith("sg-")


async def test_live_invalid_number_falls_back_to_email(time_env, settings, fake_provider):
    live = live_settings(settings, fake_provider)
    fake_provider.script("/Messages.json", 400, twilio_error(21211))
    async with running(time_env, live) as harness:
        invoice = sample_invoice()
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=16))
        await harness.dunning.cancel(invoice["invoice_id"], "test over")
        await harness.finish(handle)
        statuses = {(d.step, d.channel): d.status for d in harness.ledger.deliveries(invoice["invoice_id"])}
        trail = harness.trail(invoice["invoice_id"])
    assert statuses[("sms_reminder", "sms")] == "failed"
    assert statuses[("sms_reminder", "email")] == "sent"
    assert ("communication", "failed", "sms_reminder", "sms") in trail
    assert len(fake_provider.to("/Messages.json")) == 1  # a permanent failure is not retried


# --- reconciliation: what did Twilio really accept? ------------------------------------------

PHONE = SMS.recipient


def now() -> datetime:
    return datetime.now(UTC)


def other(message: OutgoingMessage, **changes: str) -> OutgoingMessage:
    return replace(message, **changes)


def test_sms_find_sent_returns_the_text_accepted_earlier(fake_provider: FakeProvider):
    sender = twilio(fake_provider)
    since = now()
    sid = sender.send(SMS)
    assert sender.find_sent(SMS, since) == sid
    [lookup] = fake_provider.to("/Messages.json", method="GET")
    # the SDK's date_sent_after is Twilio's DateSent>= filter, narrowed server-side by day
    assert lookup.query["To"] == PHONE and lookup.query["From"] == "+15005550006"
    assert lookup.query["DateSent>"].startswith((since - CLOCK_SKEW).strftime("%Y-%m-%d"))
    assert len(fake_provider.to("/Messages.json")) == 1  # the lookup sent nothing


def test_sms_find_sent_none_when_nothing_went_to_that_number(fake_provider: FakeProvider):
    since = now()
    assert twilio(fake_provider).find_sent(SMS, since) is None
    twilio(fake_provider).send(other(SMS, recipient="+14155550199"))  # another customer
    TwilioSmsSender(account_sid=SID, auth_token="t", from_number="+15005550009",
                    base_url=fake_provider.url).send(SMS)  # same customer, not from our number
    assert twilio(fake_provider).find_sent(SMS, since) is None


def test_sms_find_sent_ambiguous_when_another_text_went_to_that_number(
        fake_provider: FakeProvider):
    since = now()
    twilio(fake_provider).send(other(SMS, body="Invoice INV-2 is overdue."))
    with pytest.raises(AmbiguousSendError) as raised:
        twilio(fake_provider).find_sent(SMS, since)
    assert "cannot tell" in raised.value.reason
    assert PHONE not in raised.value.reason


def test_sms_find_sent_ignores_texts_before_the_skew_window(fake_provider: FakeProvider):
    since = now()
    sender = twilio(fake_provider)
    fake_provider.clock = lambda: since - CLOCK_SKEW - timedelta(seconds=30)
    sender.send(SMS)  # the same text, but from before this attempt's window
    fake_provider.clock = lambda: since - timedelta(days=3)
    sender.send(other(SMS, body="older, different"))  # hidden by Twilio's DateSent filter
    assert sender.find_sent(SMS, since) is None
    fake_provider.clock = lambda: since - CLOCK_SKEW + timedelta(seconds=30)
    sid = sender.send(SMS)  # our clock ahead of Twilio's by 90 s: still this attempt's
    assert sender.find_sent(SMS, since) == sid


def test_sms_find_sent_sees_a_text_still_queued(fake_provider: FakeProvider):
    """A queued text has no date_sent, so Twilio's DateSent filter hides it; it still counts."""
    fake_provider.keep_queued = True
    since = now()
    sid = twilio(fake_provider).send(SMS)
    assert twilio(fake_provider).find_sent(SMS, since) == sid
    assert [r.query.get("DateSent>") is None for r in fake_provider.to("/Messages", "GET")] == [
        False, True]


def test_call_find_sent_returns_the_call_placed_earlier(fake_provider: FakeProvider):
    sender = twilio(fake_provider, TwilioVoiceSender)
    since = now()
    assert sender.find_sent(CALL, since) is None
    sid = sender.send(CALL)
    assert sender.find_sent(CALL, since) == sid
    lookup = fake_provider.to("/Calls.json", method="GET")[-1]
    assert lookup.query["To"] == PHONE and "StartTime>" in lookup.query
    assert sender.find_sent(other(CALL, recipient="+14155550199"), since) is None


def test_call_find_sent_ignores_calls_before_the_window_and_sees_queued_ones(
        fake_provider: FakeProvider):
    sender = twilio(fake_provider, TwilioVoiceSender)
    since = now()
    fake_provider.clock = lambda: since - CLOCK_SKEW - timedelta(seconds=1)
    sender.send(CALL)
    assert sender.find_sent(CALL, since) is None
    fake_provider.clock = lambda: since
    fake_provider.keep_queued = True  # not dialled yet: no start_time
    sid = sender.send(CALL)
    assert sender.find_sent(CALL, since) == sid


@pytest.mark.parametrize("kind", [TwilioSmsSender, TwilioVoiceSender])
@pytest.mark.parametrize(("status", "code", "expected"), [
    (500, None, RetryableSendError),
    (429, 20429, RetryableSendError),
    (401, 20003, ProviderConfigError),
    (404, 20404, AmbiguousSendError),  # a refused lookup is never "the recipient is invalid"
])
def test_find_sent_lookup_failures_are_classified(fake_provider: FakeProvider, kind, status, code,
                                                  expected):
    path = "/Messages.json" if kind is TwilioSmsSender else "/Calls.json"
    fake_provider.script(path, status, twilio_error(code, status) if code else None, method="GET")
    message = SMS if kind is TwilioSmsSender else CALL
    with pytest.raises(expected) as raised:
        twilio(fake_provider, kind).find_sent(message, now())
    assert raised.value.status == status


@pytest.mark.parametrize(("kind", "path", "message"), [
    (TwilioSmsSender, "/Messages.json", SMS), (TwilioVoiceSender, "/Calls.json", CALL)])
def test_twilio_connection_dropped_after_post_is_ambiguous_then_found(
        fake_provider: FakeProvider, kind, path, message):
    since = now()
    fake_provider.script(path, 0, drop=True)
    sender = twilio(fake_provider, kind)
    with pytest.raises(AmbiguousSendError) as raised:
        sender.send(message)
    assert isinstance(raised.value.__cause__, requests.ConnectionError)
    [accepted] = fake_provider.accepted("messages" if kind is TwilioSmsSender else "calls")
    assert sender.find_sent(message, since) == accepted["sid"]


def test_twilio_late_answer_is_kept_from_arrival(fake_provider: FakeProvider):
    since = now()
    fake_provider.script("/Messages.json", 201, {"sid": "SMlate"}, delay=1.0)
    sender = twilio(fake_provider, timeout=0.3)
    with pytest.raises(AmbiguousSendError):
        sender.send(SMS)
    assert sender.find_sent(SMS, since) == "SMlate"  # listed before Twilio even answered


def test_twilio_refused_connection_is_retryable_for_send_and_lookup():
    url = f"http://127.0.0.1:{closed_port()}"
    for kind, message in ((TwilioSmsSender, SMS), (TwilioVoiceSender, CALL)):
        sender = kind(account_sid=SID, auth_token="t", from_number="+15005550006", base_url=url,
                      timeout=2)
        with pytest.raises(RetryableSendError) as raised:
            sender.send(message)
        assert "nothing sent" in raised.value.reason
        with pytest.raises(RetryableSendError) as raised:
            sender.find_sent(message, now())
        assert PHONE not in raised.value.reason and "14155550100" not in raised.value.reason


def _wrapped(reason: Exception) -> requests.ConnectionError:
    return requests.ConnectionError(MaxRetryError(None, "/Messages.json?To=%2B14155550100", reason))


@pytest.mark.parametrize(("error", "expected"), [
    (requests.ConnectTimeout("connect timed out"), RetryableSendError),
    (_wrapped(NameResolutionError("api.twilio.com", None, OSError("no such host"))),
     RetryableSendError),
    (requests.ConnectionError(ProtocolError("Connection aborted.",
                                            ConnectionResetError(104, "reset"))),
     AmbiguousSendError),
    (requests.ConnectionError(ProtocolError("Connection aborted.", RemoteDisconnected("gone"))),
     AmbiguousSendError),
    (requests.ReadTimeout("read timed out"), AmbiguousSendError),
    (requests.exceptions.ChunkedEncodingError("cut off"), AmbiguousSendError),
])
def test_twilio_transport_failures_split_by_whether_the_request_left(error, expected):
    outcome = classify_transport(error, "twilio", "accepted it", PHONE)
    assert type(outcome) is expected
    assert "14155550100" not in outcome.reason


def test_twilio_error_text_does_not_keep_the_phone_number(fake_provider: FakeProvider):
    fake_provider.script("/Messages.json", 400, {
        "code": 21211, "status": 400,
        "message": "The 'To' number +14155550100 is not a valid phone number."})
    with pytest.raises(PermanentSendError) as raised:
        twilio(fake_provider).send(SMS)
    reason = raised.value.reason
    assert PHONE not in reason and "14155550100" not in reason
    assert "21211" in reason and "400" in reason and REDACTED in reason
    assert raised.value.code == 21211 and raised.value.status == 400


def test_sendgrid_error_text_does_not_keep_the_address(fake_provider: FakeProvider):
    fake_provider.script("/mail/send", 400, {"errors": [
        {"message": "The to address Ada@Example.com is invalid; see also ada.l@example.org",
         "field": "personalizations.0.to.0.email"}]})
    with pytest.raises(PermanentSendError) as raised:
        sendgrid(fake_provider).send(EMAIL)
    reason = raised.value.reason
    assert "example.com" not in reason.lower() and "ada.l@" not in reason
    assert reason.startswith("sendgrid 400") and REDACTED in reason


def test_sendgrid_no_answer_after_the_post_is_ambiguous(fake_provider: FakeProvider):
    fake_provider.script("/mail/send", 0, drop=True)
    with pytest.raises(AmbiguousSendError):
        sendgrid(fake_provider).send(EMAIL)
    fake_provider.script("/mail/send", 202, b"", delay=1.0)
    with pytest.raises(AmbiguousSendError) as raised:
        sendgrid(fake_provider, timeout=0.3).send(EMAIL)
    assert "ada@example.com" not in raised.value.reason


def test_sendgrid_and_agency_have_nothing_to_look_up(fake_provider: FakeProvider):
    assert sendgrid(fake_provider).find_sent(EMAIL, now()) is None
    agency = AgencyWebhookSender(url=f"{fake_provider.url}/handoff", secret="s")
    assert agency.find_sent(agency_message(), now()) is None
    assert fake_provider.requests == []


def test_agency_refused_is_retryable_but_timed_out_or_dropped_is_ambiguous(fake_provider: FakeProvider):
    """A refused connection sent nothing. A POST that went out unanswered may have handed the
    account over: ambiguous, so the run treats the agency as holding it; posting again is safe,
    the same Idempotency-Key and the same signed document each time."""
    refused = AgencyWebhookSender(url=f"http://127.0.0.1:{closed_port()}/handoff", secret="s")
    with pytest.raises(RetryableSendError):
        refused.send(agency_message())
    sender = AgencyWebhookSender(url=f"{fake_provider.url}/handoff", secret="s", timeout=0.3)
    fake_provider.script("/handoff", 0, drop=True)
    with pytest.raises(AmbiguousSendError):
        sender.send(agency_message())
    fake_provider.script("/handoff", 200, {"id": "agency-late"}, delay=1.0)
    with pytest.raises(AmbiguousSendError, match="ReadTimeout"):
        sender.send(agency_message())
    assert sender.send(agency_message()).startswith("agency-")
    posts = fake_provider.to("/handoff")
    assert len(posts) == 3
    assert {post.headers["Idempotency-Key"] for post in posts} == {"INV-1/agency"}
    assert len({post.body for post in posts}) == 1


def test_outbox_find_sent_by_reference(tmp_path: Path):
    outbox = OutboxSender(prepare(f"sqlite:///{tmp_path / 'outbox.db'}"))
    assert outbox.find_sent(SMS, now()) is None
    stored = outbox.send(SMS)
    assert outbox.find_sent(SMS, now() + timedelta(days=1)) == stored  # the reference decides
    assert outbox.find_sent(CALL, now()) is None


def test_fake_provider_counts_and_lists(fake_provider: FakeProvider):
    sms = twilio(fake_provider)
    sms.send(SMS)
    sms.send(other(SMS, recipient="+14155550199"))
    fake_provider.script("/Messages.json", 400, twilio_error(21211))
    with pytest.raises(PermanentSendError):
        sms.send(SMS)
    sendgrid(fake_provider).send(EMAIL)
    assert fake_provider.count_by_recipient("/Messages.json") == {PHONE: 2, "+14155550199": 1}
    assert fake_provider.count_by_recipient("/mail/send") == {"ada@example.com": 1}
    assert [m["to"] for m in fake_provider.accepted("messages", to=PHONE)] == [PHONE]  # not the 400
    assert len(sms.client.messages.list(page_size=1)) == 2  # paged like Twilio
    assert {r.method for r in fake_provider.requests} == {"GET", "POST"}


@pytest.mark.parametrize(("text", "secrets", "expected"), [
    ("The 'To' number +14155550100 is not a valid phone number", (),
     "The 'To' number [redacted] is not a valid phone number"),
    ("call +1 415-555-0100 or (415) 555-0100 or 14155550100", (),
     "call [redacted] or [redacted] or [redacted]"),
    ("bounce for Ada@Example.COM", ("ada@example.com",), "bounce for [redacted]"),
    ("url /Messages.json?To=%2B14155550100", ("+14155550100",), "url /Messages.json?To=[redacted]"),
    ("customer Ada Lovelace", ("ada lovelace",), "customer [redacted]"),
    ("twilio 400 (21211) see https://www.twilio.com/docs/errors/21211", (),
     "twilio 400 (21211) see https://www.twilio.com/docs/errors/21211"),
    ("sid SM0123456789abcdef0123456789abcdef at 2026-10-31T12:00:00Z", (),
     "sid SM0123456789abcdef0123456789abcdef at 2026-10-31T12:00:00Z"),
    ("", ("ada@example.com",), ""),
    ("nothing personal", (None, "", "  "), "nothing personal"),
])
def test_redact(text, secrets, expected):
    assert redact(text, *secrets) == expected

