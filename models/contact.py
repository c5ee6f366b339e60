"""When a customer may be contacted: contact windows in their time zone and frequency caps.

Pure functions over the rules a run carries (``ContactRules``, fixed when the run starts) and the
facts the delivery activity reads from the database when it is about to send (the customer's
time zone, phone, country and region; the times of recent contacts). They decide one thing: the
earliest moment at or after *now* when a message on a channel may go out. The delivery activity
asks them inside its claim transaction, so a contact that is allowed at once costs a run nothing
extra; a deferred one comes back to the workflow as a time to wait for.

Time zones: the customer's own; else every zone their phone number can be in (a US number without
an area-code zone maps to several, and a contact must then be allowed in all of them); else the
policy's ``default_timezone``. Days: ``mon-sun``, ``mon-fri``, or ``business`` (weekdays that
are not public holidays of the customer's country and region, from the ``holidays`` package).
A deferral to a window's opening is spread over its first minutes (``contact_spread``) by a
hash of the invoice and step, so a thousand runs deferred overnight do not all call at 08:00:00.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field

from models.duration import Offset

_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
_CAP = re.compile(r"^(\d{1,4})/(\d{1,4})([dh])$")
DAYS = ("mon-sun", "mon-fri", "business")
ALWAYS = "00:00-24:00"
# How far ahead a window is looked for: a year of holidays and weekends is far more than any rule
# can close; beyond it the rules cannot be met at all (windows that never overlap across zones).
HORIZON_DAYS = 400


class ContactError(ValueError):
    """Rules that can never be met (say, windows of several time zones that never overlap)."""


def parse_hours(text: str) -> tuple[int, int]:
    """``"08:00-21:00"`` -> minutes since midnight (480, 1260); the end may be ``24:00``."""
    match = _HOURS.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a window like \"08:00-21:00\"")
    start = int(match[1]) * 60 + int(match[2])
    end = int(match[3]) * 60 + int(match[4])
    if end > 24 * 60 or end <= start:
        raise ValueError(f"{text!r}: the end must come after the start, on the same day (at most 24:00)")
    return start, end


def parse_cap(text: str) -> tuple[int, timedelta]:
    """``"7/7d"`` -> at most 7 contacts in any 7 days; ``"2/24h"`` in any 24 hours."""
    match = _CAP.match(text.strip()) if isinstance(text, str) else None
    if match is None or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"{text!r} is not a cap like \"7/7d\" (contacts / rolling window in d or h)")
    unit = {"d": "days", "h": "hours"}[match[3]]
    return int(match[1]), timedelta(**{unit: int(match[2])})


class Overlay(BaseModel):
    """A region's stricter rules (``[regions."US-MA"]`` in the policy file): its hours narrow the
    policy's, its caps lower them; ``caps_per_invoice`` counts per debt rather than per person."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    contact_hours: str | None = None
    contact_days: str | None = None
    caps: dict[str, str] = Field(default_factory=dict)
    caps_per_invoice: dict[str, str] = Field(default_factory=dict)


class ContactRules(BaseModel):
    """What a run carries to every customer delivery (plain strings: nothing external runs when
    a workflow input is decoded; the policy file was checked when it was loaded)."""

    model_config = ConfigDict(frozen=True)

    hours: str = "08:00-21:00"
    days: str = "mon-sun"
    caps: dict[str, str] = Field(default_factory=dict)  # channel -> "N/window", per person
    caps_per_invoice: dict[str, str] = Field(default_factory=dict)  # channel -> "N/window", per debt
    default_timezone: str = "UTC"
    spread: Offset = timedelta(minutes=30)
    regions: dict[str, Overlay] = Field(default_factory=dict)
    # messages of the customer's invoices due on one channel within this are sent as one (0: never)
    consolidate: Offset = timedelta(0)

    def for_customer(self, country: str | None, region: str | None) -> ContactRules:
        """The rules with the overlays of the customer's country and region applied."""
        rules = self
        for key in (country, region):
            overlay = self.regions.get(key or "")
            if overlay is not None:
                rules = rules._narrowed(overlay)
        return rules

    def _narrowed(self, overlay: Overlay) -> ContactRules:
        hours = self.hours
        if overlay.contact_hours:
            (a, b), (c, d) = parse_hours(self.hours), parse_hours(overlay.contact_hours)
            start, end = max(a, c), min(b, d)
            if end <= start:
                raise ContactError(f"contact hours {self.hours} and {overlay.contact_hours} never overlap")
            hours = f"{_clock(start)}-{_clock(end)}"
        days = self.days
        if overlay.contact_days and DAYS.index(overlay.contact_days) > DAYS.index(days):
            days = overlay.contact_days  # mon-sun < mon-fri < business: the stricter wins
        return self.model_copy(update={
            "hours": hours, "days": days, "caps": _lower(self.caps, overlay.caps),
            "caps_per_invoice": _lower(self.caps_per_invoice, overlay.caps_per_invoice),
        })

    @property
    def always(self) -> bool:
        return parse_hours(self.hours) == (0, 24 * 60) and self.days == "mon-sun"

    def capped(self, channel: str) -> bool:
        """Whether contacts on ``channel`` are counted (a cap per person or per invoice)."""
        return channel in self.caps or channel in self.caps_per_invoice


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _lower(mine: dict[str, str], theirs: dict[str, str]) -> dict[str, str]:
    """Per channel, the cap that allows fewer contacts per day (the stricter)."""
    merged = dict(mine)
    for channel, cap in theirs.items():
        if channel not in merged:
            merged[channel] = cap
            continue
        (n1, w1), (n2, w2) = parse_cap(merged[channel]), parse_cap(cap)
        if n2 / w2.total_seconds() < n1 / w1.total_seconds() or (n2 <= n1 and w2 >= w1):
            merged[channel] = cap
    return merged


