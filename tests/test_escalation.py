"""The whole dunning story on the time-skipping server: 60 days of escalation in seconds."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from models.run import RunState
from tests.conftest import Harness, sample_invoice
from workflows.dunning import InvoiceDunningWorkflow

STANDARD = [
    ("friendly_reminder", "email"),
    ("sms_reminder", "sms"),
    ("phone_call", "voice"),
    ("agency_handoff", "agency"),
    ("agency_handoff", "email"),  # the customer is told the account was referred
]


async def test_unpaid_invoice_escalates_through_every_step_to_the_agency(harness: Harness):
    invoice = sample_invoice()
    handle = await harness.start(invoice)
    await harness.advance(handle, timedelta(days=61))
    status = await handle.query(InvoiceDunningWorkflow.status)
    assert status.state is RunState.HANDED_OFF
    assert status.stage == "agency_handoff"
    assert harness.sent(invoice["invoice_id"]) == STANDARD
    final = await harness.finish(handle)
    assert final.state is RunState.HANDED_OFF
    assert final.balance_due == Decimal("1250.00")
