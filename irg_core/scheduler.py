"""The scheduler: advances many step programs one unit at a time and packs their compatible units into shared
forwards. No I/O and no threads of its own: a driver (the worker, `run_trajectory`, a benchmark) calls
`step()` until the jobs it cares about are done.

Each tick:
1. admit waiting jobs first come, first served while the KV pool can hold each one's worst case (a job that
   does not fit blocks the ones behind it, so a large job is never starved by small ones);
2. advance every active job's program until it yields a unit of model work (events, stamps and frees are
   answered on the spot);
3. run the pending units: every decode step in one batched forward; the denoising steps packed into forwards
   of at most `max_denoise_rows` rows (rows of several jobs × their guidance branches); each text prefill as
   one chunk of at most `prefill_chunk` tokens (a long prefill takes several ticks); image blocks, VAE and ViT
   one at a time.
Every active job advances by one unit per tick, so none waits for another to finish. A cancelled job's
program is closed and its pages go back to the pool at once; a job whose unit fails fails alone (or with the
jobs of the same forward, when the forward itself fails).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from irg_core.errors import Cancelled
from irg_core.kv_cache import Context
from irg_core.params import EngineEvent, ParamError
from irg_core.steps import (
    DecodeLatent,
    DecodeStep,
    Decoding,
    DenoiseLoop,
    DenoiseStep,
    Emit,
    EncodeVae,
    EncodeVit,
    Free,
    PrefillImage,
    PrefillText,
    Program,
    Stamp,
)

EventSink = Callable[[EngineEvent], None]
WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"


@dataclass(frozen=True, slots=True)
class Mark:
    """A point in time: host clock, and on CUDA an event recorded on the stream (resolved lazily)."""

    host: float
    event: Any = None


def stamp(device: torch.device) -> Mark:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return Mark(time.perf_counter(), event)
    return Mark(time.perf_counter())


def elapsed(a: Mark, b: Mark) -> float:
    """Seconds between two marks; on CUDA the device time between their events (waits for `b` only)."""
    if a.event is not None and b.event is not None:
        b.event.synchronize()
        return a.event.elapsed_time(b.event) / 1000.0
    return b.host - a.host


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One trajectory in the scheduler."""

    program: Program
    pages: int  # worst-case KV pages, reserved while the job runs
    sink: EventSink | None = None
    should_cancel: Callable[[], bool] | None = None
    name: str = ""
    id: int = field(default_factory=lambda: next(_ids))
    status: str = WAITING
    result: Any = None
    error: BaseException | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    finished: float | None = None
    waited_ticks: int = 0
    pending: Any = None  # the unit of model work the program waits on
    reply: Any = None  # what to send the program next
    owned: list[Any] = field(default_factory=list)  # contexts, decodings, loops to free at the end
    partial: Context | None = None  # a chunked text prefill in progress
    stages: Any = None  # a VAE unit in progress (a generator of stages)
    done_ids: int = 0

    @property
    def over(self) -> bool:
        return self.status in (DONE, FAILED, CANCELLED)


