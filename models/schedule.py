"""When each step of a run is due, and when a reminder has gone stale: pure functions over the
schedule fixed when the run started. The workflow asks these with the time it is; they need
neither Temporal nor a database, so they are tested alone (and cost a run nothing to import).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from models.policy import Channel
from models.run import ScheduledStep


@dataclass(frozen=True)
class Plan:
    """``shift``: how far the schedule has moved for holds (a pause, a dispute) that ended."""

    schedule: tuple[ScheduledStep, ...]
    agency_notice: timedelta
    shift: timedelta = field(default=timedelta(0))

    def at(self, index: int) -> datetime:
        """A step's time in the schedule, moved by the holds so far."""
        return self.schedule[index].at + self.shift

    def time_of(self, index: int, last_notice_at: datetime | None) -> datetime:
        """When a step is due: its scheduled time; a handoff also waits out the agency notice
        after the last message that reached the customer."""
        at = self.at(index)
        if self.schedule[index].step.channel is Channel.AGENCY and last_notice_at is not None:
            return max(at, last_notice_at + self.agency_notice)
        return at

    def later_reminder(self, index: int) -> datetime | None:
        """The time of the next customer reminder after step ``index`` (the handoff is not one)."""
        for later in range(index + 1, len(self.schedule)):
            if self.schedule[later].step.channel is not Channel.AGENCY:
                return self.at(later)
        return None

    def overtaken(self, index: int, now: datetime) -> bool:
        """A later reminder is already due: this one would arrive stale, right before it."""
        later = self.later_reminder(index)
        return later is not None and later <= now

    def past_halfway(self, index: int, now: datetime) -> bool:
        """Too close to the next reminder: sending now would put two messages minutes apart."""
        later = self.later_reminder(index)
        at = self.at(index)
        return later is not None and now >= at + (later - at) / 2

    def deadline(self, index: int) -> datetime | None:
        """Until when a reminder may still go out: the next reminder's time (None: no limit)."""
        return self.later_reminder(index)

    def summary(self, index: int) -> str:
        """What the timer before step ``index`` waits for, as the Temporal UI shows it."""
        step = self.schedule[index].step
        return f"wait until {step.when} -> {step.label} by {step.channel}"
