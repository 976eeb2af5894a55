"""A job's events as an SSE response (sse-starlette does the framing, pings, disconnects and shutdown)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from server.events import follow
from server.live import merge_live, resumed_notice
from server.queue.base import JobQueue, QueueUnavailable
from server.settings import Settings

log = logging.getLogger(__name__)
RECONNECT_MS = 1000  # how soon an EventSource reconnects after the stream drops


def sse_content(names: list[str], description: str) -> dict[str, Any]:
    """OpenAPI content of an SSE response: each event as {event, id, data (JSON text), retry}."""
    event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string", "enum": names}, "id": {"type": "string"},
        "data": {"type": "string", "description": "JSON"}, "retry": {"type": "integer"}}}
    return {"text/event-stream": {"schema": event, "description": description}}


async def _events(queue: JobQueue, job_id: str, after: str | None) -> AsyncIterator[bytes]:
    retry: int | None = RECONNECT_MS  # told once, with the first event
    try:
        async for batch in follow(queue, job_id, after):  # a batch goes out in one write
            chunk = b""
            for event in batch:
                chunk += ServerSentEvent(data=event.data, event=event.type, id=event.id, retry=retry).encode()
                retry = None
            yield chunk
    except QueueUnavailable as e:  # end the stream; the client resumes with Last-Event-ID
        log.warning("job=%s stream ended: %s", job_id, e)


async def _with_live(queue: JobQueue, job_id: str, after: str | None) -> AsyncIterator[bytes]:
    """The durable events plus the job's ephemeral ones (previews, no SSE id; see server/live.py)."""
    live = getattr(queue, "live", None)
    if after is not None:
        yield resumed_notice(after)
    if live is None:
        async for chunk in _events(queue, job_id, after):
            yield chunk
        return
    async with live(job_id) as watcher:
        async for chunk in merge_live(_events(queue, job_id, after), watcher):
            yield chunk


def event_response(queue: JobQueue, job_id: str, after: str | None, settings: Settings) -> EventSourceResponse:
    return EventSourceResponse(_with_live(queue, job_id, after), ping=settings.sse_ping_s,
                               send_timeout=settings.sse_send_timeout_s)


async def wait_for_end(queue: JobQueue, job_id: str, timeout: float) -> None:
    """Return when the job has ended, or after `timeout` seconds."""
    async for _ in follow(queue, job_id, None, deadline=time.monotonic() + timeout):
        pass  # the events themselves are not needed, only that the last one came
