"""The formal final notice: a PDF letter, attached to the final notice email and printed by
``dunning letter``.

It says who writes to whom about which invoice, itemises what is owed (the invoice, what was
paid, fees, interest with its rate, the total), names the date after which the account goes to a
collections agency, and says how to pay and how to dispute. Rendered with fpdf2; a Unicode font is
used when the machine has one (DejaVu, with Noto CJK for Chinese, Japanese and Korean when it is
installed), else the PDF core font with the text reduced to Latin-1 (accents kept where Latin-1
has them), so a letter is always produced.

The words are English; amounts and dates follow the customer's locale where the fonts can draw
them. What they cannot draw is never silently dropped: an amount is written with its ISO currency
code ("100,000 KRW"), a date in ISO form (2026-04-01), and a name the fonts cannot show makes the
letter address "Dear customer" rather than "Dear ,".
"""

from __future__ import annotations

import dataclasses
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from babel import Locale
from babel.dates import format_date
from babel.numbers import format_currency

from models.money import format_money
from models.run import RunInvoice

log = logging.getLogger(__name__)

FONTS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))
# Chinese, Japanese and Korean glyphs, drawn where DejaVu has none (Debian's fonts-noto-cjk)
CJK_FONTS = (Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),
             Path("/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc"))


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
    drawable: Callable[[str], bool] = lambda words: True  # what the letter's fonts can draw

    def money(self, amount: Decimal) -> str:
        shown = format_money(amount, self.currency, self.locale)
        if self.drawable(shown):
            return shown
        # the locale's own digits and grouping, then the ISO code: "100,000 KRW", "1,00,000.00 INR"
        number = Locale.parse(self.locale).currency_formats["standard"].pattern.split(";")[0]
        number = number.replace("¤", "").strip(" \xa0")
        return format_currency(amount, self.currency, format=f"{number}\xa0¤¤", locale=self.locale)

    def day(self, value: date) -> str:
        shown = long_date(value, self.locale)
        return shown if self.drawable(shown) else value.isoformat()

    @property
    def addressee(self) -> str:
        return self.customer_name if self.customer_name and self.drawable(self.customer_name) else "customer"

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
    family, drawable, text = _font(pdf)
    if family != "Helvetica":
        _shape(pdf)
    facts = dataclasses.replace(facts, drawable=drawable)
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def line(words: str, size: float = 11, style: str = "", gap: float = 2) -> None:
        pdf.set_font(family, style, size)
        pdf.multi_cell(width, size * 0.5, text(words), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(gap)

    line(facts.company, 14, "B", 0)
    if facts.company_contact:
        line(facts.company_contact, 9, "", 6)
    line(f"To: {facts.addressee}", 11, "", 0)
    line(facts.day(facts.written_on), 11, "", 6)
    line(f"FINAL NOTICE - invoice {facts.invoice_id}", 13, "B", 4)
    line(f"Dear {facts.addressee},")
    # (no "despite our reminders": `dunning letter` may print one before any reminder went out)
    line(f"Our records show that invoice {facts.invoice_id} is still unpaid. "
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


def _font(pdf: Any) -> tuple[str, Callable[[str], bool], Callable[[str], str]]:
    """The font family to write in, whether it can draw a text, and a text reduced to what it
    can draw: a Unicode TrueType font if the machine has one (with a CJK fallback if installed);
    else Helvetica and Latin-1."""
    for folder in FONTS:
        regular, bold = folder / "DejaVuSans.ttf", folder / "DejaVuSans-Bold.ttf"
        if regular.is_file() and bold.is_file():
            return ("DejaVu", *_unicode(pdf, regular, bold))
    return "Helvetica", _latin1_drawable, _latin1


def _unicode(pdf: Any, regular: Path, bold: Path) -> tuple[Callable[[str], bool], Callable[[str], str]]:
    pdf.add_font("DejaVu", "", str(regular))
    pdf.add_font("DejaVu", "B", str(bold))
    codes = set(pdf.fonts["dejavu"].cmap) & set(pdf.fonts["dejavuB"].cmap)
    cjk = next((path for path in CJK_FONTS if path.is_file()), None)
    if cjk is not None:
        pdf.add_font("NotoCJK", "", str(cjk))
        codes |= set(pdf.fonts["notocjk"].cmap)
        pdf.set_fallback_fonts(["NotoCJK"], exact_match=False)

    def drawable(words: str) -> bool:
        return all(ord(char) in codes for char in words if char != "\n")

    def text(words: str) -> str:
        return "".join(char if char == "\n" or ord(char) in codes else "?" for char in words)

    return drawable, text


def _shape(pdf: Any) -> None:
    """Arabic letters joined and right-to-left text in its order (a name in Arabic or Hebrew came
    out as separate letters, backwards), through HarfBuzz (``uharfbuzz``). Without it the letter
    is written as before."""
    from fpdf.errors import FPDFException

    try:
        pdf.set_text_shaping(True)
    except FPDFException as exc:  # the shaping engine is not installed
        log.warning("letters are written without text shaping: %s", exc)


def _latin1_drawable(words: str) -> bool:
    """Whether Latin-1 can show ``words`` well enough: accents it lacks may go ("Łukasz" is
    "Lukasz"), but no letter may be lost."""
    return MISSING not in _latin1(words, MISSING)


MISSING = "\ufffd"  # stands for a character Latin-1 cannot show, while checking
# Letters without a decomposition into a Latin-1 base letter and a mark.
_PLAIN = str.maketrans({"Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Œ": "OE", "œ": "oe", "\u0131": "i",
                        "€": "EUR ", "\u202f": " ", "\u2019": "'", "\u2013": "-", "\u2014": "-"})


def _latin1(words: str, missing: str = "?") -> str:
    """``words`` as Latin-1 can show them: accents Latin-1 lacks dropped, the rest ``missing``."""
    out = []
    for char in words.translate(_PLAIN):
        try:
            char.encode("latin-1")
            out.append(char)
        except UnicodeEncodeError:
            plain = unicodedata.normalize("NFKD", char).encode("latin-1", "ignore").decode("latin-1")
            out.append(plain or missing)
    return "".join(out)