class Scheduler:
    def __init__(
        self,
        engine: Any,
        max_active: int = 8,
        prefill_chunk: int = 2048,
        max_denoise_rows: int = 65536,
        on_forward: Callable[[str, int], None] | None = None,
    ):
        self.e = engine
        self.max_active = max_active
        self.prefill_chunk = prefill_chunk
        self.max_denoise_rows = max_denoise_rows
        self.on_forward = on_forward  # (kind, rows) after every forward: for metrics and tests
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.reserved = 0
        self.admission_waits = 0  # ticks in which the head of the queue could not be admitted
        self.ticks = 0

    # -- submission ----------------------------------------------------------------------------------------
    @property
    def capacity_pages(self) -> int:
        return self.e.pool.num_pages - 1  # one page is the decode step's scratch

    def submit(
        self,
        program: Program,
        pages: int,
        sink: EventSink | None = None,
        should_cancel: Callable[[], bool] | None = None,
        name: str = "",
    ) -> Job:
        """Queue a program whose worst case needs `pages` KV pages; a job that could never fit is refused."""
        if pages > self.capacity_pages:
            program.close()
            size = self.capacity_pages * self.e.page_size
            raise ParamError(
                "kv_cache",
                f"this job needs up to {pages * self.e.page_size} KV tokens, more than the "
                f"{size} the KV cache holds (raise IRG_KV_CACHE_GB or ask for less)",
            )
        job = Job(program, pages, sink, should_cancel, name)
        self.waiting.append(job)
        return job

    def cancel(self, job: Job, error: BaseException | None = None) -> None:
        """Stop `job` now: close its program and give its pages back (others are unaffected)."""
        if job.over:
            return
        if job in self.waiting:
            self.waiting.remove(job)
            job.program.close()
        else:
            self._retire(job)
        job.status = CANCELLED if error is None else FAILED
        job.error = error if error is not None else Cancelled()
        job.finished = time.perf_counter()

    def _retire(self, job: Job) -> None:
        """Close an active job's program and free everything it holds."""
        try:
            job.program.close()
        except Exception:  # a program that misbehaves on close still gives its pages back
            pass
        if job.stages is not None:
            job.stages.close()
            job.stages = None
        for what in job.owned:
            self._free(what)
        job.owned.clear()
        if job.partial is not None:
            self.e.pool.free(job.partial)
            job.partial = None
        if job in self.active:
            self.active.remove(job)
            self.reserved -= job.pages

    def _free(self, what: Any) -> None:
        free_unit(self.e, what)

    # -- the tick --------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One tick; False when there was nothing to do."""
        self.ticks += 1
        for job in [*self.waiting, *self.active]:
            if job.should_cancel is not None and job.should_cancel():
                self.cancel(job)
        self._admit()
        for job in list(self.active):
            self._advance(job)
        work = [j for j in self.active if j.pending is not None]
        if not work:
            return bool(self.active or self.waiting)
        self._run([j for j in work if isinstance(j.pending, DecodeStep)], self._decode)
        denoise = [j for j in work if isinstance(j.pending, DenoiseStep)]
        for group in self._denoise_groups(denoise):
            self._run(group, self._denoise)
        for job in work:
            if job.pending is not None and not isinstance(job.pending, (DecodeStep, DenoiseStep)):
                self._run([job], self._single)
        return True

    def run(self, jobs: Sequence[Job] | None = None) -> None:
        """Tick until `jobs` (default: every job) are over."""
        while True:
            if jobs is not None and all(j.over for j in jobs):
                return
            if not self.step() and (jobs is None or all(j.over for j in jobs)):
                return

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_active:
            job = self.waiting[0]
            if self.reserved + job.pages > self.capacity_pages:
                self.admission_waits += 1
                job.waited_ticks += 1
                return
            self.waiting.popleft()
            self.reserved += job.pages
            job.status, job.started = RUNNING, time.perf_counter()
            self.active.append(job)

    def _advance(self, job: Job) -> None:
        """Run the program until it waits on model work (or ends)."""
        if job.pending is not None or job.over:
            return
        try:
            while True:
                unit = job.program.send(job.reply)
                job.reply = None
                if isinstance(unit, Emit):
                    if job.sink is not None:
                        job.sink(unit.event)
                elif isinstance(unit, Stamp):
                    job.reply = stamp(self.e.device)
                elif isinstance(unit, Free):
                    if unit.what in job.owned:
                        job.owned.remove(unit.what)
                    self._free(unit.what)
                else:
                    job.pending = unit
                    return
        except StopIteration as stop:
            self._finish(job, DONE, result=stop.value)
        except Exception as e:
            self._finish(job, FAILED, error=e)

    def _finish(self, job: Job, status: str, result: Any = None, error: BaseException | None = None) -> None:
        job.pending = None
        self._retire(job)
        job.status, job.result, job.error, job.finished = status, result, error, time.perf_counter()

    def _run(self, jobs: list[Job], execute: Callable[[list[Job]], list[Any]]) -> None:
        if not jobs:
            return
        try:
            replies = execute(jobs)
        except Exception as e:  # the forward failed: its jobs fail, the others go on
            if isinstance(e, torch.OutOfMemoryError) and self.e.device.type == "cuda":
                torch.cuda.empty_cache()
            for job in jobs:
                self._finish(job, FAILED, error=e)
            return
        for job, reply in zip(jobs, replies):
            if reply is _AGAIN:
                continue
            job.pending, job.reply = None, reply

    # -- executing units ---------------------------------------------------------------------------------------
    def _decode(self, jobs: list[Job]) -> list[Any]:
        for job in jobs:
            seq = job.pending.seq
            if seq.room is None:
                self.e.start_decoding(seq)
                job.owned.append(seq)
        out = self.e.run_decode([j.pending for j in jobs])
        self._forward("decode", len(jobs))
        return out

    def _denoise_groups(self, jobs: list[Job]) -> list[list[Job]]:
        groups: list[list[Job]] = []
        rows = 0
        for job in jobs:  # in admission order
            unit: DenoiseStep = job.pending
            n = len(unit.evaluated) * (unit.loop.tokens + 2)
            if groups and rows + n <= self.max_denoise_rows:
                groups[-1].append(job)
                rows += n
            else:
                groups.append([job])
                rows = n
        return groups

    def _denoise(self, jobs: list[Job]) -> list[Any]:
        for job in jobs:
            loop = job.pending.loop
            if loop.state is None:
                self.e.prepare_loop(loop)
                job.owned.append(loop)
        out = self.e.run_denoise([j.pending for j in jobs])
        self._forward("denoise", sum(len(j.pending.evaluated) * (j.pending.loop.tokens + 2) for j in jobs))
        return out

    def _single(self, jobs: list[Job]) -> list[Any]:
        job = jobs[0]
        unit = job.pending
        if isinstance(unit, PrefillText):
            return [self._prefill_chunk(job, unit)]
        if isinstance(unit, (EncodeVae, DecodeLatent)):  # one VAE stage per tick: a cancel is seen in between
            if job.stages is None:
                job.stages = self.e.stages_of(unit)
            try:
                next(job.stages)
                return [_AGAIN]
            except StopIteration as stop:
                job.stages = None
                return [stop.value]
        reply = execute_alone(self.e, unit)
        if isinstance(unit, PrefillImage):
            job.owned.append(reply)
            self._forward("prefill_image", unit.rows.shape[0] + 2)
        return [reply]

    def _prefill_chunk(self, job: Job, unit: PrefillText) -> Any:
        start = job.done_ids
        chunk = unit.ids[start : start + self.prefill_chunk]
        base = job.partial if job.partial is not None else unit.ctx
        ctx = self.e.run_prefill_text(base, chunk)
        self._forward("prefill_text", len(chunk))
        if job.partial is not None:
            self.e.pool.free(job.partial)
        job.done_ids = start + len(chunk)
        if job.done_ids < len(unit.ids):
            job.partial = ctx
            return _AGAIN
        job.partial, job.done_ids = None, 0
        job.owned.append(ctx)
        return ctx

    def _forward(self, kind: str, rows: int) -> None:
        if self.on_forward is not None:
            self.on_forward(kind, rows)


