"""The formal final notice: a PDF letter, attached to the final notice email and printed by
``dunning letter``.

It says who writes to whom about which invoice, itemises what is owed (the invoice, what was
paid, fees, interest with its rate, the total), names the date after which the account goes to a
collections agency, and says how to pay and how to dispute. Rendered with fpdf2; a Unicode font is
used when the machine has one (DejaVu), else the PDF core font with the text reduced to Latin-1
(accents kept where Latin-1 has them), so a letter is always produced.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from babel.dates import format_date

from models.money import format_money
from models.run import RunInvoice

FONTS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))


@lru_cache(maxsize=4096)
def long_date(value: date, locale: str) -> str:
    """A date as a reader in ``locale`` writes it in full ("October 31, 2026", "31. Oktober 2026").
    Cached: an invoice's dates appear in every message about it."""
    return format_date(value, format="long", locale=locale)


@dataclass(frozen=True)
class LetterFacts:
    """Everything the letter says; built from a run's status and the customer's record."""

    company: str
    company_contact: str  # an address or an email: where to reply
    customer_name: str
    invoice_id: str
    issued_on: date
    due_on: date
    currency: str
    amount_due: Decimal
    paid: Decimal
    total_due: Decimal
    pay_url: str
    dispute: str  # how to dispute, in words
    written_on: date
    collections_after: date | None  # the account goes to the agency after this date
    fees: Decimal = Decimal(0)
    interest: Decimal = Decimal(0)
    interest_rate: Decimal | None = None
    locale: str = "en_US"
    lines: list[tuple[str, str]] = field(default_factory=list)  # extra (label, amount) rows

    def money(self, amount: Decimal) -> str:
        return format_money(amount, self.currency, self.locale)

    def day(self, value: date) -> str:
        return long_date(value, self.locale)

    def items(self) -> list[tuple[str, str]]:
        """The itemised statement, in order, ending with the total."""
        rows = [(f"Invoice {self.invoice_id} of {self.day(self.issued_on)}, due {self.day(self.due_on)}",
                 self.money(self.amount_due))]
        if self.paid:
            rows.append(("Paid or credited so far", "-" + self.money(self.paid)))
        if self.fees:
            rows.append(("Fees and fixed compensation not yet paid", self.money(self.fees)))
        if self.interest:
            rate = f" at {self.interest_rate}% a year" if self.interest_rate is not None else ""
            rows.append((f"Late-payment interest{rate}", self.money(self.interest)))
        rows.extend(self.lines)
        rows.append(("Total due", self.money(self.total_due)))
        return rows


class Itemised(Protocol):
    """The parts of a balance a letter lists: a run's ``Charges``, or its ``DunningStatus``."""

    principal: Decimal | None
    fees: Decimal
    interest: Decimal
    interest_rate: Decimal | None


@dataclass(frozen=True)
class Writer:
    """Who writes the letter, and how to reach them (the deployment's settings)."""

    company: str
    contact: str
    dispute: str


def letter_facts(writer: Writer, invoice: RunInvoice, *, customer_name: str, locale: str,
                 balance: Decimal, charges: Itemised | None, collections_after: datetime | None,
                 written_on: date) -> LetterFacts:
    """The letter for ``invoice`` owing ``balance`` now (with fees and interest, itemised)."""
    if charges is not None and charges.principal is None:
        charges = None  # a run that charges neither
    principal = charges.principal if charges is not None and charges.principal is not None else balance
    return LetterFacts(
        company=writer.company, company_contact=writer.contact, customer_name=customer_name,
        invoice_id=invoice.invoice_id, issued_on=invoice.issued_on, due_on=invoice.due_on,
        currency=invoice.currency, amount_due=invoice.amount_due,
        paid=max(invoice.amount_due - principal, Decimal(0)), total_due=balance,
        pay_url=invoice.payment_url, dispute=writer.dispute, written_on=written_on,
        collections_after=collections_after.date() if collections_after else None,
        fees=charges.fees if charges else Decimal(0), interest=charges.interest if charges else Decimal(0),
        interest_rate=charges.interest_rate if charges and charges.interest else None, locale=locale,
    )


def letter_name(invoice_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in invoice_id)
    return f"final-notice-{safe}.pdf"


def render_letter(facts: LetterFacts) -> bytes:
    """The letter as PDF bytes."""
    from fpdf import FPDF  # heavy: imported only when a letter is written

    pdf = FPDF(format="A4")
    pdf.set_margins(20, 20, 20)
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.add_page()
    family, text = _font(pdf)
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def line(words: str, size: float = 11, style: str = "", gap: float = 2) -> None:
        pdf.set_font(family, style, size)
        pdf.multi_cell(width, size * 0.5, text(words), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(gap)

    line(facts.company, 14, "B", 0)
    if facts.company_contact:
        line(facts.company_contact, 9, "", 6)
    line(f"To: {facts.customer_name}", 11, "", 0)
    line(facts.day(facts.written_on), 11, "", 6)
    line(f"FINAL NOTICE - invoice {facts.invoice_id}", 13, "B", 4)
    line(f"Dear {facts.customer_name},")
    line(f"Despite our earlier reminders, invoice {facts.invoice_id} is still unpaid. "
         f"The amount below is now due:")
    pdf.set_font(family, "", 10)
    for label, amount in facts.items():
        bold = "B" if label == "Total due" else ""
        pdf.set_font(family, bold, 10)
        pdf.cell(width * 0.72, 7, text(label), border="B")
        pdf.cell(width * 0.28, 7, text(amount), border="B", align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    if facts.collections_after is not None:
        line(f"If the total is not paid by {facts.day(facts.collections_after)}, we will refer the account "
             f"to a collections agency after that date without further notice.", 11, "B")
    line(f"How to pay: online at {facts.pay_url}")
    line(f"How to dispute: {facts.dispute}")
    line("If you have paid in the meantime, please disregard this letter.", 9)
    line(f"Yours sincerely, {facts.company}", 11, "", 0)
    return bytes(pdf.output())


def _font(pdf: object) -> tuple[str, object]:
    """A Unicode TrueType font if the machine has one; else Helvetica and Latin-1 text."""
    for folder in FONTS:
        regular, bold = folder / "DejaVuSans.ttf", folder / "DejaVuSans-Bold.ttf"
        if regular.is_file() and bold.is_file():
            pdf.add_font("DejaVu", "", str(regular))  # type: ignore[attr-defined]
            pdf.add_font("DejaVu", "B", str(bold))  # type: ignore[attr-defined]
            return "DejaVu", lambda words: words
    return "Helvetica", _latin1


# Letters without a decomposition into a Latin-1 base letter and a mark.
_PLAIN = str.maketrans({"Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Œ": "OE", "œ": "oe", "\u0131": "i",
                        "€": "EUR ", "\u202f": " ", "\u2019": "'", "\u2013": "-", "\u2014": "-"})


def _latin1(words: str) -> str:
    """``words`` as Latin-1 can show them: accents Latin-1 lacks dropped, the rest replaced."""
    out = []
    for char in words.translate(_PLAIN):
        try:
            char.encode("latin-1")
            out.append(char)
        except UnicodeEncodeError:
            plain = unicodedata.normalize("NFKD", char).encode("latin-1", "ignore").decode("latin-1")
            out.append(plain or "?")
    return "".join(out)
