"""One blocking read of a job's Redis stream per API process, however many clients watch the job.

Without it, every SSE client holds a Redis connection in XREAD and every event is fetched and parsed once per
client. A `Follower` reads the stream once (starting with its last `BUFFER` events), keeps the recent events in
memory, shared by every reader, and wakes the local readers;
a reader asking for events older than what it holds (a late client, a resume far back) reads them from Redis
directly, then catches up with the follower.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from server.events import StoredEvent

BUFFER = 4096  # events a follower keeps
BLOCK_MS = 5000
LINGER_S = 10.0  # a follower nobody read from for this long stops


def stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def to_events(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[StoredEvent]:
    return [StoredEvent(text(eid), text(f[b"type"]), text(f[b"data"])) for eid, f in entries]


class Follower:
    """The events of one stream after `base`, as they arrive."""

    def __init__(self, client: aioredis.Redis, key: str, base: str, events: list[StoredEvent] | None = None):
        self.r, self.key = client, key
        self.base = stream_id(base)  # every event after this id is in `events` (or was trimmed: base moves)
        self.events: list[StoredEvent] = list(events or [])
        self.ids: list[tuple[int, int]] = [stream_id(e.id) for e in self.events]
        self.last = self.events[-1].id if self.events else base
        self.changed = asyncio.Event()
        self.ended = bool(self.events) and self.events[-1].terminal  # nothing more will come
        self.error: BaseException | None = None
        self.users = 0
        self.idle: asyncio.TimerHandle | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while not self.ended:
                got = await self.r.xread({self.key: self.last}, count=1000, block=BLOCK_MS)
                if got:
                    self._add(to_events(got[0][1]))
        except Exception as e:  # readers see it and re-raise; the next reader starts a new follower
            self.error = e
        finally:
            self.ended = True
            self._wake()

    def _add(self, events: list[StoredEvent]) -> None:
        self.events += events
        self.ids += [stream_id(e.id) for e in events]
        self.last = events[-1].id
        self.ended = any(e.terminal for e in events)
        if len(self.events) > BUFFER:
            cut = len(self.events) - BUFFER
            self.base = self.ids[cut - 1]
            del self.events[:cut], self.ids[:cut]
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def covers(self, after: str | None) -> bool:
        return stream_id(after or "0-0") >= self.base

    def after(self, after: str | None) -> list[StoredEvent]:
        return self.events[bisect.bisect_right(self.ids, stream_id(after or "0-0")) :]

    async def wait_after(self, after: str | None, timeout: float) -> list[StoredEvent]:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.after(after) and not self.ended:
                    await self.changed.wait()
        if self.error is not None and not self.after(after):
            raise self.error
        return self.after(after)


class Fanout:
    """The followers of one API process, one per watched stream."""

    def __init__(self, client: aioredis.Redis):
        self.r = client
        self.followers: dict[str, Follower] = {}

    @contextlib.asynccontextmanager
    async def follow(self, key: str) -> AsyncIterator[Follower]:
        follower = self.followers.get(key)
        if follower is None or follower.error is not None:
            # The stream's recent events, so that every client of this job reads one copy of them (clients
            # of a finished job too); one more than kept tells whether older ones exist.
            recent = to_events(await self.r.xrevrange(key, count=BUFFER + 1))[::-1]
            base = recent.pop(0).id if len(recent) > BUFFER else "0-0"
            follower = self.followers[key] = Follower(self.r, key, base, recent)
        follower.users += 1
        if follower.idle is not None:
            follower.idle.cancel()
            follower.idle = None
        try:
            yield follower
        finally:
            follower.users -= 1
            if follower.users == 0:
                follower.idle = asyncio.get_running_loop().call_later(LINGER_S, self._drop, key, follower)

    def _drop(self, key: str, follower: Follower) -> None:
        if follower.users == 0 and self.followers.get(key) is follower:
            del self.followers[key]
            follower.task.cancel()

    async def close(self) -> None:
        for follower in self.followers.values():
            follower.task.cancel()
        self.followers.clear()
