"""Rendering a delivery request into the exact message a provider receives.

Wording lives in templates/ (one file per tone, a block per channel); the pay link, opt-out line
and unsubscribe headers are added here and by the layouts, so every email and SMS carries them.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from twilio.twiml.voice_response import VoiceResponse

from activities.bundle import Line
from activities.channels import Attachment, OutgoingMessage
from activities.letter import Writer, letter_facts, letter_name, long_date, render_letter
from models.charges import Charges
from models.delivery import DeliveryRequest, Purpose
from models.money import format_money
from models.policy import Channel
from models.records import CustomerRecord
from models.token import UNSUBSCRIBE, VOICE, make_token

SMS_OPT_OUT = "Reply STOP to opt out."
SPOKEN = "en_US"  # how the call's English voice reads amounts and dates
AGENCY_EVENTS = {
    Purpose.HANDOFF: "account.referred",
    Purpose.PAYMENT_REPORT: "account.payment",
    Purpose.RECALL: "account.recalled",
    Purpose.ADJUSTMENT: "account.adjusted",
}


class Renderer:
    """Turns requests into messages; one instance per worker (the Jinja environments are cached)."""

    def __init__(self, *, templates_dir: Path, company: str, email_from: str,
                 unsubscribe_url: str | None = None, voice_action_url: str | None = None,
                 agency_url: str = "outbox:agency", signing_secret: str | None = None,
                 writer: Writer | None = None) -> None:
        self.company = company
        self.writer = writer or Writer(company=company, contact=email_from,
                                       dispute=f"write to {email_from} saying what you dispute and why")
        self.email_from = email_from
        self.unsubscribe_url = unsubscribe_url  # "{token}": a signed one-click token; "{invoice_id}"
        self.signing_secret = signing_secret
        self.voice_action_url = voice_action_url
        self.agency_url = agency_url
        loader = FileSystemLoader(templates_dir)
        # templates are read once per worker (no file check per message): a template change is a
        # deploy, like a code change
        self._env = Environment(loader=loader, undefined=StrictUndefined, autoescape=False,
                                auto_reload=False)
        self._html_env = Environment(loader=loader, undefined=StrictUndefined, autoescape=True,
                                     auto_reload=False)

    def render(self, request: DeliveryRequest, channel: Channel, customer: CustomerRecord | None,
               balance_due: Decimal, shared: tuple[Line, ...] = ()) -> OutgoingMessage:
        """The message for ``channel``, addressed with the customer's details as stored now and
        quoting ``balance_due``, the balance at the moment of sending."""
        reference = f"{request.invoice.invoice_id}/{request.step}/{channel}"
        if channel is Channel.AGENCY:
            return OutgoingMessage(
                channel=Channel.AGENCY, recipient=self.agency_url, reference=reference,
                body=f"{request.purpose} {request.invoice.invoice_id}",
                payload=agency_payload(request, reference, customer, balance_due),
            )
        assert customer is not None
        # The call's words are English, spoken by an English voice: "1.234,50 €" would be read
        # as "one point two three four", so a call quotes amounts and dates as English writes them.
        locale = SPOKEN if channel is Channel.VOICE else customer.locale
        context = self._context(request, customer, balance_due, locale)
        template_name = request.template
        if shared:  # one message for several invoices: each with its balance and pay link
            mine = Line(request.invoice.invoice_id, request.step, request.invoice.payment_url, balance_due,
                        request.invoice.currency)
            invoices = [mine, *shared]
            context["invoices"] = [{"invoice_id": line.invoice_id, "pay_url": line.pay_url,
                                    "balance": format_money(line.balance_due, line.currency, locale)}
                                   for line in invoices]
            currencies = {line.currency for line in invoices}
            total = sum((line.balance_due for line in invoices), Decimal(0))
            one_currency = len(currencies) == 1
            context["total"] = format_money(total, request.invoice.currency, locale) if one_currency else ""
            context["charges_line"] = ""
            template_name = "consolidated"
        template = self._env.get_template(f"{template_name}.j2")
        blocks = {
            name: "".join(template.blocks[name](template.new_context(context))).strip()
            for name in ("subject", "email", "sms", "voice")
        }
        if channel is Channel.EMAIL:
            message = self._email(blocks, context, customer.email or "", reference)
            if request.letter:
                facts = letter_facts(self.writer, request.invoice, customer_name=customer.name,
                                     locale=customer.locale, balance=balance_due, charges=request.charges,
                                     collections_after=request.collections_after,
                                     written_on=request.as_of.date())
                pdf = Attachment(letter_name(request.invoice.invoice_id), render_letter(facts))
                message = dataclasses.replace(message, attachments=(pdf,))
            return message
        if channel is Channel.SMS:
            pay = "" if shared else f" Pay: {context['pay_url']}"  # a shared one lists each link
            body = f"{blocks['sms']}{pay} {SMS_OPT_OUT}"
            return OutgoingMessage(channel=Channel.SMS, recipient=customer.phone or "",
                                   body=body, reference=reference)
        return OutgoingMessage(channel=Channel.VOICE, recipient=customer.phone or "",
                               body=blocks["voice"], reference=reference,
                               twiml=self._twiml(blocks["voice"], self._voice_action(request)))

    def _context(self, request: DeliveryRequest, customer: CustomerRecord,
                 balance_due: Decimal, locale: str) -> dict[str, Any]:
        invoice = request.invoice
        days = max((request.as_of - invoice.anchor) // timedelta(days=1), 0)
        unsubscribe = None
        if self.unsubscribe_url:
            unsubscribe = self.unsubscribe_url.replace("{invoice_id}", quote(invoice.invoice_id))
            if "{token}" in unsubscribe and self.signing_secret:
                token = make_token(self.signing_secret, UNSUBSCRIBE, customer.id, invoice.invoice_id)
                unsubscribe = unsubscribe.replace("{token}", token)
        instalment = request.instalment
        return {
            "instalment_amount": format_money(Decimal(instalment.amount), invoice.currency, locale)
            if instalment else "",
            "instalment_due_on": long_date(instalment.due_on, locale)
            if instalment else "",
            "customer_name": customer.name,
            "company": self.company,
            "invoice_id": invoice.invoice_id,
            "balance": format_money(balance_due, invoice.currency, locale),
            "amount_due": format_money(invoice.amount_due, invoice.currency, locale),
            "due_on": long_date(invoice.due_on, locale),
            "days_overdue": days,
            "overdue": "overdue" if days == 0 else f"{days} day{'s' if days > 1 else ''} overdue",
            "pay_url": invoice.payment_url,
            "unsubscribe_url": unsubscribe,
            "charges_line": charges_line(request.charges, invoice.currency, locale),
            "invoices": [],  # a shared message: every invoice in it, each with its own pay link
        }

    def _email(self, blocks: dict[str, str], context: dict[str, Any], to: str,
               reference: str) -> OutgoingMessage:
        text = self._env.get_template("layout/email.txt.j2").render(body=blocks["email"], **context)
        paragraphs = [p.strip() for p in blocks["email"].split("\n\n") if p.strip()]
        html = self._html_env.get_template("layout/email.html.j2").render(
            paragraphs=paragraphs, **context
        )
        mailto = f"mailto:{self.email_from}?subject={quote('unsubscribe ' + context['invoice_id'])}"
        headers = {"List-Unsubscribe": f"<{mailto}>"}
        if context["unsubscribe_url"]:
            headers["List-Unsubscribe"] = f"<{context['unsubscribe_url']}>, <{mailto}>"
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        return OutgoingMessage(channel=Channel.EMAIL, recipient=to, subject=blocks["subject"],
                               body=text, html=html, headers=headers, reference=reference)

    def _voice_action(self, request: DeliveryRequest) -> str | None:
        """Where Twilio posts the key press: ``{token}`` is a signed, opaque (invoice, step)."""
        url = self.voice_action_url
        if url and "{token}" in url and self.signing_secret:
            url = url.replace("{token}", make_token(self.signing_secret, VOICE,
                                                    request.invoice.invoice_id, request.step))
        return url

    def _twiml(self, words: str, action: str | None) -> str:
        """The call says the message, then offers the pay link by SMS on key 1."""
        response = VoiceResponse()
        response.say(words)
        gather = response.gather(num_digits=1, action=action, method="POST")
        gather.say("To receive a payment link by text message, press 1.")
        response.say("Goodbye.")
        return str(response)


def agency_payload(request: DeliveryRequest, reference: str, customer: CustomerRecord | None,
                   balance_due: Decimal) -> dict[str, Any]:
    """The JSON document the agency receives: the account at handoff, a payment on it, or its
    recall. The agency needs the customer's contact details to collect; they are read from the
    database at sending, never carried through Temporal."""
    invoice = request.invoice
    payload: dict[str, Any] = {
        "event": AGENCY_EVENTS[request.purpose],
        "reference": reference,
        "invoice_id": invoice.invoice_id,
        "currency": invoice.currency,
        "amount_due": str(invoice.amount_due),
        "balance_due": str(balance_due),
        "issued_on": invoice.issued_on.isoformat(),
        "due_on": invoice.due_on.isoformat(),
        "customer": _agency_customer(invoice.customer_id, customer),
    }
    if request.payment is not None:
        payload["payment"] = request.payment.model_dump(mode="json", exclude={"source"})
    if request.purpose in (Purpose.RECALL, Purpose.ADJUSTMENT):
        payload["reason"] = request.reason
    return payload


def _agency_customer(customer_id: str, customer: CustomerRecord | None) -> dict[str, Any]:
    if customer is None or customer.forgotten_at is not None:
        return {"id": customer_id}
    return {"id": customer.id, "name": customer.name, "email": customer.email,
            "phone": customer.phone, "timezone": customer.timezone, "locale": customer.locale}


def charges_line(charges: Charges | None, currency: str, locale: str) -> str:
    """"Of which ..." under the balance: the fees and interest a message's total includes."""
    if charges is None or not (charges.fees or charges.interest):
        return ""
    parts = [f"the amount of the invoice still unpaid {format_money(charges.principal, currency, locale)}"]
    if charges.fees:
        parts.append(f"fees {format_money(charges.fees, currency, locale)}")
    if charges.interest:
        parts.append(f"interest {format_money(charges.interest, currency, locale)} "
                     f"({charges.interest_rate}% a year)")
    return "The balance is made up of " + ", ".join(parts) + "."
