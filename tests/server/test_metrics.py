"""Metrics an operator can alert on: why jobs end, HTTP requests by route and status, each process's own
registry, accelerator memory."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from irg_core.params import ParamError
from server import metrics
from server.api.main import create_app
from server.queue.memory import MemoryQueue
from server.settings import Settings
from server.worker import Worker
from tests.server.serverkit import FakeRunner
from tests.server.test_worker import run_next, submit


def count(mode: str, outcome: str, reason: str) -> float:
    return metrics.JOBS.labels(mode, outcome, reason)._value.get()


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        ("succeeded", None, "none"),
        ("cancelled", None, "cancelled"),
        ("failed", {"code": "timeout"}, "timeout"),
        ("failed", {"code": "out_of_memory"}, "oom"),
        ("failed", {"code": "worker_lost"}, "lease_lost"),
        ("failed", {"code": "invalid_params"}, "invalid_params"),
        ("failed", {"code": "internal_error"}, "error"),
        ("failed", None, "error"),
    ],
)
def test_reason_of_an_ending(status: str, error: dict[str, str] | None, reason: str) -> None:
    assert metrics.reason(status, error) == reason
    assert reason in metrics.REASONS


class OutOfMemoryError(RuntimeError):
    """Named like torch's, which the worker recognises by name (no torch import in the server)."""


@pytest.mark.parametrize(
    ("runner", "timeout", "reason"),
    [
        (FakeRunner(), 60.0, "none"),
        (FakeRunner(fail=OutOfMemoryError("CUDA out of memory")), 60.0, "oom"),
        (FakeRunner(fail=MemoryError("no room")), 60.0, "oom"),
        (FakeRunner(fail=RuntimeError("boom")), 60.0, "error"),
        (FakeRunner(fail=ParamError("steps", "too few")), 60.0, "invalid_params"),
        (FakeRunner(step_s=0.2), 0.3, "timeout"),
    ],
)
def test_worker_counts_each_ending_with_its_reason(
    settings: Settings, runner: Any, timeout: float, reason: str
) -> None:
    memq = MemoryQueue(settings)
    worker = Worker(memq, settings.model_copy(update={"job_timeout_s": timeout}), "w")
    worker.runner = runner
    outcome = "succeeded" if reason == "none" else "failed"
    before = count("irg", outcome, reason)
    submit(memq, settings)
    assert run_next(memq, worker).status == outcome
    assert count("irg", outcome, reason) == before + 1


def test_worker_counts_a_cancel(settings: Settings) -> None:
    memq = MemoryQueue(settings)
    worker = Worker(memq, settings, "w")
    worker.runner = FakeRunner()
    before = count("irg", "cancelled", "cancelled")
    job = submit(memq, settings)
    claim = memq.claim("w", 1.0)
    assert claim is not None
    asyncio.run(memq.cancel(job.id))  # requested while it runs: the worker ends it
    worker.run_job(claim)
    assert asyncio.run(memq.get(job.id)).status == "cancelled"
    assert count("irg", "cancelled", "cancelled") == before + 1


def test_http_requests_by_route_template_and_status(settings: Settings) -> None:
    # /v1/generations takes uploads (edits): its bodies are bounded by max_upload_bytes
    s = settings.model_copy(update={"max_body_bytes": 1024, "max_upload_bytes": 1024})
    with TestClient(create_app(s, MemoryQueue(s))) as c:
        assert c.get("/v1/generations/gen_" + "0" * 24).status_code == 404
        assert c.get("/no/such/path").status_code == 404
        assert (
            c.post(
                "/v1/generations", content=b"{" + b" " * 2000 + b"}", headers={"Content-Type": "application/json"}
            ).status_code
            == 413
        )
        assert c.post("/v1/generations", json={"prompt": "a fox", "steps": 1}).status_code == 422
        text = c.get("/metrics").text
    for line in (
        'irg_http_requests_total{method="GET",route="/v1/generations/{job_id}",status="404"} ',
        'irg_http_requests_total{method="GET",route="unmatched",status="404"} ',
        'irg_http_requests_total{method="POST",route="/v1/generations",status="413"} ',
        'irg_http_requests_total{method="POST",route="/v1/generations",status="422"} ',
        'irg_http_request_duration_seconds_count{method="GET",route="/v1/generations/{job_id}"} ',
    ):
        assert line in text, line
    assert "gen_000" not in text and "/no/such/path" not in text  # templates, never raw paths


def test_each_process_exports_its_own_registry(settings: Settings) -> None:
    metrics.STAGE.labels("image", "1").observe(0.1)  # a worker-only metric with a sample in this process
    with TestClient(create_app(settings, MemoryQueue(settings))) as c:  # an API replica (no embedded worker)
        api = c.get("/metrics").text
    for name in (
        "irg_stage_seconds",
        "irg_queue_wait_seconds",
        "irg_gpu_memory_bytes",
        "irg_jobs_retried",
        "irg_decode_tokens_per_second",
    ):
        assert name not in api, name
    assert "irg_workers_alive" in api and "irg_jobs_total" in api  # the API counts cancels of queued jobs
    worker = generate_latest(metrics.Exposition("worker")).decode()  # what `irg worker --metrics-port` serves
    assert "irg_stage_seconds" in worker and "irg_jobs_total" in worker
    for name in ("irg_workers_alive", "irg_workers_busy", "irg_queue_depth", "irg_jobs_submitted", "irg_http_"):
        assert name not in worker, name


class CudaRunner(FakeRunner):
    """Reports accelerator memory as server.runner.EngineRunner does on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated = 3 << 30

    def memory(self) -> dict[str, int]:
        return {"allocated": self.allocated, "reserved": 4 << 30, "peak": 5 << 30, "total": 141 << 30}


def test_gpu_memory_gauges(settings: Settings) -> None:
    memq = MemoryQueue(settings)
    worker = Worker(memq, settings, "w")
    runner = CudaRunner()
    worker.runner = runner
    submit(memq, settings)
    run_next(memq, worker)
    for kind, value in runner.memory().items():
        assert metrics.GPU_MEMORY.labels(kind)._value.get() == value
    assert worker.info.gpu_memory_bytes == 3 << 30
    runner.allocated = 2 << 30
    worker.start(runner)  # the timer thread keeps the gauges current between jobs too
    try:
        from tests.server.serverkit import wait_until

        wait_until(lambda: metrics.GPU_MEMORY.labels("allocated")._value.get() == 2 << 30, timeout=5)
    finally:
        worker.close()


def test_documented_alert_rules_name_real_metrics_and_labels() -> None:
    import re

    import yaml
    from prometheus_client.metrics import MetricWrapperBase

    from tests.conftest import REPO

    doc = (REPO / "docs" / "server.md").read_text("utf-8")
    (block,) = re.findall(r"```yaml\n(.*?)```", doc, flags=re.S)
    rules = yaml.safe_load(block)["groups"][0]["rules"]
    assert len(rules) >= 8 and all(r["alert"] and r["expr"] and r["annotations"]["summary"] for r in rules)
    defined = {m._name: m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    for rule in rules:
        for name, labels in re.findall(r"\b(irg_[a-z_]+)(?:\{([^}]*)\})?", rule["expr"]):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in defined, (rule["alert"], name)
            for label, value in re.findall(r'(\w+)!?=~?"([^"]*)"', labels):
                assert label == "job" or label in defined[base]._labelnames, (rule["alert"], label)
                if label == "reason" and base == "irg_jobs":
                    assert value in metrics.REASONS, (rule["alert"], value)
