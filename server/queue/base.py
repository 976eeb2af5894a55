"""The queue's two faces: `JobQueue` (async, for the API) and `WorkerQueue` (sync, for a GPU worker).

Two backends implement both: `memory.MemoryQueue` (one process, no Redis) and `redis.RedisJobQueue` /
`redis.RedisWorkerQueue`. Semantics they share: a bounded wait line (`QueueFull` past it, nothing dropped),
idempotent submission by job id, a claim under a lease the worker renews, a per-job event log with
monotonic ids that can be resumed after any id, and a bounded number of attempts per job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from server.events import StoredEvent
from server.jobs import JobRecord


class QueueFull(Exception):
    """The wait line is at its bound; try again later."""

    def __init__(self, depth: int):
        super().__init__(f"the queue is full ({depth} jobs waiting)")
        self.depth = depth


class QueueUnavailable(Exception):
    """The queue backend cannot be reached."""


class LeaseLost(Exception):
    """The worker's lease on its job ended (expired, or the job was handed to another worker)."""


@dataclass
class Claim:
    """A job a worker holds: the record, which attempt this is, and the lease token that fences its writes."""

    job: JobRecord
    attempt: int
    token: str
    seq: int = 0  # events written in this attempt (makes a retried write idempotent)


@dataclass
class WorkerInfo:
    """What a worker's heartbeat says about it."""

    name: str
    ready: bool = False  # model loaded and warmed up
    busy: bool = False
    active: int = 0  # jobs running now
    capacity: int = 1  # jobs it runs at once at most (IRG_MAX_ACTIVE)
    device: str = ""
    model: str = ""
    pid: int = 0
    started_at: float = 0.0
    jobs: dict[str, int] = field(default_factory=dict)  # outcome -> count
    gpu_memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerInfo:
        """Tolerant of fields it does not know (a newer worker's heartbeat)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class JobQueue(Protocol):
    """What the API needs from the queue (async)."""

    async def submit(self, job: JobRecord) -> tuple[JobRecord, int | None, bool]:
        """Queue a job: (the stored job, its queue position, created). Same id again: the stored one."""

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def position(self, job_id: str) -> int | None:
        """1 = next to run; None when not waiting."""

    async def read_events(self, job_id: str, after: str | None, timeout: float) -> list[StoredEvent]:
        """Events after `after` (None: from the start), waiting up to `timeout` s for the first one."""

    async def get_image(self, job_id: str, round_index: int) -> bytes | None: ...

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel: a queued job ends now; a running one is flagged for its worker. None: no such job."""

    async def ping(self) -> None:
        """Raise QueueUnavailable when the backend cannot be reached."""

    async def depth(self) -> int: ...

    async def workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat is live."""

    async def close(self) -> None: ...


class WorkerQueue(Protocol):
    """What a worker needs from the queue (sync: a GPU worker runs no event loop)."""

    def claim(self, worker: str, timeout: float) -> Claim | None:
        """Take the next job under a lease (its `started` event is written), waiting up to `timeout` s."""

    def emit(self, claim: Claim, type_: str, data: dict[str, Any], fields: dict[str, str] | None = None) -> str:
        """Append an event and update job fields; raises LeaseLost."""

    def put_image(self, claim: Claim, round_index: int, png: bytes) -> None: ...

    def finish(self, claim: Claim, type_: str, data: dict[str, Any], fields: dict[str, str]) -> None:
        """Write the terminal event and fields, end the lease, start the result's lifetime; raises LeaseLost."""

    def release(self, claim: Claim) -> None:
        """Hand the job back to the head of the queue (the attempt does not count)."""

    def renew(self, claim: Claim) -> bool:
        """Extend the lease; False when it is lost."""

    def cancel_requested(self, job_id: str) -> bool: ...

    def heartbeat(self, info: WorkerInfo) -> None: ...

    def wake(self) -> None:
        """Make a claim() waiting in this process return early (a stopping worker need not wait it out)."""

    def remove_worker(self, name: str) -> None: ...

    def recover(self) -> int:
        """Re-queue (or fail, past max attempts) jobs whose lease expired; returns how many."""


def attempts_exhausted(max_attempts: int) -> dict[str, str]:
    """The error of a job whose workers all died under it."""
    return {
        "code": "worker_lost",
        "message": f"the worker running this job stopped responding in each of {max_attempts} attempts",
    }
