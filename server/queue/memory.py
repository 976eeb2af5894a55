"""The embedded queue: everything in this process, for `irg serve` on one machine without Redis.

It keeps the Redis backend's semantics (same record encoding, event ids that order and resume, leases,
attempts, lifetimes) with a lock. The API reads from its event loop while the worker thread writes; a
writer wakes waiting readers with `call_soon_threadsafe` on their own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from server.events import CANCELLED, FAILED, QUEUED, STARTED, StoredEvent
from server.jobs import JobRecord
from server.live import LiveEvent, LiveHub, Watcher
from server.queue.base import Claim, LeaseLost, QueueFull, WorkerInfo, attempts_exhausted
from server.settings import Settings


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class MemoryQueue:
    """Both faces of the queue (`JobQueue` and `WorkerQueue`) over in-process structures."""

    def __init__(self, settings: Settings):
        self.s = settings
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._jobs: dict[str, dict[str, str]] = {}
        self._events: dict[str, list[StoredEvent]] = {}
        self._images: dict[tuple[str, int], bytes] = {}
        self._waiting: deque[str] = deque()
        self._running: set[str] = set()
        self._leases: dict[str, tuple[str, float]] = {}  # job -> (token, monotonic deadline)
        self._tries: dict[str, int] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (monotonic deadline, job) of ended jobs
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._readers: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._tokens = 0
        self._live = LiveHub()  # ephemeral events (previews) to the live watchers only

    # -- shared pieces (call with the lock held) ------------------------------------------------------
    def _append(self, job_id: str, type_: str, data: dict[str, Any]) -> str:
        events = self._events[job_id]
        event_id = str(len(events) + 1)
        events.append(StoredEvent(event_id, type_, _dumps(data)))
        for loop, fut in self._readers.get(job_id, ()):
            loop.call_soon_threadsafe(_wake, fut)
        return event_id

    def _end(self, job_id: str, type_: str, data: dict[str, Any], fields: dict[str, str]) -> None:
        self._jobs[job_id].update(fields)
        self._append(job_id, type_, data)
        self._running.discard(job_id)
        self._leases.pop(job_id, None)
        heapq.heappush(self._expiry, (time.monotonic() + self.s.result_ttl_s, job_id))

    def _purge(self) -> None:
        now = time.monotonic()
        while self._expiry and (self._expiry[0][0] <= now or len(self._expiry) > self.s.keep_finished):
            _, job_id = heapq.heappop(self._expiry)
            self._jobs.pop(job_id, None)
            self._events.pop(job_id, None)
            self._tries.pop(job_id, None)
            for key in [k for k in self._images if k[0] == job_id]:
                del self._images[key]

    def _owned(self, claim: Claim) -> None:
        lease = self._leases.get(claim.job.id)
        if lease is None or lease[0] != claim.token:
            raise LeaseLost(f"job {claim.job.id}: the lease of {claim.token} ended")

    # -- JobQueue (API) -------------------------------------------------------------------------------
    async def submit(self, job: JobRecord) -> tuple[JobRecord, int | None, bool]:
        with self._lock:
            self._purge()
            if job.id in self._jobs:
                stored = JobRecord.from_fields(self._jobs[job.id])
                return stored, self._position(job.id), False
            if len(self._waiting) >= self.s.queue_max:
                raise QueueFull(len(self._waiting))
            self._jobs[job.id] = job.to_fields()
            self._events[job.id] = []
            self._waiting.append(job.id)
            position = len(self._waiting)
            self._append(job.id, QUEUED, {"job_id": job.id, "position": position})
            self._work.notify()
            return job, position, True

    async def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            self._purge()
            fields = self._jobs.get(job_id)
            # as the Redis backend: the API's view leaves out the input images' bytes (a claim carries them)
            return JobRecord.from_fields({k: v for k, v in fields.items() if k != "inputs"}) if fields else None

    def _position(self, job_id: str) -> int | None:
        try:
            return self._waiting.index(job_id) + 1
        except ValueError:
            return None

    async def position(self, job_id: str) -> int | None:
        with self._lock:
            return self._position(job_id)

    async def read_events(self, job_id: str, after: str | None, timeout: float) -> list[StoredEvent]:
        start = int(after.split("-")[0]) if after else 0
        with self._lock:
            events = self._events.get(job_id)
            if events is None or len(events) > start:
                return events[start:] if events else []
            loop = asyncio.get_running_loop()
            reader = (loop, loop.create_future())
            self._readers.setdefault(job_id, set()).add(reader)
        try:
            await asyncio.wait_for(reader[1], timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                readers = self._readers.get(job_id, set())
                readers.discard(reader)
                if not readers:
                    self._readers.pop(job_id, None)
        with self._lock:
            return self._events.get(job_id, [])[start:]

    async def get_image(self, job_id: str, round_index: int) -> bytes | None:
        with self._lock:
            return self._images.get((job_id, round_index))

    async def cancel(self, job_id: str) -> JobRecord | None:
        with self._lock:
            fields = self._jobs.get(job_id)
            if fields is None:
                return None
            if fields["status"] == "queued":
                self._waiting.remove(job_id)
                self._end(
                    job_id, CANCELLED, {"job_id": job_id}, {"status": "cancelled", "finished_at": str(time.time())}
                )
            elif fields["status"] == "running":
                fields["cancel"] = "1"
            return JobRecord.from_fields(fields)

    async def ping(self) -> None:
        return None

    async def depth(self) -> int:
        return len(self._waiting)

    async def workers(self) -> list[WorkerInfo]:
        now = time.monotonic()
        with self._lock:
            return [info for info, deadline in self._workers.values() if deadline > now]

    async def close(self) -> None:
        return None

    # -- WorkerQueue ----------------------------------------------------------------------------------
    def claim(self, worker: str, timeout: float) -> Claim | None:
        with self._work:
            if not self._waiting:
                self._work.wait(timeout)
            if not self._waiting:
                return None
            job_id = self._waiting.popleft()
            self._tokens += 1
            token = f"{worker}:{self._tokens}"
            attempt = self._tries[job_id] = self._tries.get(job_id, 0) + 1
            self._running.add(job_id)
            self._leases[job_id] = (token, time.monotonic() + self.s.lease_s)
            fields = self._jobs[job_id]
            fields.update(
                status="running",
                worker=worker,
                attempt=str(attempt),
                started_at=str(time.time()),
                texts="[]",
                images="[]",
            )
            self._append(job_id, STARTED, {"job_id": job_id, "worker": worker, "attempt": attempt})
            return Claim(JobRecord.from_fields(fields), attempt, token)

    def emit(self, claim: Claim, type_: str, data: dict[str, Any], fields: dict[str, str] | None = None) -> str:
        with self._lock:
            self._owned(claim)
            if fields:
                self._jobs[claim.job.id].update(fields)
            claim.seq += 1
            return self._append(claim.job.id, type_, data)

    def emit_live(self, claim: Claim, type_: str, data: dict[str, Any]) -> None:
        """An ephemeral event to whoever watches the job now (never stored, never waits)."""
        self._live.publish(claim.job.id, LiveEvent(type_, _dumps(data)))

    @contextlib.asynccontextmanager
    async def live(self, job_id: str) -> AsyncIterator[Watcher]:
        """The job's ephemeral events from now on, while the context is open."""
        with self._live.watch(job_id) as w:
            yield w

    def put_image(self, claim: Claim, round_index: int, png: bytes) -> None:
        with self._lock:
            self._owned(claim)
            self._images[(claim.job.id, round_index)] = png

    def finish(self, claim: Claim, type_: str, data: dict[str, Any], fields: dict[str, str]) -> None:
        with self._lock:
            self._owned(claim)
            self._end(claim.job.id, type_, data, fields)

    def release(self, claim: Claim) -> None:
        with self._work:
            if self._leases.get(claim.job.id, ("",))[0] != claim.token:
                return
            job_id = claim.job.id
            del self._leases[job_id]
            self._running.discard(job_id)
            self._tries[job_id] -= 1
            self._jobs[job_id].update(status="queued", worker="")
            self._waiting.appendleft(job_id)
            self._work.notify()

    def renew(self, claim: Claim) -> bool:
        with self._lock:
            lease = self._leases.get(claim.job.id)
            if lease is None or lease[0] != claim.token:
                return False
            self._leases[claim.job.id] = (claim.token, time.monotonic() + self.s.lease_s)
            return True

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return bool(self._jobs.get(job_id, {}).get("cancel"))

    def heartbeat(self, info: WorkerInfo) -> None:
        with self._lock:
            self._workers[info.name] = (info, time.monotonic() + self.s.worker_ttl_s)

    def wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def remove_worker(self, name: str) -> None:
        with self._lock:
            self._workers.pop(name, None)

    def recover(self) -> int:
        now = time.monotonic()
        with self._work:
            lost = [j for j in self._running if self._leases.get(j, ("", 0.0))[1] <= now]
            for job_id in lost:
                self._running.discard(job_id)
                self._leases.pop(job_id, None)
                self._recover_one(job_id)
            return len(lost)

    def _recover_one(self, job_id: str) -> None:
        fields = self._jobs[job_id]
        ended = {"finished_at": str(time.time())}
        if fields.get("cancel"):
            self._end(job_id, CANCELLED, {"job_id": job_id}, dict(ended, status="cancelled"))
        elif self._tries.get(job_id, 0) >= self.s.max_attempts:
            error = attempts_exhausted(self.s.max_attempts)
            self._end(
                job_id, FAILED, {"job_id": job_id, "error": error}, dict(ended, status="failed", error=_dumps(error))
            )
        else:
            fields.update(status="queued", worker="")
            self._waiting.appendleft(job_id)
            self._work.notify()
