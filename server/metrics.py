"""Every Prometheus metric of the server, in one module; labels are bounded (never a job id or a prompt).

Each process counts what it does itself: the API counts submissions and rejections and, at scrape time,
reads the queue depth and the live workers from the backend; a worker counts outcomes and times stages.
`irg serve` runs both in one process, so its /metrics has everything; `irg worker` serves its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from irg_core.params import StageTiming

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

JOBS = Counter("irg_jobs", "Jobs that ended, by mode and outcome", ["mode", "outcome"])
SUBMITTED = Counter("irg_jobs_submitted", "Jobs accepted into the queue, by mode", ["mode"])
REJECTED = Counter("irg_jobs_rejected", "Submissions refused, by reason", ["reason"])
RETRIED = Counter("irg_jobs_retried", "Jobs handed back to the queue after their worker died or drained")
QUEUE_DEPTH = Gauge("irg_queue_depth", "Jobs waiting in the queue")
QUEUE_WAIT = Histogram("irg_queue_wait_seconds", "From submission to the start of a run", buckets=TIME_BUCKETS)
STAGE = Histogram("irg_stage_seconds", "Wall time of a trajectory stage (total: the whole trajectory)",
                  ["stage", "round"], buckets=TIME_BUCKETS)
DECODE_RATE = Histogram("irg_decode_tokens_per_second", "Decode speed of each thought", buckets=RATE_BUCKETS)
DENOISE_RATE = Histogram("irg_denoise_steps_per_second", "Denoising model evaluations per second of each image",
                         buckets=RATE_BUCKETS)
WORKERS_ALIVE = Gauge("irg_workers_alive", "Workers with a live heartbeat and a loaded model")
WORKERS_BUSY = Gauge("irg_workers_busy", "Live workers running a job")
OPEN_STREAMS = Gauge("irg_open_streams", "Event streams (SSE responses) this API process has open")
STREAMS_DROPPED = Counter("irg_streams_dropped", "Event streams closed because their client took no "
                          "data within IRG_SSE_SEND_TIMEOUT_S")
REDIS_DURABLE = Gauge("irg_redis_durable", "1 when Redis has its append-only file on (a restart keeps every job), "
                      "0 when a Redis restart or crash would lose jobs (read at start)")
REDIS_PERSISTENCE = Gauge("irg_redis_persistence", "Redis persistence found at start: 1 for the mode (aof, rdb, none, "
                          "unknown)", ["mode"])
GPU_MEMORY = Gauge("irg_gpu_memory_bytes", "Accelerator memory of this worker", ["kind"])


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
