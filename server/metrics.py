"""Every Prometheus metric of the server, in one module; labels are bounded (never a job id or a prompt).

Each process exports what it does itself, from its own registry, so no process shows a metric that is not
its own stuck at 0:
- `API`: submissions, rejections, HTTP requests by route and status and, read from the backend at scrape time,
  the queue depth and the live workers (only the API knows them; a worker never exports `irg_workers_alive`);
- `WORKER`: stage times and speeds, queue wait, retries, accelerator memory;
- `SHARED`: job outcomes (`irg_jobs_total`), counted by the worker that ends a job and by the API when it
  cancels a job that was still queued.
`irg serve` runs the API and a worker in one process and exports all three (`Exposition("api", "worker")`);
`irg worker --metrics-port` exports `Exposition("worker")`. The semantics an alert can rely on are in
docs/server.md ("Metrics and alerts").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from irg_core.params import StageTiming

API = CollectorRegistry(auto_describe=True)
WORKER = CollectorRegistry(auto_describe=True)
SHARED = CollectorRegistry(auto_describe=True)
ROLES = {"api": API, "worker": WORKER}

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

JOBS = Counter(
    "irg_jobs", "Jobs that ended, by mode, outcome and reason", ["mode", "outcome", "reason"], registry=SHARED
)
SUBMITTED = Counter("irg_jobs_submitted", "Jobs accepted into the queue, by mode", ["mode"], registry=API)
REJECTED = Counter("irg_jobs_rejected", "Submissions refused, by reason", ["reason"], registry=API)
RETRIED = Counter(
    "irg_jobs_retried",
    "Jobs handed back to the queue (handback: a draining worker; lease_lost: "
    "a worker stopped renewing its lease and the job was re-queued or failed)",
    ["reason"],
    registry=WORKER,
)
QUEUE_DEPTH = Gauge("irg_queue_depth", "Jobs waiting in the queue", registry=API)
QUEUE_WAIT = Histogram(
    "irg_queue_wait_seconds", "From submission to the start of a run", buckets=TIME_BUCKETS, registry=WORKER
)
STAGE = Histogram(
    "irg_stage_seconds",
    "Wall time of a trajectory stage (total: the whole trajectory)",
    ["stage", "round"],
    buckets=TIME_BUCKETS,
    registry=WORKER,
)
DECODE_RATE = Histogram(
    "irg_decode_tokens_per_second", "Decode speed of each thought", buckets=RATE_BUCKETS, registry=WORKER
)
DENOISE_RATE = Histogram(
    "irg_denoise_steps_per_second",
    "Denoising model evaluations per second of each image",
    buckets=RATE_BUCKETS,
    registry=WORKER,
)
WORKERS_ALIVE = Gauge("irg_workers_alive", "Workers with a live heartbeat and a loaded model", registry=API)
WORKERS_BUSY = Gauge("irg_workers_busy", "Live workers running a job", registry=API)
GPU_MEMORY = Gauge(
    "irg_gpu_memory_bytes",
    "Accelerator memory of this worker (CUDA only): allocated (in use "
    "by tensors), reserved (held by the caching allocator), peak (most allocated since start), "
    "total (the device's capacity)",
    ["kind"],
    registry=WORKER,
)
HTTP_REQUESTS = Counter(
    "irg_http_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
    registry=API,
)
HTTP_LATENCY = Histogram(
    "irg_http_request_duration_seconds",
    "From a request to its response's status line (a stream counts until it starts), by method and route template",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
    registry=API,
)
ACTIVE = Gauge("irg_active_trajectories", "Jobs this worker runs now (claimed, not yet ended)", registry=WORKER)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
FORWARD_ROWS = Histogram(
    "irg_forward_rows",
    "Query rows per model forward, by kind (decode, denoise, prefill_text, prefill_image)",
    ["kind"],
    buckets=ROWS_BUCKETS,
    registry=WORKER,
)
DECODE_BATCH = Histogram(
    "irg_decode_batch_size",
    "Sequences per batched decode step",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    registry=WORKER,
)
KV_PAGES = Gauge(
    "irg_kv_pages", "KV cache pages of this worker, by state (used, free, reserved)", ["state"], registry=WORKER
)
ADMISSION_WAITS = Counter(
    "irg_admission_waits", "Scheduler ticks in which the next job waited for KV room", registry=WORKER
)
OPEN_STREAMS = Gauge("irg_open_streams", "Event streams (SSE responses) this API process has open", registry=API)
STREAMS_DROPPED = Counter(
    "irg_streams_dropped",
    "Event streams closed because their client took no data within IRG_SSE_SEND_TIMEOUT_S",
    registry=API,
)
REDIS_DURABLE = Gauge(
    "irg_redis_durable",
    "1 when Redis has its append-only file on (a restart keeps every job), "
    "0 when a Redis restart or crash would lose jobs (read at start)",
    registry=SHARED,
)
REDIS_PERSISTENCE = Gauge(
    "irg_redis_persistence",
    "Redis persistence found at start: 1 for the mode (aof, rdb, none, unknown)",
    ["mode"],
    registry=SHARED,
)

# Why a job ended, from its error code (server.jobs / server.queue.base): a bounded label for alerts.
REASONS = ("none", "cancelled", "timeout", "oom", "lease_lost", "invalid_params", "error")
_REASON_OF_CODE = {
    "timeout": "timeout",
    "out_of_memory": "oom",
    "worker_lost": "lease_lost",
    "invalid_params": "invalid_params",
}


def reason(status: str, error: Mapping[str, str] | None = None) -> str:
    """The `reason` label of a job that ended with `status` (succeeded, failed, cancelled) and `error`."""
    if status == "succeeded":
        return "none"
    if status == "cancelled":
        return "cancelled"
    return _REASON_OF_CODE.get((error or {}).get("code", ""), "error")


def job_ended(mode: str, status: str, error: Mapping[str, str] | None = None) -> None:
    JOBS.labels(mode, status, reason(status, error)).inc()


class Exposition:
    """What one process exports: the process collectors, the shared registry and the registries of its roles."""

    def __init__(self, *roles: str):
        self.registries = [REGISTRY, SHARED, *(ROLES[r] for r in roles)]

    def collect(self) -> Iterator[Metric]:
        for registry in self.registries:
            yield from registry.collect()


def observe_memory(memory: Mapping[str, int]) -> None:
    """Record a worker's accelerator memory by kind (server.runner.EngineRunner.memory)."""
    for kind, value in memory.items():
        GPU_MEMORY.labels(kind).set(value)


def observe_stages(stages: Iterable[StageTiming], total_seconds: float) -> None:
    """Record a finished trajectory's stage times and speeds."""
    for s in stages:
        STAGE.labels(s.stage, str(s.round)).observe(s.seconds)
        if s.tokens and s.seconds > 0:
            DECODE_RATE.observe(s.tokens / s.seconds)
        if s.steps and s.seconds > 0:
            DENOISE_RATE.observe(s.steps / s.seconds)
    STAGE.labels("total", "0").observe(total_seconds)


def observe_workers(alive: int, busy: int, depth: int | None) -> None:
    WORKERS_ALIVE.set(alive)
    WORKERS_BUSY.set(busy)
    if depth is not None:
        QUEUE_DEPTH.set(depth)
