"""The GPU worker: a synchronous loop that claims a job, runs its trajectory and publishes every engine event.

One worker per GPU (a process for `irg worker`, a thread for `irg serve`). Startup order: load the model,
warm up, *then* heartbeat, so readiness means a loaded model. A timer thread renews the lease, polls for a
cancellation and sends heartbeats while the loop computes; the hot path only reads local flags. A job that
fails (bad parameters, out of memory, any exception) fails alone, with its reason in the job; the worker
lives on. On stop it claims nothing more, finishes its job within `drain_s`, else hands it back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from irg_core.errors import Cancelled
from irg_core.params import GenerationParams, ParamError, TrajectoryResult
from server import metrics
from server.events import CANCELLED, COMPLETED, FAILED
from server.jobs import JobRecord, generation_params, input_images, job_public, understanding_params
from server.publish import Publisher
from server.queue.base import Claim, LeaseLost, WorkerInfo, WorkerQueue
from server.settings import Settings

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What the worker needs from the engine (server.runner.EngineRunner)."""

    device: str
    model: str

    def run(self, params: GenerationParams, on_event: Any, should_cancel: Any) -> TrajectoryResult: ...

    def usage(self, params: GenerationParams, result: TrajectoryResult) -> dict[str, int]: ...

    def understand(self, params: Any, images: list[Any], on_event: Any, should_cancel: Any) -> Any:
        """Task understand: `irg_core.recipes.run_understanding` (returns its UnderstandingResult)."""

    def memory(self) -> dict[str, int]:
        """Accelerator memory by kind (allocated, reserved, peak); empty without one."""


