"""Events and Temporal Cloud billable actions of one workflow history.

Actions are counted the way Temporal Cloud bills them, as far as the history shows them:

- the start (``WorkflowExecutionStarted``; search attributes given with the start cost nothing more);
- each ``TimerStarted``;
- each ``ActivityTaskScheduled``, plus each extra attempt (``ActivityTaskStarted.attempt - 1``: the
  history keeps only the last attempt's start event);
- each ``WorkflowExecutionSignaled``, ``UpsertWorkflowSearchAttributes`` and
  ``WorkflowExecutionUpdateAccepted``;
- local activities: one per workflow task completion that records local-activity markers (all the
  local activities of one workflow task are one action);
- each continue-as-new.

Not in a history, so not counted here: queries, activity heartbeats (the delivery activity only
heartbeats when it runs longer than 1.5 s) and the start of a continue-as-new's next run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory

LOCAL_ACTIVITY_MARKER = "core_local_activity"

_ONE_EACH = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "start",
    EventType.EVENT_TYPE_TIMER_STARTED: "timers",
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: "activities",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: "signals",
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: "upserts",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: "updates",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW: "continue_as_new",
}


@dataclass
class Tally:
    workflow_id: str
    events: int
    actions: Counter[str] = field(default_factory=Counter)
    event_types: Counter[str] = field(default_factory=Counter)
    other_markers: int = 0  # e.g. patch markers: not billed, shown for the record

    @property
    def total_actions(self) -> int:
        return sum(self.actions.values())

    def breakdown(self) -> str:
        order = ("start", "timers", "activities", "retries", "upserts", "signals",
                 "local_activity_tasks", "updates", "continue_as_new")
        return " + ".join(f"{name} {self.actions[name]}" for name in order if self.actions[name])


def tally(history: WorkflowHistory) -> Tally:
    result = Tally(workflow_id=history.workflow_id, events=len(history.events))
    local_activity_tasks: set[int] = set()
    for event in history.events:
        result.event_types[EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")] += 1
        name = _ONE_EACH.get(event.event_type)
        if name is not None:
            result.actions[name] += 1
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            result.actions["retries"] += max(0, event.activity_task_started_event_attributes.attempt - 1)
        elif event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            marker = event.marker_recorded_event_attributes
            if marker.marker_name == LOCAL_ACTIVITY_MARKER:
                local_activity_tasks.add(marker.workflow_task_completed_event_id)
            else:
                result.other_markers += 1
    result.actions["local_activity_tasks"] = len(local_activity_tasks)
    return result
