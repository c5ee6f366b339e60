"""Choosing the sender behind each channel from the settings: the outbox, or the live providers."""

from __future__ import annotations

from sqlalchemy import Engine

from activities.channels import Sender
from activities.outbox import OutboxSender
from models.policy import Channel
from settings import DeliveryMode, Settings


def build_senders(settings: Settings, engine: Engine) -> dict[Channel, Sender]:
    """One sender per channel. Settings and the worker refuse to start with a credential missing."""
    if settings.delivery is DeliveryMode.OUTBOX:
        outbox = OutboxSender(engine)
        return dict.fromkeys(Channel, outbox)

    from activities.agency import AgencyWebhookSender
    from activities.sendgrid_email import SendGridEmailSender
    from activities.twilio_phone import TwilioSmsSender, TwilioVoiceSender

    assert settings.sendgrid_api_key and settings.twilio_auth_token
    assert settings.twilio_account_sid and settings.twilio_from_number
    timeout = settings.provider_timeout_seconds
    twilio = {
        "account_sid": settings.twilio_account_sid,
        "auth_token": settings.twilio_auth_token.get_secret_value(),
        "from_number": settings.twilio_from_number,
        "base_url": settings.twilio_base_url,
        "timeout": timeout,
        "status_callback": settings.twilio_status_link(),
    }
    senders: dict[Channel, Sender] = {
        Channel.EMAIL: SendGridEmailSender(
            api_key=settings.sendgrid_api_key.get_secret_value(), from_email=settings.email_from,
            base_url=settings.sendgrid_base_url, timeout=timeout,
        ),
        Channel.SMS: TwilioSmsSender(**twilio),
        Channel.VOICE: TwilioVoiceSender(**twilio),
    }
    if settings.agency_webhook_url and settings.agency_webhook_secret:
        senders[Channel.AGENCY] = AgencyWebhookSender(
            url=settings.agency_webhook_url,
            secret=settings.agency_webhook_secret.get_secret_value(), timeout=timeout,
        )
    return senders