@dataclass
class _Running:
    """The job in hand, and the flags the timer thread sets for the hot loop to read."""

    claim: Claim
    deadline: float
    next_renew: float
    cancel: bool = False
    lost: bool = False

    def why_stop(self, handback: threading.Event) -> str | None:
        if self.lost:
            return "lost"
        if handback.is_set():
            return "handback"
        if self.cancel:
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "timeout"
        return None


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, queue: WorkerQueue, settings: Settings, name: str | None = None):
        self.q, self.s = queue, settings
        self.name = name or settings.worker_name or default_worker_name()
        self.info = WorkerInfo(self.name, pid=os.getpid(), started_at=time.time())
        self.runner: Runner | None = None
        self.stopping = threading.Event()  # claim nothing more
        self.handback = threading.Event()  # give the job in hand back now
        self._closed = threading.Event()
        self._stop_at = 0.0
        self._current: _Running | None = None
        self._ticker = threading.Thread(target=self._tick_loop, name=f"irg-ticker-{self.name}", daemon=True)

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self, runner: Runner) -> None:
        """Announce the worker as ready (call after the model is loaded and warmed up)."""
        self.runner = runner
        self.info = replace(self.info, ready=True, device=runner.device, model=runner.model)
        self.q.heartbeat(self.info)
        self._ticker.start()
        log.info("worker=%s ready device=%s model=%s", self.name, runner.device, runner.model)

    def run(self) -> None:
        """Claim and run jobs until asked to stop."""
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                claim = self.q.claim(self.name, timeout=1.0)
                backoff = 0.1
            except Exception as e:  # the queue backend is down: wait for it, do not die
                log.warning("worker=%s cannot claim: %s", self.name, e)
                self.stopping.wait(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            if claim is not None:
                self.run_job(claim)

    def request_stop(self) -> None:
        """First call: drain (finish the job in hand within drain_s). Second call: hand it back now."""
        if self.stopping.is_set():
            self.handback.set()
        self._stop_at = time.monotonic()
        self.stopping.set()
        self.q.wake()

    def close(self) -> None:
        self._closed.set()
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)
        try:
            self.q.remove_worker(self.name)
        except Exception as e:
            log.warning("worker=%s could not remove its heartbeat: %s", self.name, e)

    # -- one job ------------------------------------------------------------------------------------------
    def run_job(self, claim: Claim) -> None:
        job = claim.job
        now = time.monotonic()
        running = _Running(claim, deadline=now + self.s.job_timeout_s, next_renew=now + self.s.lease_s / 3)
        if claim.attempt == 1:  # a retry's wait would count the lost attempt's run
            metrics.QUEUE_WAIT.observe(max(0.0, (job.started_at or time.time()) - job.created_at))
        log.info("worker=%s job=%s attempt=%d started", self.name, job.id, claim.attempt)
        self._current = running
        self._beat(busy=True)
        try:
            self._run(running)
        except LeaseLost as e:
            log.warning("worker=%s job=%s lease lost, abandoning: %s", self.name, job.id, e)
        except Exception as e:  # a fault of the worker's own bookkeeping: still fail the job alone
            self._fail_quietly(claim, e)
        finally:
            self._current = None
            self._beat(busy=False)
            self._record_memory()

    def _run(self, running: _Running) -> None:
        claim, job = running.claim, running.claim.job
        if job.cancel or self.q.cancel_requested(job.id):
            return self._end(claim, CANCELLED, job)
        assert self.runner is not None
        publisher = Publisher(self.q, claim)
        should_stop = lambda: running.why_stop(self.handback) is not None  # noqa: E731
        if job.params.get("task") == "understand":
            return self._understand(running, publisher, should_stop)
        params = generation_params(job.params)
        try:
            images = input_images(job) if job.inputs else []
            extra = {"images": images} if images else {}  # an edit (runners without inputs stay as they are)
            result = self.runner.run(params, publisher, should_stop, **extra)
        except Cancelled:
            return self._stopped(running, publisher)
        except LeaseLost:
            raise
        except Exception as e:  # the job fails alone; the worker lives on
            return self._end(claim, FAILED, publisher.record(), error=_failure(job, e))
        final = publisher.record(timings={"run_seconds": result.total_seconds,
                                          "stages": [asdict(s) for s in result.stages]},
                                 usage=self.runner.usage(params, result))
        metrics.observe_stages(result.stages, result.total_seconds)
        self._end(claim, COMPLETED, final)

    def _understand(self, running: _Running, publisher: Publisher, should_stop: Callable[[], bool]) -> None:
        """Task understand: one answer about the input images, streamed as answer.delta / answer.done."""
        claim, job = running.claim, running.claim.job
        assert self.runner is not None
        try:
            params = understanding_params(job.params)
            result = self.runner.understand(params, input_images(job), publisher, should_stop)
        except Cancelled:
            return self._stopped(running, publisher)
        except LeaseLost:
            raise
        except Exception as e:  # the job fails alone; the worker lives on
            return self._end(claim, FAILED, publisher.record(), error=_failure(job, e))
        prompt_tokens = result.context_length
        final = publisher.record(timings={"run_seconds": result.total_seconds,
                                          "stages": [asdict(s) for s in result.stages]},
                                 usage={"prompt_tokens": prompt_tokens, "text_tokens": len(result.token_ids),
                                        "image_tokens": 0})
        self._end(claim, COMPLETED, final)

    def _fail_quietly(self, claim: Claim, e: Exception) -> None:
        try:
            self._end(claim, FAILED, claim.job, error=_failure(claim.job, e))
        except Exception:
            log.exception("worker=%s job=%s could not be marked failed", self.name, claim.job.id)

    def _stopped(self, running: _Running, publisher: Publisher) -> None:
        why = running.why_stop(self.handback)
        if why == "lost":
            raise LeaseLost("the lease was lost while the job ran")
        if why == "handback":
            log.info("worker=%s job=%s handed back", self.name, running.claim.job.id)
            self.q.release(running.claim)
            metrics.RETRIED.inc()
            return None
        if why == "timeout":
            error = {"code": "timeout", "message": f"the job ran longer than {self.s.job_timeout_s:g} s"}
            return self._end(running.claim, FAILED, publisher.record(), error=error)
        return self._end(running.claim, CANCELLED, publisher.record())

    def _end(self, claim: Claim, event: str, job: JobRecord, error: dict[str, str] | None = None) -> None:
        status = {COMPLETED: "succeeded", FAILED: "failed", CANCELLED: "cancelled"}[event]
        final = replace(job, status=status, finished_at=time.time(), error=error, cancel=False)
        names = ["status", "finished_at", "texts", "images", "timings", "usage", "error", "answer"]
        data: dict[str, Any] = {"job_id": job.id}
        if event == COMPLETED:
            data.update(job_public(final).model_dump(mode="json"))
        elif event == FAILED:
            data["error"] = error
        self.q.finish(claim, event, data, final.to_fields(*names))
        self.info.jobs[status] = self.info.jobs.get(status, 0) + 1
        metrics.JOBS.labels(job.params["mode"], status).inc()
        log.info("worker=%s job=%s %s%s", self.name, job.id, status, f" error={error['code']}" if error else "")

    # -- the timer thread ---------------------------------------------------------------------------------
    def _beat(self, busy: bool) -> None:
        self.info.busy = busy
        try:
            self.q.heartbeat(self.info)
        except Exception as e:
            log.warning("worker=%s heartbeat failed: %s", self.name, e)

    def _tick_loop(self) -> None:
        next_beat = next_recover = 0.0
        while not self._closed.wait(self.s.cancel_poll_s):
            now = time.monotonic()
            if self.stopping.is_set() and now - self._stop_at > self.s.drain_s:
                self.handback.set()
            try:
                self._watch_job(now)
                if now >= next_beat:
                    self.q.heartbeat(self.info)
                    next_beat = now + self.s.heartbeat_s
                if now >= next_recover:
                    next_recover = now + self.s.lease_s / 2
                    recovered = self.q.recover()
                    if recovered:
                        metrics.RETRIED.inc(recovered)
                        log.info("worker=%s recovered %d job(s) whose worker died", self.name, recovered)
            except Exception as e:  # the backend is down; the loop keeps trying
                log.warning("worker=%s timer: %s", self.name, e)

    def _watch_job(self, now: float) -> None:
        running = self._current
        if running is None:
            return
        if now >= running.next_renew:
            running.next_renew = now + self.s.lease_s / 3
            if not self.q.renew(running.claim):
                running.lost = True
        if not running.cancel and self.q.cancel_requested(running.claim.job.id):
            running.cancel = True

    def _record_memory(self) -> None:
        if self.runner is None:
            return
        for kind, value in self.runner.memory().items():
            metrics.GPU_MEMORY.labels(kind).set(value)
            if kind == "allocated":
                self.info.gpu_memory_bytes = value