# -- time zones ----------------------------------------------------------------------------------

def known_zone(name: str | None) -> bool:
    if not name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def customer_zones(timezone: str | None, phone: str | None, default: str) -> tuple[str, ...]:
    """The zones a contact must be allowed in: the customer's own; else every zone their phone
    number may be in; else ``default``."""
    if known_zone(timezone):
        return (str(timezone),)
    zones = _phone_zones(phone) if phone else ()
    return zones or (default,)


def _phone_zones(phone: str) -> tuple[str, ...]:
    """Not cached: a cache would keep the numbers as its keys for the worker's life, past
    ``dunning customer forget`` (the answer needs the whole number, not a prefix)."""
    import phonenumbers
    from phonenumbers import timezone as phone_timezone

    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return ()
    names = phone_timezone.time_zones_for_number(number)
    return tuple(sorted(z for z in names if known_zone(z)))


# -- windows -------------------------------------------------------------------------------------

@lru_cache(maxsize=512)
def _holidays(country: str, subdivision: str | None, year: int) -> frozenset[date]:
    """Public holidays of a country (and region, when the package knows it) in one year; an
    unknown country has none (weekends still count)."""
    import holidays

    for subdiv in ((subdivision, None) if subdivision else (None,)):
        try:
            return frozenset(holidays.country_holidays(country, subdiv=subdiv, years=year))
        except (NotImplementedError, KeyError):
            continue
    return frozenset()


@dataclass(frozen=True)
class Window:
    """Contact hours on allowed days, in the customer's country (for holidays)."""

    start: int  # minutes since local midnight
    end: int
    days: str
    country: str | None = None
    subdivision: str | None = None

    @classmethod
    def of(cls, rules: ContactRules, country: str | None = None, region: str | None = None) -> Window:
        start, end = parse_hours(rules.hours)
        subdivision = region.split("-", 1)[1] if region and "-" in region else None
        return cls(start, end, rules.days, country, subdivision)

    def day_allowed(self, day: date) -> bool:
        if self.days == "mon-sun":
            return True
        if day.weekday() >= 5:
            return False
        return self.days != "business" or not self.country or \
            day not in _holidays(self.country, self.subdivision, day.year)

    def open_at(self, instant: datetime, zone: str) -> bool:
        local = instant.astimezone(ZoneInfo(zone))
        minute = local.hour * 60 + local.minute
        return self.day_allowed(local.date()) and self.start <= minute < self.end

    def next_open(self, instant: datetime, zone: str) -> datetime:
        """The earliest moment at or after ``instant`` inside the window in ``zone``."""
        tz = ZoneInfo(zone)
        today = instant.astimezone(tz).date()
        for ahead in range(HORIZON_DAYS):
            day = today + timedelta(days=ahead)
            if not self.day_allowed(day):
                continue
            opens = _local(day, self.start, tz)
            closes = _local(day, self.end, tz)
            candidate = max(opens, instant)
            if candidate < closes:
                return candidate
        raise ContactError(f"no allowed day within {HORIZON_DAYS} days")


