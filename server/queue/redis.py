"""The Redis backend: jobs, leases, events and images in Redis, so any API replica serves any job and any
worker can take over a job whose worker died.

`RedisJobQueue` is the API's face (redis asyncio client); `RedisWorkerQueue` the worker's (sync client, used
from the worker loop and its timer thread). Keys are in `keys.py`, the atomic steps in `lua.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from server.events import StoredEvent
from server.jobs import API_FIELDS, TERMINAL_STATUSES, JobRecord
from server.live import LiveEvent, RedisLive, Watcher
from server.queue import lua
from server.queue.base import Claim, LeaseLost, QueueFull, QueueUnavailable, WorkerInfo, attempts_exhausted
from server.queue.durability import check_async
from server.queue.fanout import Fanout, text, to_events
from server.queue.keys import PENDING_TTL_S, WAKE_MAXLEN, Keys
from server.queue.redis_conn import DETAIL, DOWN, async_client_options, public_reason, sync_client_options
from server.settings import Settings

log = logging.getLogger(__name__)
READ_COUNT = 100  # events per read from Redis at most (what a client older than the fanout holds)
POOL_WAIT_S = 5.0  # how long a command waits for a free pooled connection
STREAM_CONNECTIONS = 10_000  # one per job watched at once, at most Redis's default maxclients
F = TypeVar("F", bound=Callable[..., Any])


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _flat(fields: dict[str, str]) -> list[str]:
    return [x for kv in fields.items() for x in kv]


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _available(fn: F) -> F:
    """Turn 'Redis cannot be reached' into QueueUnavailable (an async method)."""

    @wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except DOWN as e:  # the detail (it names Redis's address) goes to the log only
            DETAIL.warn("redis: %s: %s", type(e).__name__, e)
            raise QueueUnavailable(public_reason(e)) from e

    return wrapper  # type: ignore[return-value]


def _redis_url(settings: Settings) -> str:
    return settings.redis_url or "redis://127.0.0.1:6379/0"


class RedisJobQueue:
    """The API's face of the Redis queue."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.k = Keys(settings.redis_prefix)
        url = _redis_url(settings)
        # Short commands share a bounded pool (a burst waits for a connection instead of opening hundreds);
        # the blocking stream reads, one per watched job (fanout.py), get their own pool.
        self.r = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=settings.redis_pool_size, timeout=POOL_WAIT_S, **async_client_options()
            )
        )
        streams = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool.from_url(
                url, max_connections=STREAM_CONNECTIONS, **async_client_options()
            )
        )
        self.fanout = Fanout(streams)
        self.live_events = RedisLive(streams, self.k.live_prefix)  # one subscription per API process
        self._submit = self.r.register_script(lua.SUBMIT)
        self._cancel = self.r.register_script(lua.CANCEL)

    @_available
    async def submit(self, job: JobRecord) -> tuple[JobRecord, int | None, bool]:
        keys = [self.k.queue, self.k.job(job.id), self.k.events(job.id), self.k.wake]
        args = [job.id, self.s.queue_max, PENDING_TTL_S, WAKE_MAXLEN, *_flat(job.to_fields())]
        state, n = await self._submit(keys=keys, args=args)
        if state == -1:
            raise QueueFull(int(n))
        if state == 1:
            return job, int(n), True
        stored = await self.get(job.id)
        if stored is None:  # expired between the two calls
            raise QueueUnavailable("the job vanished while it was being read")
        return stored, (int(n) if n > 0 else None), False

    @_available
    async def get(self, job_id: str) -> JobRecord | None:
        """The job without its input images' bytes (`inputs`: a claim carries them to the worker)."""
        values = await self.r.hmget(self.k.job(job_id), API_FIELDS)
        if values[0] is None:  # no id: no such job
            return None
        return JobRecord.from_fields({k: v for k, v in zip(API_FIELDS, values, strict=True) if v is not None})

    @_available
    async def position(self, job_id: str) -> int | None:
        pos = await self.r.lpos(self.k.queue, job_id)
        return None if pos is None else int(pos) + 1

    @_available
    async def read_events(self, job_id: str, after: str | None, timeout: float) -> list[StoredEvent]:
        key = self.k.events(job_id)
        async with self.fanout.follow(key) as follower:
            if not follower.covers(after):  # older than what the follower holds: straight from Redis
                got = await self.r.xrange(key, min=f"({after}" if after else "-", count=READ_COUNT)
                if got:
                    return to_events(got)
            return await follower.wait_after(after, timeout)

    def live(self, job_id: str) -> contextlib.AbstractAsyncContextManager[Watcher]:
        """The job's ephemeral events (previews) from now on, while the context is open."""
        return self.live_events.watch(job_id)

    @_available
    async def get_image(self, job_id: str, round_index: int) -> bytes | None:
        data: bytes | None = await self.r.get(self.k.image(job_id, round_index))
        return data

    @_available
    async def cancel(self, job_id: str) -> JobRecord | None:
        keys = [self.k.queue, *self.k.expiring(job_id)]
        flat = await self._cancel(keys=keys, args=[job_id, time.time(), self.s.result_ttl_s])
        return JobRecord.from_fields(_pairs(flat)) if flat else None

    async def check_durability(self) -> None:
        """Log (and export) whether a Redis restart would lose jobs; never fails the start."""
        await check_async(self.r, "api")

    @_available
    async def ping(self) -> None:
        await self.r.ping()

    @_available
    async def depth(self) -> int:
        return int(await self.r.llen(self.k.queue))

    @_available
    async def workers(self) -> list[WorkerInfo]:
        names = sorted(text(n) for n in await self.r.smembers(self.k.workers))
        if not names:
            return []
        beats = await self.r.mget([self.k.worker(n) for n in names])
        gone = [n for n, b in zip(names, beats, strict=True) if b is None]
        if gone:
            await self.r.srem(self.k.workers, *gone)
        return [WorkerInfo.from_dict(json.loads(b)) for b in beats if b is not None]

    async def close(self) -> None:
        await self.live_events.close()
        await self.fanout.close()
        await self.r.aclose()
        await self.fanout.r.aclose()


