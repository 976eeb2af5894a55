"""A job's events as an SSE response, with bounded memory per client.

sse-starlette does the framing rules, pings, disconnects and shutdown; on top of it:
- events go out as the client takes them, in writes of at most `WRITE_BYTES` (a large event, e.g. an inline
  image, is written in slices), so a client that does not read holds at most about two writes in this
  process (ours plus uvicorn's 64 KiB transport buffer), never the job's whole stream;
- every send, the last one included, waits at most `IRG_SSE_SEND_TIMEOUT_S`: a client that takes no data for
  that long is dropped (sse-starlette leaves the final send without a limit);
- `irg_open_streams` counts the open streams of this process; `irg_streams_dropped` the dropped ones.

A dropped client's connection is aborted, not closed: a graceful close would keep the socket, and the bytes
queued for it, until the client reads them, i.e. for ever. Where the server exposes its transport (uvicorn's
`send` is a method of its request cycle), `remember_transport` records how to abort it in the scope.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError, ensure_bytes
from starlette.types import Receive, Scope, Send

from server import metrics
from server.events import StoredEvent, follow
from server.live import merge_live, resumed_notice
from server.queue.base import JobQueue, QueueUnavailable
from server.settings import Settings

log = logging.getLogger(__name__)
RECONNECT_MS = 1000  # how soon an EventSource reconnects after the stream drops
WRITE_BYTES = 64 * 1024  # most bytes handed to the server in one send
SEP = "\r\n"  # sse-starlette's line separator
REATTACH_S = 20.0  # how long an open stream waits for an unreachable queue before it ends
REATTACH_POLL_S = 0.5


def sse_content(names: list[str], description: str) -> dict[str, Any]:
    """OpenAPI content of an SSE response: each event as {event, id, data (JSON text), retry}."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string", "enum": names},
            "id": {"type": "string"},
            "data": {"type": "string", "description": "JSON"},
            "retry": {"type": "integer"},
        },
    }
    return {"text/event-stream": {"schema": event, "description": description}}


def frame(event: StoredEvent, retry: int | None = None) -> Iterator[bytes]:
    """One event in SSE framing, as pieces of at most WRITE_BYTES characters of its data (no full copy)."""
    data = event.data
    if "\n" in data or "\r" in data:  # not from our compact JSON; the general framing splits it into lines
        yield ServerSentEvent(data=data, event=event.type, id=event.id, retry=retry, sep=SEP).encode()
        return
    head = f"id: {event.id}{SEP}event: {event.type}{SEP}" + (f"retry: {retry}{SEP}" if retry is not None else "")
    yield (head + "data: ").encode()
    for i in range(0, len(data), WRITE_BYTES):
        yield data[i : i + WRITE_BYTES].encode()
    yield (SEP + SEP).encode()


def writes(batch: list[StoredEvent], retry: int | None) -> Iterator[bytes]:
    """A batch of events as writes of about WRITE_BYTES: small events together, a large one in slices."""
    pending = bytearray()
    for event in batch:
        for piece in frame(event, retry):
            pending += piece
            if len(pending) >= WRITE_BYTES:
                yield bytes(pending)
                pending.clear()
        retry = None
    if pending:
        yield bytes(pending)


async def _events(queue: JobQueue, job_id: str, after: str | None) -> AsyncIterator[bytes]:
    """The job's events after `after`, to its end. While the queue is unreachable the stream stays open (pings
    go on) and re-attaches after the last event sent; after REATTACH_S of outage it ends, and the client
    resumes with Last-Event-ID."""
    retry: int | None = RECONNECT_MS  # told once, with the first event
    down_since: float | None = None
    while True:
        try:
            async for batch in follow(queue, job_id, after):
                down_since = None
                for chunk in writes(batch, retry):
                    yield chunk
                retry = None
                after = batch[-1].id
            return
        except QueueUnavailable as e:
            now = time.monotonic()
            down_since = now if down_since is None else down_since
            if now - down_since >= REATTACH_S:
                log.warning("job=%s stream ended after %.0f s without the queue: %s", job_id, now - down_since, e)
                return
            await anyio.sleep(min(REATTACH_POLL_S, REATTACH_S - (now - down_since)))


ABORT = "irg.abort"  # scope key: a callable that aborts the connection


def remember_transport(scope: Scope, send: Send) -> None:
    """Record in the scope how to abort this connection, when the server's `send` tells (uvicorn's does)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if scope.get("type") == "http" and callable(getattr(transport, "abort", None)):
        scope[ABORT] = transport.abort  # type: ignore[union-attr]


class BoundedEventSourceResponse(EventSourceResponse):
    """An EventSourceResponse whose final send is under the send timeout too, counted in `irg_open_streams`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.OPEN_STREAMS.inc()
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:  # the connection is dropped; what the client missed it can resume
            metrics.STREAMS_DROPPED.inc()
            log.warning(
                "dropped an event stream whose client took no data for %g s (%s)",
                self.send_timeout,
                scope.get("path", ""),
            )
            abort = scope.get(ABORT)
            if abort is not None:
                abort()
                await anyio.sleep(0)  # let the server see the connection lost before this returns
        finally:
            metrics.OPEN_STREAMS.dec()

    async def _stream_response(self, send: Send) -> None:
        # sse-starlette's own, except that the last send (`more_body: False`) has the timeout too: a client
        # that stopped reading would otherwise hold the connection and its buffered bytes for ever.
        await self._send_with_timeout(
            send, {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for data in self.body_iterator:
            try:
                chunk = ensure_bytes(data, self.sep)
                await self._send_with_timeout(send, {"type": "http.response.body", "body": chunk, "more_body": True})
            except BaseException:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with anyio.move_on_after(self._cleanup_timeout, shield=True):
                        await aclose()
                raise
        async with self._send_lock:
            self.active = False
            await self._send_with_timeout(send, {"type": "http.response.body", "body": b"", "more_body": False})


def bounded_response(content: AsyncIterator[Any], settings: Settings) -> BoundedEventSourceResponse:
    return BoundedEventSourceResponse(content, ping=settings.sse_ping_s, send_timeout=settings.sse_send_timeout_s)


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
    return bounded_response(_with_live(queue, job_id, after), settings)


async def wait_for_end(queue: JobQueue, job_id: str, timeout: float) -> None:
    """Return when the job has ended, or after `timeout` seconds."""
    async for _ in follow(queue, job_id, None, deadline=time.monotonic() + timeout):
        pass  # the events themselves are not needed, only that the last one came