def _local(day: date, minutes: int, tz: ZoneInfo) -> datetime:
    """``day`` at ``minutes`` past local midnight in ``tz`` (24:00 is the next midnight)."""
    if minutes >= 24 * 60:
        return datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)
    return datetime.combine(day, time(minutes // 60, minutes % 60), tzinfo=tz)


def earliest_open(instant: datetime, window: Window, zones: Sequence[str]) -> datetime:
    """The earliest moment at or after ``instant`` when the window is open in every zone."""
    moment = instant
    for _ in range(HORIZON_DAYS * 2):
        closed = [zone for zone in zones if not window.open_at(moment, zone)]
        if not closed:
            return moment
        moment = max(window.next_open(moment, zone) for zone in closed)
    raise ContactError(f"the contact window is never open in all of {', '.join(zones)} at once")


# -- caps ----------------------------------------------------------------------------------------

def cap_frees_at(contacts: Iterable[datetime], cap: str, at: datetime) -> datetime | None:
    """When one more contact fits under ``cap`` again, given the contacts made (None: it fits
    at ``at``). Rolling window: a contact counts for ``window`` after it was made. A contact
    recorded later than ``at`` (another worker's clock a little ahead) counts too."""
    limit, window = parse_cap(cap)
    recent = sorted(c for c in contacts if at - window < c)
    if len(recent) < limit:
        return None
    return recent[len(recent) - limit] + window


# -- the decision --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Deferral:
    until: datetime
    reason: str  # "window: ..." or "cap: ..."


@dataclass(frozen=True)
class Customer:
    """What the rules need to know of a customer (read from the database at send time)."""

    timezone: str | None
    phone: str | None
    country: str | None
    region: str | None


def defer(now: datetime, rules: ContactRules, customer: Customer, channel: str | None,
          contacts: Sequence[tuple[datetime, bool]] = (), *, key: str = "") -> Deferral | None:
    """Whether a message on ``channel`` must wait, and until when (None: send now).

    ``contacts`` are the customer's earlier contacts on this channel: (when, on this invoice).
    ``channel`` None checks the window only (a handoff, whose notice follows it). ``key``
    spreads deferrals to a window's opening over its first minutes.
    """
    rules = rules.for_customer(customer.country, customer.region)
    if rules.always and not (channel and rules.capped(channel)):
        return None  # any hour of any day, no cap: nothing to wait for
    window = Window.of(rules, customer.country, customer.region)
    zones = customer_zones(customer.timezone, customer.phone, rules.default_timezone)
    caps: list[tuple[str, list[datetime], str]] = []
    if channel is not None:
        if channel in rules.caps:
            caps.append((rules.caps[channel], [at for at, _ in contacts], f"{channel} {rules.caps[channel]}"))
        if channel in rules.caps_per_invoice:
            cap = rules.caps_per_invoice[channel]
            caps.append((cap, [at for at, mine in contacts if mine], f"{channel} {cap} per invoice"))
    moment, reason, opened = now, "", False
    for _ in range(64):
        at = earliest_open(moment, window, zones)
        if at > moment:
            moment, opened = at, True
            reason = reason or (f"window: outside {rules.hours} {rules.days} ({', '.join(zones)})")
        frees = [(when, label) for cap, times, label in caps
                 if (when := cap_frees_at(times, cap, moment)) is not None]
        if not frees:
            break
        moment, label = max(frees)
        opened = False
        reason = f"cap: {label} reached"
    else:
        raise ContactError("the caps and the window never allow a contact")
    if moment <= now:
        return None
    if opened:  # at a window's opening: spread over its first minutes (still inside it)
        nudged = moment + _spread(key, rules.spread, window)
        if all(window.open_at(nudged, zone) for zone in zones):
            moment = nudged
    return Deferral(until=moment, reason=reason)


def _spread(key: str, spread: timedelta, window: Window) -> timedelta:
    room = min(spread.total_seconds(), (window.end - window.start) * 30)  # at most half the window
    if room < 1:
        return timedelta(0)
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return timedelta(seconds=digest % int(room))


def check_rules(rules: dict[str, Any], where: str) -> None:
    """Check a policy's contact fields when the file is loaded (the edge), naming the field."""
    if rules.get("contact_hours") is not None:
        _named(where, "contact_hours", parse_hours, rules["contact_hours"])
    days = rules.get("contact_days")
    if days is not None and days not in DAYS:
        raise ValueError(f"{where}, field 'contact_days': {days!r} is not one of {', '.join(DAYS)}")
    for field in ("caps", "caps_per_invoice"):
        for channel, cap in (rules.get(field) or {}).items():
            if channel not in ("email", "sms", "voice"):
                raise ValueError(f"{where}, field '{field}.{channel}': not a channel (email, sms, voice)")
            _named(where, f"{field}.{channel}", parse_cap, cap)
    zone = rules.get("default_timezone")
    if zone is not None and not known_zone(zone):
        raise ValueError(f"{where}, field 'default_timezone': unknown time zone {zone!r}")


def _named(where: str, field: str, check: Any, value: Any) -> None:
    try:
        check(value)
    except ValueError as err:
        raise ValueError(f"{where}, field {field!r}: {err}") from None

