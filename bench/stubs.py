"""Stand-ins for the dunning activities, for ``bench.lifecycle --breakdown``.

They take and return the real types (so payload conversion is the same) and do nothing else: a
dunning run on these costs the workflow, the SDK and the client, without the database, the
templates or the outbox. The difference to the real run is what the activities cost.
"""

from __future__ import annotations

from temporalio import activity

from models.delivery import DeliveryRequest, DeliveryResult, DeliveryStatus, Purpose
from models.run import RecordBatch


@activity.defn(name="deliver")
def deliver(request: DeliveryRequest) -> DeliveryResult:
    notice = DeliveryStatus.SENT if request.purpose is Purpose.HANDOFF else None
    return DeliveryResult(status=DeliveryStatus.SENT, channel=request.channels[0],
                          provider_message_id="stub", detail="stub", notice=notice)


@activity.defn(name="record")
def record(batch: RecordBatch) -> None:
    return None


@activity.defn(name="customer_holds")
def customer_holds(customer_id: str) -> list[str]:
    return []