def _failure(job: JobRecord, e: Exception) -> dict[str, str]:
    if isinstance(e, ParamError):
        return {"code": "invalid_params", "message": str(e)}
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return {"code": "out_of_memory", "message": f"out of memory: {e}"}
    log.exception("job=%s failed", job.id)
    return {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}


class WorkerThread:
    """A worker on a thread of this process (`irg serve`): it loads its runner in the background, so the API
    starts at once and /readyz turns 200 when the model is warm, then runs jobs until stopped."""

    def __init__(self, queue: WorkerQueue, settings: Settings, load: Callable[[], Runner],
                 on_fatal: Callable[[], None] | None = None, name: str | None = None):
        self.worker = Worker(queue, settings, name=name or settings.worker_name or "embedded")
        self.load, self.on_fatal = load, on_fatal
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="irg-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            runner = self.load()
        except Exception as e:
            log.error("worker=%s could not load the model: %s", self.worker.name, e)
            self.error = e
            if self.on_fatal is not None:
                self.on_fatal()
            return
        if not self.worker.stopping.is_set():
            self.worker.start(runner)
            self.worker.run()

    def stop(self) -> None:
        # In-process, a job handed back has nowhere to go once the process ends: stop it at the next step.
        self.worker.request_stop()
        self.worker.request_stop()
        self.thread.join(timeout=30)
        self.worker.close()
