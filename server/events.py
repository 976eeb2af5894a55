"""The job event stream: event names (API.md), the stored form, and following a job's events to its end."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.queue.base import JobQueue

QUEUED, STARTED, COMPLETED, FAILED, CANCELLED = "queued", "started", "completed", "failed", "cancelled"
ENGINE_EVENTS = (
    "thinking.delta",
    "thinking.done",
    "image.progress",
    "image.done",
    "reflection.delta",
    "reflection.done",
    "answer.delta",
    "answer.done",
)
TERMINAL_EVENTS = frozenset({COMPLETED, FAILED, CANCELLED})
EVENT_ID = re.compile(r"^\d{1,19}(-\d{1,19})?$")  # a Redis stream id, or the in-process queue's counter
READ_BLOCK_S = 5.0  # longest single wait for new events (short, so a gone job or client is noticed)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event of a job's stream: `id` orders it within the job, `data` is its JSON text."""

    id: str
    type: str
    data: str

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def valid_event_id(value: str) -> bool:
    return bool(EVENT_ID.match(value))


async def follow(
    queue: JobQueue, job_id: str, after: str | None = None, deadline: float | None = None
) -> AsyncIterator[list[StoredEvent]]:
    """A job's events after `after`, in batches as they come, through its terminal event (or until `deadline`,
    monotonic)."""
    while True:
        block = READ_BLOCK_S if deadline is None else min(READ_BLOCK_S, deadline - time.monotonic())
        if block <= 0:
            return
        events = await queue.read_events(job_id, after, block)
        ends = next((i for i, e in enumerate(events) if e.terminal), None)
        if ends is not None:
            yield events[: ends + 1]
            return
        if events:
            yield events
            after = events[-1].id
        else:
            job = await queue.get(job_id)
            if job is None or job.terminal:  # gone, or resumed after its last event: nothing more will come
                return