_AGAIN = object()


def free_unit(engine: Any, what: Any) -> None:
    """Give back the pages of a context, a decode's room or a denoising loop's rooms."""
    if isinstance(what, Context):
        engine.pool.free(what)
    elif isinstance(what, Decoding):
        engine.free_decoding(what)
    elif isinstance(what, DenoiseLoop):
        engine.free_loop(what)


_RUNNERS: dict[type, Callable[[Any, Any], Any]] = {
    PrefillText: lambda e, u: e.run_prefill_text(u.ctx, u.ids),
    PrefillImage: lambda e, u: e.run_prefill_image(u.ctx, u.rows, u.gen),
    EncodeVae: lambda e, u: e.vae_rows(u.image, u.eps_seed),
    EncodeVit: lambda e, u: e.vit_rows(u.image),
    DecodeStep: lambda e, u: e.run_decode([u])[0],
    DenoiseStep: lambda e, u: e.run_denoise([u])[0],
    DecodeLatent: lambda e, u: e.run_decode_latent(u),
    Stamp: lambda e, u: stamp(e.device),
    Free: lambda e, u: free_unit(e, u.what),
}


def execute_alone(engine: Any, unit: Any, on_event: Callable[[Any], None] | None = None) -> Any:
    """Execute one unit directly (no packing, no ownership): the synchronous helpers of `Engine` use this."""
    if isinstance(unit, Emit):
        if on_event is not None:
            on_event(unit.event)
        return None
    run = _RUNNERS.get(type(unit))
    if run is None:
        raise TypeError(f"not a unit of work: {unit!r}")
    return run(engine, unit)


def drive(engine: Any, program: Program) -> Any:
    """Run a program's units one at a time, outside any scheduler (no packing, no ownership), and return its
    value: for tests that look at one stage at a time."""
    reply = None
    try:
        while True:
            reply = execute_alone(engine, program.send(reply))
    except StopIteration as stop:
        return stop.value


def run_alone(
    engine: Any,
    program: Program,
    pages: int,
    sink: EventSink | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Any:
    """One program through a scheduler of its own, to its end; its error (or `Cancelled`) is raised."""
    scheduler = Scheduler(engine, max_active=1)
    job = scheduler.submit(program, pages, sink, should_cancel)
    scheduler.run([job])
    if job.status in (CANCELLED, FAILED):
        assert job.error is not None
        raise job.error
    return job.result