class RedisWorkerQueue:
    """A worker's face of the Redis queue (thread-safe: the loop and the timer thread share it)."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.k = Keys(settings.redis_prefix)
        self.r = redis.Redis.from_url(_redis_url(settings), **sync_client_options())
        self._claim = self.r.register_script(lua.CLAIM)
        self._emit = self.r.register_script(lua.EMIT)
        self._finish = self.r.register_script(lua.FINISH)
        self._release = self.r.register_script(lua.RELEASE)
        self._renew = self.r.register_script(lua.RENEW)
        self._recover = self.r.register_script(lua.RECOVER)
        self._wake_id: str | None = None
        self._lease_ms = int(settings.lease_s * 1000)

    def _persist(self, fn: Callable[[], Any]) -> Any:
        """Run a write, riding out a Redis outage for up to one lease; past that the lease is gone anyway."""
        deadline = time.monotonic() + self.s.lease_s
        delay = 0.05
        while True:
            try:
                return fn()
            except ResponseError as e:
                if "LEASE_LOST" in str(e):
                    raise LeaseLost(str(e)) from e
                raise
            except DOWN as e:
                if time.monotonic() + delay > deadline:
                    raise LeaseLost(f"redis unreachable for longer than the lease: {e}") from e
                log.warning("redis unreachable, retrying in %.2fs: %s", delay, e)
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    def claim(self, worker: str, timeout: float) -> Claim | None:
        if self._wake_id is None:  # read before the first attempt, so no wake-up in between is missed
            last = self.r.xrevrange(self.k.wake, count=1)
            self._wake_id = text(last[0][0]) if last else "0-0"
        deadline = time.monotonic() + timeout
        while True:
            token = f"{worker}/{secrets.token_hex(6)}"
            got = self._claim(
                keys=[self.k.queue, self.k.running],
                args=[self.k.lua_prefixes(), token, self._lease_ms, time.time(), worker, PENDING_TTL_S],
            )
            if got:
                attempt, flat = got
                return Claim(JobRecord.from_fields(_pairs(flat)), int(attempt), token)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            woke = self.r.xread({self.k.wake: self._wake_id}, count=100, block=max(1, int(left * 1000)))
            if woke:
                self._wake_id = text(woke[0][1][-1][0])

    def emit(self, claim: Claim, type_: str, data: dict[str, Any], fields: dict[str, str] | None = None) -> str:
        claim.seq += 1
        keys = [self.k.lease(claim.job.id), self.k.job(claim.job.id), self.k.events(claim.job.id)]
        args = [claim.token, type_, _json(data), claim.seq, *_flat(fields or {})]
        return text(self._persist(lambda: self._emit(keys=keys, args=args)))

    def emit_live(self, claim: Claim, type_: str, data: dict[str, Any]) -> None:
        """An ephemeral event (PUBLISH, not stored); best effort: a failure drops it and never stops the job."""
        try:
            self.r.publish(self.k.live(claim.job.id), LiveEvent(type_, _json(data)).to_json())
        except redis.RedisError as e:
            log.debug("job=%s live event dropped: %s", claim.job.id, e)

    def put_image(self, claim: Claim, round_index: int, png: bytes) -> None:
        key = self.k.image(claim.job.id, round_index)
        self._persist(lambda: self.r.set(key, png, ex=PENDING_TTL_S))

    def finish(self, claim: Claim, type_: str, data: dict[str, Any], fields: dict[str, str]) -> None:
        job_id = claim.job.id
        keys = [self.k.lease(job_id), self.k.running, *self.k.expiring(job_id)]
        args = [claim.token, type_, _json(data), self.s.result_ttl_s, job_id, *_flat(fields)]
        try:
            self._persist(lambda: self._finish(keys=keys, args=args))
        except LeaseLost:
            status = self.r.hget(self.k.job(job_id), "status")
            if status is None or text(status) not in TERMINAL_STATUSES:
                raise  # a retried finish whose first try landed is fine; anything else is a lost lease

    def release(self, claim: Claim) -> None:
        job_id = claim.job.id
        keys = [
            self.k.lease(job_id),
            self.k.running,
            self.k.job(job_id),
            self.k.tries(job_id),
            self.k.queue,
            self.k.wake,
        ]
        self._release(keys=keys, args=[claim.token, job_id, WAKE_MAXLEN])

    def renew(self, claim: Claim) -> bool:
        return bool(self._renew(keys=[self.k.lease(claim.job.id)], args=[claim.token, self._lease_ms]))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.hget(self.k.job(job_id), "cancel"))

    def heartbeat(self, info: WorkerInfo) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.k.worker(info.name), _json(info.to_dict()), px=int(self.s.worker_ttl_s * 1000))
        pipe.sadd(self.k.workers, info.name)
        pipe.execute()

    def wake(self) -> None:
        """A waiting claim blocks on Redis for at most its timeout (a second); nothing to interrupt here."""

    def remove_worker(self, name: str) -> None:
        self.r.delete(self.k.worker(name))
        self.r.srem(self.k.workers, name)

    def recover(self) -> int:
        error = _json(attempts_exhausted(self.s.max_attempts))
        args = [self.k.lua_prefixes(), self.s.max_attempts, time.time(), self.s.result_ttl_s, error, WAKE_MAXLEN]
        return int(self._recover(keys=[self.k.running, self.k.queue, self.k.wake], args=args))

    def close(self) -> None:
        self.r.close()
