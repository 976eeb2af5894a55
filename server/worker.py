"""The GPU worker: claims up to `max_active` jobs, each under its own lease, and feeds them to the engine's
scheduler, which advances all of them one unit of model work per tick.

One worker per GPU (a process for `irg worker`, a thread for `irg serve`). Startup order: load the model, warm
up, *then* heartbeat, so readiness means a loaded model. Three threads:
- the model thread (`run`) claims jobs while there is room, submits them to the runner and ticks it; it never
  touches Redis for events;
- a timer thread renews every lease, polls for cancellations and sends heartbeats, setting flags the model
  thread reads per job;
- a publisher thread sends events, encodes PNGs and writes images (a bounded queue, in order), so a slow Redis
  never stalls a step; a job's terminal event is queued after all of its events.
A job that fails (bad parameters, out of memory, any exception) fails alone, with its reason in the job; the
worker lives on. On stop it claims nothing more, finishes its jobs within `drain_s`, else hands them back.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
PUBLISH_QUEUE = 10_000  # events waiting for the publisher thread at most (the model thread waits beyond)


class Handle(Protocol):
    """A submitted job inside the runner."""

    status: str  # waiting | running | done | failed | cancelled
    result: Any
    error: BaseException | None

    @property
    def over(self) -> bool: ...


class Runner(Protocol):
    """What the worker needs from the engine (server.runner.EngineRunner)."""

    device: str
    model: str

    def submit(
        self, params: GenerationParams, on_event: Any, should_cancel: Callable[[], bool], images: list[Any] = ...
    ) -> Handle:
        """Queue a trajectory, or an edit of `images[0]` (raises ParamError for parameters it cannot run)."""

    def submit_understanding(
        self, params: Any, images: list[Any], on_event: Any, should_cancel: Callable[[], bool]
    ) -> Handle:
        """Queue an answer about `images` (its result: irg_core.recipes.UnderstandingResult)."""

    def step(self) -> bool:
        """Advance every submitted job by one unit of work; False when there was nothing to do."""

    def cancel(self, handle: Handle) -> None: ...

    def usage(self, params: GenerationParams, result: TrajectoryResult) -> dict[str, int]: ...

    def memory(self) -> dict[str, int]:
        """Accelerator memory by kind (allocated, reserved, peak, total); empty without one."""


@dataclass(eq=False)
class _Running:
    """A job in hand, and the flags the timer and publisher threads set for the model thread to read."""

    claim: Claim
    deadline: float
    next_renew: float
    publisher: Publisher | None = None
    handle: Any = None
    understand: bool = False  # task understand: the result is an UnderstandingResult
    cancel: bool = False
    lost: bool = False
    handback: bool = False
    started: float = field(default_factory=time.monotonic)

    def why_stop(self) -> str | None:
        if self.lost:
            return "lost"
        if self.handback:
            return "handback"
        if self.cancel:
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "timeout"
        return None


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class _PublisherThread:
    """Runs publishing work in order, off the model thread; a failing item marks its job lost or logs."""

    def __init__(self, name: str):
        self.q: queue_mod.Queue[tuple[_Running, Callable[[], None]] | None] = queue_mod.Queue(PUBLISH_QUEUE)
        self.thread = threading.Thread(target=self._loop, name=f"irg-publisher-{name}", daemon=True)
        self.thread.start()

    def put(self, running: _Running, fn: Callable[[], None]) -> None:
        self.q.put((running, fn))

    def flush(self) -> None:
        self.q.join()

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                running, fn = item
                if running.lost:
                    continue  # its lease is gone: another worker owns the job's events now
                try:
                    fn()
                except LeaseLost as e:
                    running.lost = True
                    log.warning("job=%s lease lost while publishing: %s", running.claim.job.id, e)
                except Exception:
                    log.exception("job=%s could not publish", running.claim.job.id)
            finally:
                self.q.task_done()


class Worker:
    def __init__(self, queue: WorkerQueue, settings: Settings, name: str | None = None):
        self.q, self.s = queue, settings
        self.name = name or settings.worker_name or default_worker_name()
        self.info = WorkerInfo(self.name, pid=os.getpid(), started_at=time.time())
        self.runner: Runner | None = None
        self.max_active = 1
        self.stopping = threading.Event()  # claim nothing more
        self.handback = threading.Event()  # give the jobs in hand back now
        self._closed = threading.Event()
        self._stop_at = 0.0
        self._running: list[_Running] = []
        self._lock = threading.Lock()  # guards _running against the timer thread
        self._publisher: _PublisherThread | None = None
        self._ticker = threading.Thread(target=self._tick_loop, name=f"irg-ticker-{self.name}", daemon=True)

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self, runner: Runner) -> None:
        """Announce the worker as ready (call after the model is loaded and warmed up)."""
        self.runner = runner
        self.max_active = self._max_active(runner)
        if hasattr(runner, "max_active"):
            runner.max_active = self.max_active  # the scheduler admits as many as the worker claims
        self.info = replace(self.info, ready=True, device=runner.device, model=runner.model, capacity=self.max_active)
        self.q.heartbeat(self.info)
        self._ticker.start()
        log.info(
            "worker=%s ready device=%s model=%s max_active=%d", self.name, runner.device, runner.model, self.max_active
        )

    def _max_active(self, runner: Runner) -> int:
        if self.s.max_active is not None:
            return self.s.max_active
        return 8 if runner.device.startswith("cuda") else 2

    @property
    def publisher(self) -> _PublisherThread:
        if self._publisher is None:
            self._publisher = _PublisherThread(self.name)
        return self._publisher

    def run(self) -> None:
        """Claim and run jobs until asked to stop and every job in hand has ended."""
        backoff = 0.1
        while not self.stopping.is_set() or self._running:
            if not self.stopping.is_set() and len(self._running) < self.max_active:
                try:
                    claim = self.q.claim(self.name, timeout=0.0 if self._running else 1.0)
                    backoff = 0.1
                except Exception as e:  # the queue backend is down: wait for it, do not die
                    log.warning("worker=%s cannot claim: %s", self.name, e)
                    if not self._running:
                        self.stopping.wait(backoff)
                    backoff = min(5.0, backoff * 2)
                    claim = None
                if claim is not None:
                    self._start(claim)
                    continue  # fill the remaining room before the next tick
            if self._running:
                self._tick()
        if self._publisher is not None:
            self._publisher.flush()  # every terminal event is out before the loop returns

    def run_job(self, claim: Claim) -> None:
        """Run one claimed job to its end (with whatever else is in hand)."""
        running = self._start(claim)
        while running in self._running:
            self._tick()
        self.publisher.flush()

    def request_stop(self) -> None:
        """First call: drain (finish the jobs in hand within drain_s). Second call: hand them back now."""
        if self.stopping.is_set():
            self.handback.set()
        self._stop_at = time.monotonic()
        self.stopping.set()
        self.q.wake()

    def close(self) -> None:
        self._closed.set()
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)
        if self._publisher is not None:
            self._publisher.stop()
        try:
            self.q.remove_worker(self.name)
        except Exception as e:
            log.warning("worker=%s could not remove its heartbeat: %s", self.name, e)

    # -- jobs -----------------------------------------------------------------------------------------------
    def _start(self, claim: Claim) -> _Running:
        job = claim.job
        now = time.monotonic()
        running = _Running(claim, deadline=now + self.s.job_timeout_s, next_renew=now + self.s.lease_s / 3)
        if claim.attempt == 1:  # a retry's wait would count the lost attempt's run
            metrics.QUEUE_WAIT.observe(max(0.0, (job.started_at or time.time()) - job.created_at))
        log.info("worker=%s job=%s attempt=%d started", self.name, job.id, claim.attempt)
        with self._lock:
            self._running.append(running)
        self._beat()
        try:
            if job.cancel or self.q.cancel_requested(job.id):
                self._end(running, CANCELLED, job)
                return running
            assert self.runner is not None
            running.publisher = Publisher(self.q, claim)
            sink = self._sink(running)

            def stop() -> bool:
                return running.why_stop() is not None or self.handback.is_set()

            if job.params.get("task") == "understand":  # an answer about the input images
                running.understand = True
                running.handle = self.runner.submit_understanding(
                    understanding_params(job.params), input_images(job), sink, stop
                )
            else:  # a trajectory, or an edit of its input image
                extra = {"images": input_images(job)} if job.inputs else {}
                running.handle = self.runner.submit(generation_params(job.params), sink, stop, **extra)
        except Exception as e:  # bad parameters or the worker's own bookkeeping: the job fails alone
            self._end(running, FAILED, running.publisher.record() if running.publisher else job, error=_failure(job, e))
        return running

    def _sink(self, running: _Running) -> Callable[[Any], None]:
        publisher = running.publisher
        assert publisher is not None

        def on_event(event: Any) -> None:
            self.publisher.put(running, lambda: publisher(event))

        return on_event

    def _tick(self) -> None:
        assert self.runner is not None
        if self.handback.is_set():
            for running in self._running:
                running.handback = True
        try:
            self.runner.step()
        except Exception:  # the runner itself broke: fail what it holds rather than spin
            log.exception("worker=%s the engine step failed", self.name)
            for running in list(self._running):
                if running.handle is not None and not running.handle.over:
                    self.runner.cancel(running.handle)
        for running in list(self._running):
            handle = running.handle
            if handle is not None and handle.over:
                self._settle(running)
        metrics.ACTIVE.set(len(self._running))

    def _settle(self, running: _Running) -> None:
        """A job's program ended: publish its terminal event (after its other events) and let it go."""
        assert self.runner is not None and running.publisher is not None
        handle, publisher, job = running.handle, running.publisher, running.claim.job
        if handle.status == "done":
            result = handle.result
            if running.understand:
                usage = {
                    "prompt_tokens": result.context_length,
                    "text_tokens": len(result.token_ids),
                    "image_tokens": 0,
                }
            else:
                usage = self.runner.usage(generation_params(job.params), result)

            def done() -> None:
                final = publisher.record(
                    timings={"run_seconds": result.total_seconds, "stages": [asdict(s) for s in result.stages]},
                    usage=usage,
                )
                metrics.observe_stages(result.stages, result.total_seconds)
                self._finish(running, COMPLETED, final)

            self.publisher.put(running, done)
            self._drop(running)
            return
        error = handle.error
        if isinstance(error, Cancelled) or handle.status == "cancelled":
            return self._stopped(running)
        self._end(running, FAILED, None, error=_failure(job, error or RuntimeError("the job failed")))

    def _stopped(self, running: _Running) -> None:
        why = running.why_stop() or ("handback" if self.handback.is_set() else "cancelled")
        job = running.claim.job
        if why == "lost":
            log.warning("worker=%s job=%s lease lost, abandoning", self.name, job.id)
            self._drop(running)
            return
        if why == "handback":
            log.info("worker=%s job=%s handed back", self.name, job.id)
            self.publisher.put(running, lambda: self.q.release(running.claim))
            metrics.RETRIED.labels("handback").inc()
            self._drop(running)
            return
        if why == "timeout":
            error = {"code": "timeout", "message": f"the job ran longer than {self.s.job_timeout_s:g} s"}
            return self._end(running, FAILED, None, error=error)
        return self._end(running, CANCELLED, None)

    def _end(self, running: _Running, event: str, job: JobRecord | None, error: dict[str, str] | None = None) -> None:
        """Queue the job's terminal event (after its other events) and let it go."""
        publisher = running.publisher

        def finish() -> None:
            record = job if job is not None else (publisher.record() if publisher else running.claim.job)
            self._finish(running, event, record, error)

        self.publisher.put(running, finish)
        self._drop(running)

    def _drop(self, running: _Running) -> None:
        with self._lock:
            if running in self._running:
                self._running.remove(running)
        self._beat()
        self._record_memory()

    def _finish(self, running: _Running, event: str, job: JobRecord, error: dict[str, str] | None = None) -> None:
        claim = running.claim
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
        metrics.job_ended(job.params["mode"], status, error)
        log.info("worker=%s job=%s %s%s", self.name, job.id, status, f" error={error['code']}" if error else "")

    # -- the timer thread ---------------------------------------------------------------------------------
    def _beat(self) -> None:
        self.info.active = len(self._running)
        self.info.busy = self.info.active > 0
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
                with self._lock:
                    running = list(self._running)
                for r in running:
                    self._watch_job(r, now)
                if now >= next_beat:
                    self._record_memory()
                    self._beat()
                    next_beat = now + self.s.heartbeat_s
                if now >= next_recover:
                    next_recover = now + self.s.lease_s / 2
                    recovered = self.q.recover()
                    if recovered:
                        metrics.RETRIED.labels("lease_lost").inc(recovered)
                        log.info("worker=%s recovered %d job(s) whose worker died", self.name, recovered)
            except Exception as e:  # the backend is down; the loop keeps trying
                log.warning("worker=%s timer: %s", self.name, e)

    def _watch_job(self, running: _Running, now: float) -> None:
        if now >= running.next_renew:
            running.next_renew = now + self.s.lease_s / 3
            if not self.q.renew(running.claim):
                running.lost = True
        if not running.cancel and self.q.cancel_requested(running.claim.job.id):
            running.cancel = True

    def _record_memory(self) -> None:
        if self.runner is None:
            return
        memory = self.runner.memory()
        metrics.observe_memory(memory)
        if "allocated" in memory:
            self.info.gpu_memory_bytes = memory["allocated"]


def _failure(job: JobRecord, e: BaseException) -> dict[str, str]:
    if isinstance(e, ParamError):
        return {"code": "invalid_params", "message": str(e)}
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return {"code": "out_of_memory", "message": f"out of memory: {e}"}
    log.error("job=%s failed: %s: %s", job.id, type(e).__name__, e, exc_info=e)
    return {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}


class WorkerThread:
    """A worker on a thread of this process (`irg serve`): it loads its runner in the background, so the API
    starts at once and /readyz turns 200 when the model is warm, then runs jobs until stopped."""

    def __init__(
        self,
        queue: WorkerQueue,
        settings: Settings,
        load: Callable[[], Runner],
        on_fatal: Callable[[], None] | None = None,
        name: str | None = None,
    ):
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
