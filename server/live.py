"""Ephemeral job events (`image.preview`): sent to whoever watches the job now, never stored.

They travel beside the durable event log, not in it: no SSE id (so a client's Last-Event-ID always names a
durable event and resuming loses none of those), no replay (a resumed stream is told so with a
`stream.resumed` event and carries on with the next previews), bounded buffers that drop the oldest preview
rather than wait (the worker never blocks on a slow watcher).

- in-process queue (`MemoryQueue`): a `LiveHub` hands each event to the live watchers' asyncio queues;
- Redis queue: the worker PUBLISHes on `{p}:live:{job}`; an API process subscribes while a client watches.

`merge_live` interleaves a job's durable SSE chunks with its live events for one client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sse_starlette import ServerSentEvent

log = logging.getLogger(__name__)
T = TypeVar("T")
LIVE_BUFFER = 8  # live events a watcher holds at most (the oldest is dropped first)
RESUMED = "stream.resumed"


@dataclass(frozen=True, slots=True)
class LiveEvent:
    type: str
    data: str  # JSON text

    def to_json(self) -> str:
        return json.dumps({"type": self.type, "data": self.data}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> LiveEvent:
        d = json.loads(raw)
        return cls(str(d["type"]), str(d["data"]))


class Watcher:
    """One client's live events: a small asyncio queue on its loop, fed from any thread without waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = LIVE_BUFFER):
        self.loop = loop
        self.queue: asyncio.Queue[LiveEvent] = asyncio.Queue(size)
        self.dropped = 0

    def put(self, event: LiveEvent) -> None:
        """On the watcher's loop: add, dropping the oldest when full."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    def offer(self, event: LiveEvent) -> None:
        """From any thread; never blocks, never raises."""
        try:
            self.loop.call_soon_threadsafe(self.put, event)
        except RuntimeError:  # the loop is closed: the client is gone
            pass


class LiveHub:
    """In-process fan-out of live events to the watchers of each job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[str, set[Watcher]] = {}

    def publish(self, job_id: str, event: LiveEvent) -> int:
        """Hand `event` to the job's watchers (any thread); returns how many there were."""
        with self._lock:
            watchers = list(self._watchers.get(job_id, ()))
        for w in watchers:
            w.offer(event)
        return len(watchers)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Watcher]:
        w = Watcher(asyncio.get_running_loop())
        with self._lock:
            self._watchers.setdefault(job_id, set()).add(w)
        try:
            yield w
        finally:
            with self._lock:
                ws = self._watchers.get(job_id)
                if ws is not None:
                    ws.discard(w)
                    if not ws:
                        del self._watchers[job_id]


class RedisLive:
    """An API process's live events from Redis: ONE pattern subscription (`{p}:live:*`) for all jobs, fanned
    out to the local watchers by a `LiveHub`; started with the first watcher, reconnecting on errors."""

    def __init__(self, client: Any, prefix: str):
        self.r, self.prefix = client, prefix
        self.hub = LiveHub()
        self.task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[Watcher]:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._read())
        with self.hub.watch(job_id) as w:
            yield w

    async def _read(self) -> None:
        while True:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.prefix + "*")
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None or msg.get("type") != "pmessage":
                        continue
                    channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        self.hub.publish(channel[len(self.prefix) :], LiveEvent.from_json(msg["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # best effort: the durable stream goes on without previews meanwhile
                log.warning("live events: %s (retrying)", e)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def encode_live(event: LiveEvent) -> bytes:
    """An SSE frame without an id: it does not move the client's Last-Event-ID."""
    return ServerSentEvent(data=event.data, event=event.type).encode()


def resumed_notice(after: str) -> bytes:
    data = json.dumps(
        {
            "after": after,
            "note": "resumed after a durable event; previews (image.preview) are "
            "ephemeral and the ones sent before are not replayed",
        }
    )
    return encode_live(LiveEvent(RESUMED, data))


async def merge_items(source: AsyncIterator[T], watcher: Watcher) -> AsyncIterator[T | LiveEvent]:
    """The items of `source` in order, with the watcher's live events slipped in between as they come; ends
    with `source` (whose errors are raised here)."""
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(1)

    async def pump() -> None:
        try:
            async for item in source:
                await items.put(("item", item))
        except Exception as e:
            await items.put(("error", e))
            return
        await items.put(("end", None))

    loop = asyncio.get_running_loop()
    pumping = loop.create_task(pump())
    next_item: asyncio.Task[Any] | None = None
    next_live: asyncio.Task[Any] | None = None
    try:
        while True:
            next_item = next_item or loop.create_task(items.get())
            next_live = next_live or loop.create_task(watcher.queue.get())
            done, _ = await asyncio.wait({next_item, next_live}, return_when=asyncio.FIRST_COMPLETED)
            if next_live in done:
                yield next_live.result()
                next_live = None
            if next_item in done:
                kind, value = next_item.result()
                next_item = None
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
    finally:
        for task in (next_item, next_live, pumping):
            if task is not None:
                task.cancel()
        with contextlib.suppress(BaseException):
            await pumping


async def merge_live(durable: AsyncIterator[bytes], watcher: Watcher) -> AsyncIterator[bytes]:
    """Durable SSE chunks with the live events encoded in between."""
    async for item in merge_items(durable, watcher):
        yield encode_live(item) if isinstance(item, LiveEvent) else item
