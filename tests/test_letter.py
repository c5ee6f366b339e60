"""The formal final notice: a PDF letter whose text (read back with pypdf) says what is owed,
itemised, the date after which the agency gets the account, how to pay and how to dispute; sent
as an attachment through the real SendGrid SDK, and written by `dunning letter`."""

from __future__ import annotations

import base64
import io
import json
from datetime import date, timedelta
from decimal import Decimal

import pytest
from pypdf import PdfReader

from activities import letter as letter_module
from activities.letter import LetterFacts, render_letter
from tests.conftest import running, sample_invoice
from tests.fakeprovider import FakeProvider
from tests.test_providers import live_settings


def text_of(pdf: bytes) -> str:
    assert pdf.startswith(b"%PDF-")
    return " ".join(" ".join(page.extract_text().split()) for page in PdfReader(io.BytesIO(pdf)).pages)


FACTS = LetterFacts(
    company="Example Billing", company_contact="billing@example.com", customer_name="Ada Lovelace",
    invoice_id="INV-7", issued_on=date(2026, 1, 5), due_on=date(2026, 2, 4), currency="EUR",
    amount_due=Decimal("1000.00"), paid=Decimal("442.34"), total_due=Decimal("567.52"),
    pay_url="https://pay.example.com/INV-7", dispute="write to billing@example.com within 14 days",
    written_on=date(2026, 4, 1), collections_after=date(2026, 4, 15), fees=Decimal("5.00"),
    interest=Decimal("4.86"), interest_rate=Decimal("10.27"),
)


def test_the_letter_itemises_the_debt_and_says_when_collections_begin():
    text = text_of(render_letter(FACTS))
    for expected in ("Example Billing", "Ada Lovelace", "FINAL NOTICE - invoice INV-7",
                     "Invoice INV-7 of January 5, 2026, due February 4, 2026", "€1,000.00",
                     "Paid or credited so far -€442.34", "Fees and fixed compensation not yet paid €5.00",
                     "Late-payment interest at 10.27% a year €4.86", "Total due €567.52",
                     "April 15, 2026", "collections agency", "https://pay.example.com/INV-7",
                     "How to dispute: write to billing@example.com within 14 days"):
        assert expected in text, expected


def test_without_a_unicode_font_the_letter_is_still_written(monkeypatch):
    monkeypatch.setattr(letter_module, "FONTS", ())
    facts = LetterFacts(**{**FACTS.__dict__, "customer_name": "Łukasz Żółć", "locale": "de_DE"})
    text = text_of(render_letter(facts))
    assert "Lukasz Zólc" in text  # Latin-1 keeps ó, drops the marks it lacks
    assert "567,52 EUR" in text.replace("\xa0", " ")


ABROAD = [  # currency, the customer's locale, name, the total as the letter may write it
    ("JPY", "ja_JP", "山田太郎", ("￥100,000", "¥100,000", "100,000 JPY")),
    ("KRW", "ko_KR", "김민준", ("₩100,000", "100,000 KRW")),
    ("INR", "en_IN", "Priya Sharma", ("₹1,00,000.00", "1,00,000.00 INR")),
    ("UAH", "uk_UA", "Олена Коваленко", ("100 000,00 ₴", "100 000,00 UAH")),
    ("THB", "th_TH", "สมชาย", ("฿100,000.00", "100,000.00 THB")),
    ("EUR", "de_DE", "Łukasz Żółć", ("100.000,00 €", "100.000,00 EUR")),
]


@pytest.mark.parametrize("fonts", ["unicode", "core"])
def test_a_letter_abroad_never_drops_an_amount_a_date_or_a_name(monkeypatch, caplog, fonts):
    """A glyph the fonts lack was left out silently: a Korean customer's total came out as
    "100,000" with no currency, a Japanese one was addressed "Dear ,", and a Thai date was blank.
    Now an amount falls back to its ISO code, a date to ISO form, a name to "customer"."""
    if fonts == "core":
        monkeypatch.setattr(letter_module, "FONTS", ())
    elif not any((folder / "DejaVuSans.ttf").is_file() for folder in letter_module.FONTS):
        pytest.skip("no DejaVu fonts on this machine (Debian: fonts-dejavu-core)")
    for currency, locale, name, totals in ABROAD:
        facts = LetterFacts(**{**FACTS.__dict__, "currency": currency, "locale": locale,
                               "customer_name": name, "amount_due": Decimal("100000"), "paid": Decimal(0),
                               "fees": Decimal(0), "interest": Decimal(0), "total_due": Decimal("100000")})
        caplog.clear()
        text = text_of(render_letter(facts)).replace("\xa0", " ").replace("\u202f", " ")
        assert "missing the following glyphs" not in caplog.text, (locale, caplog.text)
        assert any(f"Total due {total}".replace("\xa0", " ") in text for total in totals), (locale, text)
        assert "Dear ," not in text and "?" not in text, (locale, text)
        assert "2026-04-15" in text or "15" in text.split("not paid by ")[1][:20], (locale, text)


@pytest.mark.parametrize(("name", "locale"), [("محمد الأحمد", "ar_EG"), ("דוד לוי", "he_IL")])
def test_a_right_to_left_name_is_written_joined_and_in_its_order(name: str, locale: str):
    """An Arabic or Hebrew name was drawn letter by letter from the left: read back, it came
    out backwards (and Arabic unjoined). Shaped, it reads as the customer writes it."""
    if not any((folder / "DejaVuSans.ttf").is_file() for folder in letter_module.FONTS):
        pytest.skip("no DejaVu fonts on this machine (Debian: fonts-dejavu-core)")
    text = text_of(render_letter(LetterFacts(**{**FACTS.__dict__, "customer_name": name, "locale": locale})))
    assert f"To: {name}" in text, text[:200]


async def test_the_final_notice_email_carries_the_letter(time_env, settings, fake_provider: FakeProvider):
    """A consumer's final notice (day 45) goes through SendGrid with the PDF attached; its text
    names the invoice, the balance and the date after which the agency gets the account."""
    async with running(time_env, live_settings(settings, fake_provider)) as harness:
        invoice = sample_invoice(policy="consumer", amount_due="80.00")
        invoice["customer"] |= {"type": "consumer"}
        handle = await harness.start(invoice)
        await harness.advance(handle, timedelta(days=46))
        mails = [json.loads(r.body) for r in fake_provider.to("/v3/mail/send")]
        notices = [m for m in mails if m["subject"].startswith("Final notice")]
        assert len(notices) == 1
        [attached] = notices[0]["attachments"]
        assert attached["type"] == "application/pdf"
        assert attached["filename"] == f"final-notice-{invoice['invoice_id']}.pdf"
        text = text_of(base64.b64decode(attached["content"]))
        assert invoice["invoice_id"] in text and "Total due $80.00" in text
        # the agency no sooner than 90 days after the due date, and 30 days after this notice
        assert "collections agency after that date" in text
        earlier = [m for m in mails if not m["subject"].startswith("Final notice")]
        assert earlier and all("attachments" not in m for m in earlier)
        await harness.dunning.cancel(invoice["invoice_id"], "test over")
        await harness.finish(handle)
