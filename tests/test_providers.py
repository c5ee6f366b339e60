"""Live delivery through the real SendGrid and Twilio SDKs, against a local fake provider."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from activities.agency import AgencyWebhookSender, verify
from activities.channels import (
    AmbiguousSendError,
    OutgoingMessage,
    PermanentSendError,
    ProviderConfigError,
    RetryableSendError,
)
from activities.sendgrid_email import SendGridEmailSender
from activities.twilio_phone import TwilioSmsSender, TwilioVoiceSender
from devserver import free_port as closed_port
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
    assert request.headers["Idempotency-Key"] == "INV-1/agency"
    assert json.loads(request.body)["event"] == "account.referred"


@pytest.mark.parametrize(("status", "expected"), [
    (503, RetryableSendError), (429, RetryableSendError), (400, ProviderConfigError),
    (401, ProviderConfigError),
])
def test_agency_failures_are_retried_or_loud(fake_provider: FakeProvider, status, expected):
    fake_provider.script("/handoff", status, {"error": "x"})
    with pytest.raises(expected):
        AgencyWebhookSender(url=f"{fake_provider.url}/handoff", secret="s").send(agency_message())


def live_settings(settings: Settings, fake: FakeProvider) -> Settings:
    """Live delivery with every provider pointed at the fake; validated like the real thing."""
    return Settings(
        database_url=settings.database_url, task_queue=settings.task_queue,
        delivery=DeliveryMode.LIVE, sendgrid_api_key="SG.k", sendgrid_base_url=fake.url,
        twilio_account_sid=SID, twilio_auth_token="t", twilio_from_number="+15005550006",
        twilio_base_url=fake.url, agency_webhook_url=f"{fake.url}/handoff",
        agency_webhook_secret="s3cret",
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
