"""Settings shared by every entry point (CLI, worker, starter API).

They are read once, from the environment (prefix ``DUNNING_``, plus the providers' own variable
names), and passed down. Workflows never read them: anything a workflow needs arrives in its input.
"""

from __future__ import annotations

from email.utils import parseaddr
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.errors import reason

if TYPE_CHECKING:
    from activities.letter import Writer

ROOT = Path(__file__).resolve().parent
DEFAULT_STATE_DIR = Path(".dunning")


class DeliveryMode(StrEnum):
    """Where messages go: the local outbox table, or the real providers."""

    OUTBOX = "outbox"
    LIVE = "live"


class Settings(BaseSettings):
    """Configuration of one deployment. Every field maps to an environment variable."""

    # hide_input_in_errors: a refused setting must not print the database URL (its password)
    model_config = SettingsConfigDict(env_prefix="DUNNING_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "dunning"
    temporal_api_key: SecretStr | None = None
    temporal_tls_cert: Path | None = None
    temporal_tls_key: Path | None = None

    database_url: SecretStr = SecretStr(f"sqlite:///{DEFAULT_STATE_DIR / 'dunning.db'}")
    policy_file: Path = ROOT / "policies" / "default.toml"
    rates_file: Path = ROOT / "policies" / "rates.toml"  # reference rates for statutory interest
    templates_dir: Path = ROOT / "templates"

    delivery: DeliveryMode = DeliveryMode.OUTBOX
    email_from: str = "billing@example.com"
    company_name: str = "Example Billing"
    # The final notice letter: where to reply (an address or an email), and how to dispute.
    company_contact: str = ""
    dispute_contact: str = ""
    # a cease-communication hold sends the customer one confirmation that contact stops (false:
    # where local law does not allow even that)
    cease_confirmation: bool = True
    unsubscribe_url: str | None = Field(
        default=None,
        description="https URL for one-click unsubscribe; '{invoice_id}' is filled in.",
    )
    voice_action_url: str | None = Field(
        default=None,
        description="URL Twilio posts the caller's key press to ('press 1 for a pay link').",
    )
    sendgrid_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SENDGRID_API_KEY", "DUNNING_SENDGRID_API_KEY")
    )
    sendgrid_base_url: str | None = None
    twilio_account_sid: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TWILIO_ACCOUNT_SID", "DUNNING_TWILIO_ACCOUNT_SID"),
    )
    twilio_auth_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TWILIO_AUTH_TOKEN", "DUNNING_TWILIO_AUTH_TOKEN"),
    )
    twilio_from_number: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TWILIO_FROM_NUMBER", "DUNNING_TWILIO_FROM_NUMBER"),
    )
    twilio_base_url: str | None = None
    agency_webhook_url: str | None = None
    agency_webhook_secret: SecretStr | None = None
    provider_timeout_seconds: Annotated[float, Field(gt=0, le=20)] = 10.0
    pay_url_hosts: str = Field(
        default="", description="Comma-separated hosts a payment_url may point to (any when empty).",
    )
    payload_keys: SecretStr | None = Field(
        default=None,
        description="keyid:base64key,... (AES-256-GCM): encrypt workflow payloads; the first "
        "key encrypts, all decrypt.",
    )
    codec_token: SecretStr | None = Field(
        default=None, description="Bearer token the codec server requires (the UI sends it).",
    )
    codec_origins: str = "http://localhost:8233,http://127.0.0.1:8233"
    public_url: str | None = Field(
        default=None, description="externally visible base URL of `dunning api` (webhook signatures, "
        "unsubscribe links), e.g. https://dunning.example.com")
    signing_secret: SecretStr | None = Field(
        default=None, description="signs unsubscribe tokens (at least 32 characters)")
    stripe_webhook_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET", "DUNNING_STRIPE_WEBHOOK_SECRET"),
    )
    sendgrid_webhook_public_key: str | None = Field(
        default=None, description="the signed Event Webhook's verification key, base64 as SendGrid shows it")
    api_keys: SecretStr | None = Field(
        default=None, description="bearer keys of the HTTP API, comma separated (name:key names one)")
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 20.0

    activity_threads: int = 16

    def database(self) -> str:
        """The database URL (a secret: it may hold a password; never log it)."""
        return self.database_url.get_secret_value()

    def writer(self) -> Writer:
        """Who signs the final notice letter and how the customer replies or disputes."""
        from activities.letter import Writer

        contact = self.company_contact or self.email_from
        return Writer(company=self.company_name, contact=contact,
                      dispute=self.dispute_contact or f"write to {contact} within 14 days saying which "
                                                       "amount you dispute and why; we pause collection "
                                                       "while we look into it")

    def unsubscribe_link(self) -> str | None:
        """The List-Unsubscribe URL template: ``DUNNING_UNSUBSCRIBE_URL`` if set, else the API's
        one-click page with a signed token (needs DUNNING_PUBLIC_URL and DUNNING_SIGNING_SECRET)."""
        if self.unsubscribe_url:
            return self.unsubscribe_url
        if self.public_url and self.signing_secret:
            return f"{self.public_url.rstrip('/')}/unsubscribe/{{token}}"
        return None

    def voice_link(self) -> str | None:
        """Where a call's "press 1" posts: ``DUNNING_VOICE_ACTION_URL`` if set, else the API's
        route with a signed token (needs DUNNING_PUBLIC_URL and DUNNING_SIGNING_SECRET)."""
        if self.voice_action_url:
            return self.voice_action_url
        if self.public_url and self.signing_secret:
            return f"{self.public_url.rstrip('/')}/webhooks/twilio/voice?t={{token}}"
        return None

    def twilio_status_link(self) -> str | None:
        """Where Twilio reports each SMS's and call's outcome (needs DUNNING_PUBLIC_URL)."""
        return f"{self.public_url.rstrip('/')}/webhooks/twilio/status" if self.public_url else None

    def payment_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.pay_url_hosts.split(",") if h.strip())

    def payload_key_text(self) -> str | None:
        return self.payload_keys.get_secret_value() if self.payload_keys else None

    @field_validator("public_url", "agency_webhook_url", "sendgrid_base_url", "twilio_base_url",
                     "unsubscribe_url", "voice_action_url")
    @classmethod
    def _web_address(cls, value: str | None) -> str | None:
        """An address we post to or hand to a provider: refused at start, not met as every
        webhook signature failing or a provider posting callbacks nowhere."""
        if value is None or not value.strip():  # an empty line in an .env file: not set
            return None
        scheme, _, rest = value.strip().partition("://")
        host = rest.split("/", 1)[0]
        if scheme.lower() not in ("http", "https") or not host or any(c.isspace() for c in value.strip()):
            raise ValueError(f"{value[:80]!r} is not an http(s) URL such as https://dunning.example.com")
        return value.strip()

    @field_validator("email_from")
    @classmethod
    def _sender_address(cls, value: str) -> str:
        """SendGrid refuses a malformed sender on every message, which would read as each
        customer's address being refused."""
        _name, address = parseaddr(value)
        local, at, domain = address.rpartition("@")
        if not (local and at and domain) or any(c.isspace() for c in address):
            raise ValueError(f"{value[:80]!r} is not an email address such as billing@example.com")
        return value

    @model_validator(mode="after")
    def _database_driver(self) -> Settings:
        """``postgres://`` and ``postgresql://`` (as hosting providers hand them out) mean the
        psycopg 3 driver this release installs; SQLAlchemy would pick psycopg2, which is not
        there, and the operator would read "cannot reach the database". The URL is never quoted:
        it may hold a password."""
        url = self.database_url.get_secret_value()
        scheme, sep, rest = url.partition("://")
        if scheme in ("postgres", "postgresql"):
            self.database_url = SecretStr(f"postgresql+psycopg://{rest}")
        elif not sep or scheme not in ("sqlite", "postgresql+psycopg"):
            raise ValueError(f"DUNNING_DATABASE_URL: {scheme if sep else 'no scheme'} is not supported; use "
                             "sqlite:///path or postgresql+psycopg://user:password@host/database")
        from sqlalchemy import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(self.database_url.get_secret_value()).port  # noqa: B018 (a bad port raises here)
        except (ArgumentError, ValueError):
            raise ValueError("DUNNING_DATABASE_URL: not a database URL (a port that is not a number? a "
                             "character in the password that needs %-encoding?); expected "
                             "postgresql+psycopg://user:password@host:5432/database") from None
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        """A client certificate without its key (or the reverse) must not fall back to plain
        text silently; a missing file is named here, not met as a traceback at connect."""
        cert, key = self.temporal_tls_cert, self.temporal_tls_key
        if (cert is None) != (key is None):
            raise ValueError("DUNNING_TEMPORAL_TLS_CERT and DUNNING_TEMPORAL_TLS_KEY: set both (the "
                             "client certificate and its key) or neither")
        for name, path in (("DUNNING_TEMPORAL_TLS_CERT", cert), ("DUNNING_TEMPORAL_TLS_KEY", key)):
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no file at {path}")
        return self

    @model_validator(mode="after")
    def _strong_signing_secret(self) -> Settings:
        if self.signing_secret is not None and len(self.signing_secret.get_secret_value()) < 32:
            raise ValueError("DUNNING_SIGNING_SECRET: at least 32 characters (e.g. openssl rand -hex 32)")
        # what the agency trusts a referral, a payment report or a recall by
        agency = self.agency_webhook_secret
        if agency is not None and len(agency.get_secret_value()) < 16:
            raise ValueError("DUNNING_AGENCY_WEBHOOK_SECRET: at least 16 characters (e.g. openssl rand "
                             "-hex 32)")
        return self

    @model_validator(mode="after")
    def _live_needs_credentials(self) -> Settings:
        """In live mode a missing credential is a start-up error, not a silently skipped customer.

        The agency webhook is checked by the worker against the policies (only a policy with an
        agency step needs it)."""
        if self.delivery is DeliveryMode.LIVE:
            missing = [
                name
                for name, value in (
                    ("SENDGRID_API_KEY", self.sendgrid_api_key),
                    ("TWILIO_ACCOUNT_SID", self.twilio_account_sid),
                    ("TWILIO_AUTH_TOKEN", self.twilio_auth_token),
                    ("TWILIO_FROM_NUMBER", self.twilio_from_number),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"DUNNING_DELIVERY=live needs {', '.join(missing)}")
        if self.payload_keys is not None:
            from codec import parse_keys

            parse_keys(self.payload_keys.get_secret_value())  # a bad key refuses to start
        return self


def env_name(field: str) -> str:
    """The environment variable an operator sets for a setting (``metrics_port`` ->
    ``DUNNING_METRICS_PORT``; the providers' own names where they are accepted)."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return f"DUNNING_{field.upper()}"


def describe_settings(error: ValidationError) -> str:
    """A settings refusal, naming the environment variables to fix."""
    parts = []
    for item in error.errors():
        loc = list(item["loc"])
        if loc and isinstance(loc[0], str) and loc[0] in Settings.model_fields:
            loc[0] = env_name(loc[0])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(reason(loc, message) if loc else message)
    return "; ".join(parts)
