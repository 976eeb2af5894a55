"""/healthz, /readyz (503 until a worker with a loaded model is alive) and /metrics."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from server.api.main import create_app
from server.queue.base import WorkerInfo
from server.queue.memory import MemoryQueue
from server.settings import Settings
from tests.server.serverkit import SMALL, free_port


def test_readyz_waits_for_a_worker_with_a_loaded_model(settings: Settings) -> None:
    queue = MemoryQueue(settings)
    with TestClient(create_app(settings, queue)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "no worker with a loaded model is alive"
        queue.heartbeat(WorkerInfo("loading", ready=False))
        assert c.get("/readyz").status_code == 503
        queue.heartbeat(WorkerInfo("w1", ready=True, active=1, capacity=4))
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {
            "status": "ready",
            "reason": None,
            "workers": 1,
            "queue_depth": 0,
            "free_capacity": 3,
            "capacity": [{"name": "w1", "active": 1, "capacity": 4, "free": 3}],
        }


def test_readyz_says_when_redis_is_unreachable(settings: Settings) -> None:
    s = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"].startswith("queue backend unreachable")
        port = s.redis_url.rsplit(":", 1)[1].split("/")[0]
        assert port not in r.text and "127.0.0.1" not in r.text  # no backend address to an anonymous caller
        submitted = c.post("/v1/generations", json={"prompt": "a fox"})
        assert submitted.status_code == 503 and port not in submitted.text and "127.0.0.1" not in submitted.text
        assert c.get("/healthz").status_code == 200
        assert "irg_workers_alive 0.0" in c.get("/metrics").text


def test_metrics_after_a_job(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        assert (
            c.post("/v1/generations", json={"prompt": "a fox", "wait": True, **SMALL}).json()["status"] == "succeeded"
        )
        text = c.get("/metrics").text
    assert 'irg_jobs_total{mode="irg",outcome="succeeded",reason="none"}' in text
    assert 'irg_jobs_submitted_total{mode="irg"}' in text
    for stage in ("thinking", "reflection", "image", "reencode", "total"):
        assert f'stage="{stage}"' in text
    for name in (
        "irg_queue_depth 0.0",
        "irg_queue_wait_seconds_count",
        "irg_decode_tokens_per_second_count",
        "irg_denoise_steps_per_second_count",
        "irg_workers_alive 1.0",
        "irg_workers_busy 0.0",
    ):
        assert name in text
    assert "gen_" not in text and "a fox" not in text  # no job ids or prompts in labels
