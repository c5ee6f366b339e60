"""Telling the agency after an invoice's run has ended: a payment on, or the recall of, an account
it still holds. The run itself listens for these while it is open; this short run covers the
months after (a payment must never be lost because the run that would have reported it is over).
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from models.delivery import DeliveryRequest, DeliveryResult, Purpose
    from models.policy import Channel
    from models.run import AgencyNoticeRun
    from workflows.dunning import DELIVERY_WINDOW, delivery_options, ran_out_of_time


@workflow.defn
class AgencyNoticeWorkflow:
    @workflow.run
    async def run(self, notice: AgencyNoticeRun) -> DeliveryResult:
        request = DeliveryRequest(
            workflow_id=notice.invoice.workflow_id, invoice=notice.invoice, step=notice.note.key,
            template="agency_handoff", channels=(Channel.AGENCY,), purpose=Purpose(notice.note.purpose),
            balance_due=notice.balance_due, as_of=workflow.now(), payment=notice.note.payment,
            reason=notice.note.reason,
        )
        while True:  # an agency outage delays the report; it never drops it
            try:
                return await workflow.execute_activity(
                    "deliver", request, result_type=DeliveryResult, **delivery_options(DELIVERY_WINDOW),
                    summary=f"{request.purpose.value.replace('_', ' ')} to the agency",
                )
            except ActivityError as err:  # retried up to its window: try again, never drop it
                if not ran_out_of_time(err):
                    raise
