"""The one message a cease-communication hold still allows: a confirmation to the customer that
we stop contacting them (Regulation F lets a collector say its efforts are ending). One short run
per hold placed, so a customer with ten invoices gets one message, sent like any other: through
the delivery ledger (exactly once), in the customer's contact window, not stopped by the hold.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from models.delivery import DeliveryRequest, DeliveryResult, DeliveryStatus, Purpose
    from models.policy import Channel
    from models.run import CustomerNotice
    from workflows.dunning import DELIVERY_WINDOW, delivery_options, ran_out_of_time


@workflow.defn
class CustomerNoticeWorkflow:
    @workflow.run
    async def run(self, notice: CustomerNotice) -> DeliveryResult:
        while True:
            request = DeliveryRequest(
                workflow_id=workflow.info().workflow_id, invoice=notice.invoice, step=notice.step,
                template=notice.template, channels=(Channel.EMAIL, Channel.SMS),
                purpose=Purpose.CONFIRMATION, balance_due=notice.balance_due, as_of=workflow.now(),
                contact=notice.contact,
            )
            try:
                result = await workflow.execute_activity(
                    "deliver", request, result_type=DeliveryResult, **delivery_options(DELIVERY_WINDOW),
                    summary="confirmation to the customer",
                )
            except ActivityError as err:  # retried up to its window: try again
                if not ran_out_of_time(err):
                    raise
                continue
            if result.status is DeliveryStatus.DEFERRED and result.until is not None:
                await workflow.sleep(result.until - workflow.now(), summary="outside the contact window")
                continue
            return result
