"""Contact windows and frequency caps: properties over random rules, and whole runs that meet them.

The properties (hypothesis) cover random hours, day rules, time zones (DST edges of zones that
change on different dates), public holidays and caps: no contact is scheduled outside its window
in any of the customer's zones, no cap is ever exceeded across a customer's invoices, a deferral
is never earlier than asked and always ends. The scenarios run on the time-skipping server with
the shipped policy file: a step due at 03:00 local goes out in the first minutes after 08:00, and
a customer whose three invoices all call on one day gets two calls that day and the third after
the cap's window.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from temporalio.service import RPCError

from activities.outbox import messages_for
from models.contact import (
    ContactRules,
    Customer,
    Overlay,
    Window,
    cap_frees_at,
    customer_zones,
    defer,
    parse_cap,
)
from models.policy import PolicyError, load_policies
from tests.conftest import ROOT, Harness, running, sample_invoice
from workflows.dunning import InvoiceDunningWorkflow

ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Sydney", "Pacific/Auckland",
         "America/Los_Angeles", "Asia/Kolkata", "America/St_Johns", "Europe/London"]
# Zones whose clocks move on different days and in different directions, checked together.
ZONE_SETS = st.lists(st.sampled_from(ZONES), min_size=1, max_size=3, unique=True)
START = datetime(2026, 1, 1, tzinfo=UTC)
# Instants around the year's DST changes (March, April, September, October, November).
INSTANTS = st.integers(min_value=0, max_value=365 * 24 * 60).map(lambda m: START + timedelta(minutes=m))
HOURS = st.tuples(st.integers(0, 20), st.integers(2, 12)).map(
    lambda t: f"{t[0]:02d}:{(t[0] * 7) % 60:02d}-{min(t[0] + t[1], 24):02d}:00")
DAYS = st.sampled_from(["mon-sun", "mon-fri", "business"])
COUNTRIES = st.sampled_from([None, "US", "DE", "GB", "FR", "AU"])
CAPS = st.builds(lambda n, d: f"{n}/{d}d", st.integers(1, 7), st.integers(1, 7))


def open_everywhere(window: Window, moment: datetime, zones: tuple[str, ...]) -> bool:
    return all(window.open_at(moment, zone) for zone in zones)


def overlap(hours: str, zones: list[str]) -> bool:
    """Whether windows of ``hours`` in all ``zones`` can ever be open at once (else the rules
    are refused, which another test covers)."""
    start, end = (int(p[:2]) * 60 + int(p[3:]) for p in hours.split("-"))
    offsets = [ZoneInfo(z).utcoffset(datetime(2026, 1, 15)).total_seconds() / 60 for z in zones]  # type: ignore[union-attr]
    return max(offsets) - min(offsets) + 120 < end - start  # DST moves a zone by an hour


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(now=INSTANTS, hours=HOURS, days=DAYS, zones=ZONE_SETS, country=COUNTRIES)
def test_no_contact_is_ever_scheduled_outside_its_window(now, hours, days, zones, country):
    if len(zones) > 1 and not overlap(hours, zones):
        return
    rules = ContactRules(hours=hours, days=days, spread=timedelta(minutes=30))
    customer = Customer(timezone=zones[0] if len(zones) == 1 else None, phone=None, country=country,
                        region=None)
    if len(zones) > 1:  # several zones: as a phone number spanning them would give
        from models import contact
        customer = Customer(timezone=None, phone="+multi", country=country, region=None)
        original = contact._phone_zones
        contact._phone_zones = lambda phone: tuple(zones)  # type: ignore[assignment]
    try:
        deferral = defer(now, rules, customer, "sms", key="INV-1/step")
        moment = deferral.until if deferral else now
        window = Window.of(rules, country)
        assert open_everywhere(window, moment, tuple(zones)), (moment, deferral)
        assert moment >= now
        if deferral is not None:
            assert not open_everywhere(window, now, tuple(zones))
            assert deferral.reason.startswith("window:")
            assert moment - now < timedelta(days=12)  # the longest run of closed days in a year
    finally:
        if len(zones) > 1:
            contact._phone_zones = original  # type: ignore[assignment]


@settings(max_examples=150, deadline=None)
@given(start=INSTANTS, cap=CAPS, hours=HOURS, zone=st.sampled_from(ZONES),
       invoices=st.lists(st.integers(0, 9), min_size=1, max_size=30),
       gaps=st.lists(st.integers(0, 3 * 24 * 60), min_size=30, max_size=30))
def test_no_cap_is_ever_exceeded_across_a_customers_invoices(start, cap, hours, zone, invoices, gaps):
    """Invoices ask to call at random moments. In time order (as the runs would), each asks the
    rules: allowed, the call is made then; deferred, it asks again at the time it was given. In
    no rolling window are there more calls than the cap, and every call is eventually made."""
    rules = ContactRules(hours=hours, caps={"voice": cap})
    customer = Customer(timezone=zone, phone=None, country=None, region=None)
    limit, span = parse_cap(cap)
    made: list[tuple[datetime, int]] = []
    asking: list[tuple[datetime, int, int]] = []  # (when it asks, order, invoice): a heap
    asked = start
    for number, (invoice, gap) in enumerate(zip(invoices, gaps, strict=False)):
        asked += timedelta(minutes=gap)
        heapq.heappush(asking, (asked, number, invoice))
    for _ in range(len(invoices) * 60):
        if not asking:
            break
        moment, number, invoice = heapq.heappop(asking)
        deferral = defer(moment, rules, customer, "voice", [(at, inv == invoice) for at, inv in made],
                         key=f"{invoice}/{number}")
        if deferral is None:
            made.append((moment, invoice))
        else:
            assert deferral.until > moment
            heapq.heappush(asking, (deferral.until, number, invoice))
    assert not asking, "a deferred call was never allowed"
    times = sorted(at for at, _ in made)
    for index, at in enumerate(times):
        in_window = [t for t in times[: index + 1] if at - span < t <= at]
        assert len(in_window) <= limit, (cap, in_window)
    assert len(made) == len(invoices)


def test_a_cap_frees_when_the_oldest_contact_leaves_the_window():
    calls = [START, START + timedelta(hours=1)]
    assert cap_frees_at(calls, "3/7d", START + timedelta(hours=2)) is None
    assert cap_frees_at(calls, "2/7d", START + timedelta(hours=2)) == START + timedelta(days=7)
    assert cap_frees_at(calls, "1/7d", START + timedelta(hours=2)) == START + timedelta(days=7, hours=1)


def test_business_days_skip_weekends_and_the_countrys_holidays():
    rules = ContactRules(hours="08:00-21:00", days="business")
    germany = Customer(timezone="Europe/Berlin", phone=None, country="DE", region=None)
    christmas_eve = datetime(2026, 12, 24, 22, 0, tzinfo=ZoneInfo("Europe/Berlin"))  # Thursday night
    deferral = defer(christmas_eve, rules, germany, "email", key="k")
    assert deferral is not None
    # 25 and 26 December are holidays in Germany, 27 December is a Sunday
    assert deferral.until.astimezone(ZoneInfo("Europe/Berlin")).date() == date(2026, 12, 28)
    anywhere = Customer(timezone="Europe/Berlin", phone=None, country=None, region=None)
    assert defer(christmas_eve, rules, anywhere, "email", key="k").until.date() == date(2026, 12, 25)


def test_a_number_spanning_zones_is_called_only_when_every_zone_allows_it():
    zones = customer_zones(None, "+18005550100", "UTC")  # a US toll-free number: every US zone
    assert {"America/New_York", "Pacific/Honolulu"} <= set(zones)
    rules = ContactRules(hours="08:00-21:00")
    customer = Customer(timezone=None, phone="+18005550100", country="US", region=None)
    nine_pm_new_york = datetime(2026, 6, 1, 20, 30, tzinfo=ZoneInfo("America/New_York"))
    deferral = defer(nine_pm_new_york, rules, customer, "voice", key="k")
    assert deferral is not None  # 08:30 p.m. in New York, but 02:30 p.m. in Honolulu
    window = Window.of(rules)
    assert open_everywhere(window, deferral.until, zones)
    assert customer_zones(None, "+14155550100", "UTC") == ("America/Los_Angeles",)
    assert customer_zones(None, None, "Europe/Paris") == ("Europe/Paris",)
    assert customer_zones("Asia/Tokyo", "+14155550100", "UTC") == ("Asia/Tokyo",)


def test_a_regions_overlay_narrows_hours_and_lowers_caps():
    rules = ContactRules(hours="08:00-21:00", caps={"voice": "7/7d"},
                         regions={"US-MA": Overlay(caps_per_invoice={"voice": "2/7d", "sms": "2/7d"}),
                                  "US-XX": Overlay(contact_hours="09:00-20:00", caps={"voice": "3/7d"})})
    massachusetts = rules.for_customer("US", "US-MA")
    assert massachusetts.caps_per_invoice == {"voice": "2/7d", "sms": "2/7d"}
    strict = rules.for_customer("US", "US-XX")
    assert strict.hours == "09:00-20:00" and strict.caps == {"voice": "3/7d"}
    customer = Customer(timezone="America/New_York", phone=None, country="US", region="US-MA")
    noon = datetime(2026, 6, 1, 12, tzinfo=ZoneInfo("America/New_York"))
    same_debt = [(noon - timedelta(days=1), True), (noon - timedelta(days=2), True)]
    other_debt = [(noon - timedelta(days=1), False), (noon - timedelta(days=2), False)]
    assert defer(noon, rules, customer, "voice", other_debt, key="k") is None
    deferral = defer(noon, rules, customer, "voice", same_debt, key="k")
    assert deferral is not None and deferral.reason == "cap: voice 2/7d per invoice reached"


@pytest.mark.parametrize(("snippet", "field"), [
    ('contact_hours = "21:00-08:00"', "contact_hours"),
    ('contact_hours = "8-21"', "contact_hours"),
    ('contact_days = "weekends"', "contact_days"),
    ('caps = { voice = "seven" }', "caps.voice"),
    ('caps = { fax = "1/1d" }', "caps.fax"),
    ('default_timezone = "Mars/Olympus"', "default_timezone"),
])
def test_bad_contact_fields_are_refused_naming_the_field(tmp_path: Path, snippet: str, field: str):
    path = tmp_path / "p.toml"
    path.write_text(f'[policies.p]\nversion = 1\n{snippet}\n'
                    'steps = [{ name = "friendly_reminder", after_due = "1d", channel = "email" }]\n')
    with pytest.raises(PolicyError, match=f"policy 'p', field '{field}'"):
        load_policies(path)


def test_the_shipped_file_has_windows_caps_and_region_overlays():
    policies = load_policies(ROOT / "policies" / "default.toml")
    consumer = policies["consumer"].contact
    assert consumer.hours == "08:00-21:00"
    assert policies["standard"].contact.days == "business"
    assert consumer.caps["voice"] == "7/7d"
    assert consumer.for_customer("US", "US-MA").caps_per_invoice["voice"] == "2/7d"


# -- whole runs on the time-skipping server --------------------------------------------------------

NEW_YORK = ZoneInfo("America/New_York")


def shipped_policies(settings, tmp_path: Path, extra: str = ""):
    """Settings using the shipped policy file as it is (windows on), plus ``extra`` policies."""
    path = tmp_path / "shipped.toml"
    path.write_text((ROOT / "policies" / "default.toml").read_text() + extra)
    return settings.model_copy(update={"policy_file": path})


def at_local(day_offset: int, hour: int, *, weekday: bool = False) -> datetime:
    """``hour`` o'clock in New York, ``day_offset`` days from today there (or the first day
    after that which is a weekday: the standard policy contacts on business days)."""
    day = datetime.now(NEW_YORK).date() + timedelta(days=day_offset)
    while weekday and day.weekday() >= 5:
        day += timedelta(days=1)
    return datetime.combine(day, datetime.min.time(), tzinfo=NEW_YORK) + timedelta(hours=hour)


async def test_a_step_due_at_three_in_the_morning_goes_out_when_the_window_opens(
        time_env, settings, tmp_path):
    # the first reminder (1d after the due time) falls at 03:00 New York on a weekday
    due = at_local(3, 3, weekday=True) - timedelta(days=1)
    async with running(time_env, shipped_policies(settings, tmp_path)) as harness:
        invoice = sample_invoice(due_at=due.isoformat())
        handle = await harness.start(invoice)
        await harness.advance(handle, due + timedelta(days=1, hours=1) - datetime.now(UTC))
        status = await handle.query(InvoiceDunningWorkflow.status)
        assert harness.sent(invoice["invoice_id"]) == []
        assert status.deferred_until is not None and status.deferred_because.startswith("window:")
        opening = (due + timedelta(days=1)).replace(hour=8)
        assert opening <= status.deferred_until < opening + timedelta(minutes=30)
        assert status.next_step.at == status.deferred_until
        await harness.advance(handle, timedelta(hours=6))
        assert harness.sent(invoice["invoice_id"]) == [("friendly_reminder", "email")]
        sent_at = contact_times(harness, invoice["invoice_id"])[0]
        assert opening <= sent_at < opening + timedelta(minutes=30)
        trail = harness.trail(invoice["invoice_id"])
        assert ("communication", "deferred", "friendly_reminder", "email") in trail


CAPPED = """
[policies.capped_calls]
version = 1
caps = { voice = "2/7d" }
consolidate_within = "0s"  # three separate calls, to count them
steps = [
  { name = "phone_call",     after_due = "1d",  channel = "voice" },
  { name = "agency_handoff", after_due = "60d", channel = "agency" },
]
"""


def contact_times(harness: Harness, invoice_id: str) -> list[datetime]:
    return [d.contact_at for d in harness.ledger.deliveries(invoice_id)
            if d.status == "sent" and d.contact_at is not None]


async def test_a_call_cap_defers_the_third_call_of_a_customers_invoices(time_env, settings, tmp_path):
    due = at_local(1, 10)  # calls fall at 10:00 New York, inside the window
    async with running(time_env, shipped_policies(settings, tmp_path, CAPPED)) as harness:
        invoices = [sample_invoice(due_at=due.isoformat(), policy="capped_calls") for _ in range(3)]
        handles = [await harness.start(invoice) for invoice in invoices]
        for handle in handles:  # each run has its own clock on the time-skipping server
            await harness.advance(handle, due + timedelta(days=1, hours=2) - datetime.now(UTC))
        calls = [harness.sent(i["invoice_id"]) for i in invoices]
        assert [len(c) for c in calls] == [1, 1, 0]  # two calls; the third waits
        waiting = invoices[2]
        handle = harness.client.get_workflow_handle(f"dunning-{waiting['invoice_id']}")
        status = await handle.query(InvoiceDunningWorkflow.status)
        assert status.deferred_because == "cap: voice 2/7d reached"
        first = min(t for i in invoices for t in contact_times(harness, i["invoice_id"]))
        assert status.deferred_until == first + timedelta(days=7)
        await harness.advance(handle, timedelta(days=7))
        assert harness.sent(waiting["invoice_id"]) == [("phone_call", "voice")]
        third = contact_times(harness, waiting["invoice_id"])[0]
        assert third >= first + timedelta(days=7)
        assert ("communication", "deferred", "phone_call", "voice") in harness.trail(waiting["invoice_id"])


GATHERED = """
[policies.gathered]
version = 1
contact_hours = "00:00-24:00"
steps = [
  { name = "friendly_reminder", after_due = "1d",  channel = "email" },
  { name = "sms_reminder",      after_due = "15d", channel = "sms" },
]
"""


async def started_together(harness: Harness, policy: str, count: int, due: datetime,
                           ) -> tuple[list[dict], Callable[[timedelta], Awaitable[None]]]:
    """``count`` invoices of the sample customer on ``policy``, due at the same moment and
    started; and how to move every run's clock on by a duration (each run has its own clock on
    the time-skipping server), one after the other, then let the work settle."""
    invoices = [sample_invoice(due_at=due.isoformat(), policy=policy,
                               payment_url=f"https://billing.example.com/pay/{n}") for n in range(count)]
    handles = [await harness.start(invoice) for invoice in invoices]

    async def everyone_by(duration: timedelta) -> None:
        for handle in handles:
            try:
                await harness.advance(handle, duration)
            except RPCError as exc:  # one that was paid has ended
                assert "already completed" in exc.message
        await asyncio.sleep(1)

    return invoices, everyone_by


async def test_ten_invoices_of_one_customer_get_one_message_per_step(time_env, settings, tmp_path):
    """Ten invoices due together: one email on day 1 listing the nine still open (one was paid
    while the message gathered), and every invoice's ledger pointing to it; then one SMS."""
    due = datetime.now(UTC) + timedelta(minutes=5)
    async with running(time_env, shipped_policies(settings, tmp_path, GATHERED)) as harness:
        invoices, everyone_by = await started_together(harness, "gathered", 10, due)

        def outbox(channel: str) -> list:
            return [m for i in invoices for m in messages_for(harness.ledger.engine, i["invoice_id"])
                    if m.channel == channel]

        await everyone_by(due + timedelta(days=1, seconds=10) - datetime.now(UTC))  # all due: they gather
        rows = [d for i in invoices for d in harness.ledger.deliveries(i["invoice_id"])]
        assert sorted(d.status for d in rows) == ["bundled"] * 10
        paid = invoices[-1]["invoice_id"]
        await harness.dunning.pay(paid, "1250.00", payment_id="paid-before-the-message")
        await everyone_by(timedelta(minutes=3))
        await everyone_by(timedelta(minutes=3))
        emails = outbox("email")
        assert len(emails) == 1, [m.subject for m in emails]
        [email] = emails
        assert email.subject.startswith("9 overdue invoices")
        for invoice in invoices[:-1]:
            assert invoice["invoice_id"] in email.body and invoice["payment_url"] in email.body
        assert paid not in email.body
        shared = {d.provider_message_id for i in invoices[:-1]
                  for d in harness.ledger.deliveries(i["invoice_id"]) if d.status == "sent"}
        assert len(shared) == 1  # every ledger points to the one message
        for invoice in invoices[:-1]:
            trail = harness.trail(invoice["invoice_id"])
            assert ("communication", "sent", "friendly_reminder", "email") in trail
        await everyone_by(timedelta(days=14, minutes=-6))  # to day 15 and 10 seconds
        await everyone_by(timedelta(minutes=3))
        await everyone_by(timedelta(minutes=3))
        texts = outbox("sms")
        assert len(texts) == 1 and texts[0].body.count("https://billing.example.com/pay/") == 9


@settings(max_examples=200, deadline=None)
@given(offsets=st.lists(st.integers(1, 120), min_size=2, max_size=5, unique=True),
       notice_days=st.integers(0, 40), shift_hours=st.integers(0, 24 * 30),
       deferrals=st.lists(st.integers(0, 14 * 24), min_size=5, max_size=5))
def test_no_handoff_comes_earlier_than_the_rules_allow(offsets, notice_days, shift_hours, deferrals):
    """However long the messages before it were deferred (windows, caps, holds shifting the plan),
    the handoff is never before its scheduled day nor before the agency notice after the last
    message that reached the customer."""
    from models.policy import Channel, Step
    from models.run import ScheduledStep
    from models.schedule import Plan

    days = sorted(offsets)
    steps = [Step(name=f"s{n}", after_due=f"{d}d", channel="email") for n, d in enumerate(days[:-1])]
    steps.append(Step(name="agency_handoff", after_due=f"{days[-1]}d", channel=Channel.AGENCY))
    schedule = tuple(ScheduledStep(step=s, at=START + s.after_due) for s in steps)
    plan = Plan(schedule, timedelta(days=notice_days), timedelta(hours=shift_hours))
    last_notice = None
    for index, late in zip(range(len(steps) - 1), deferrals, strict=False):
        sent = plan.at(index) + timedelta(hours=late)  # sent when its deferral ended
        last_notice = sent if last_notice is None else max(last_notice, sent)
    handoff = plan.time_of(len(steps) - 1, last_notice)
    assert handoff >= schedule[-1].at + timedelta(hours=shift_hours)
    assert last_notice is None or handoff >= last_notice + timedelta(days=notice_days)
