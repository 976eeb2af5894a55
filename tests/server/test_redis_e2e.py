"""Nothing lost when things break: real Redis, real `irg worker` processes on the demo model, the API on a real
uvicorn server. A worker killed with SIGKILL mid-job, Redis stopped and restarted under a running API, and a
burst of 200 submissions against a queue bound of 10."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.chaos import RedisServer
from server.api.main import create_app
from server.settings import Settings
from tests.server.serverkit import REPO, LiveServer, free_port, python_cmd, read_stream, sse_events, wait_until

WORKER_ENV = {"IRG_LEASE_S": "2", "IRG_HEARTBEAT_S": "0.5", "IRG_CANCEL_POLL_S": "0.1", "OMP_NUM_THREADS": "1"}
TINY = {"mode": "direct", "width": 32, "height": 32, "steps": 2}


class Workers:
    """`irg worker` processes on one Redis prefix; each logs to its own file."""

    def __init__(self, settings: Settings, demo_dir: Path, logs: Path):
        self.s, self.demo_dir, self.logs = settings, demo_dir, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, IRG_REDIS_PREFIX=self.s.redis_prefix, **WORKER_ENV)
        log = (self.logs / f"{name}.log").open("wb")
        cmd = python_cmd(
            "worker",
            "--redis",
            str(self.s.redis_url),
            "--name",
            name,
            "--model-dir",
            str(self.demo_dir),
            "--device",
            "cpu",
            *extra,
        )
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(redis_settings: Settings, demo_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def make(settings: Settings | None = None) -> Workers:
        w = Workers(settings or redis_settings, demo_dir, tmp_path)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop_all()


def ready_workers(client: httpx.Client) -> int:
    r = client.get("/readyz")
    return int(r.json()["workers"]) if r.status_code == 200 else 0


def test_kill_9_of_the_busy_worker_the_job_still_succeeds(redis_settings: Settings, workers: Any) -> None:
    pool = workers()
    for name in ("w1", "w2"):
        pool.start(name)
    with LiveServer(create_app(redis_settings)) as server, server.client() as c:
        wait_until(lambda: ready_workers(c) == 2, timeout=60)
        body = {
            "prompt": "a lighthouse in a storm",
            "width": 256,
            "height": 256,
            "steps": 16,
            "thinking": {"max_tokens": 64},
            "stream": True,
        }
        events, killed = [], None
        with c.stream("POST", "/v1/generations", json=body) as r:  # one connection, across the kill
            for event in sse_events(r.iter_lines()):
                events.append((event["event"], json.loads(event["data"])))
                if event["event"] == "started" and killed is None:
                    busy = json.loads(event["data"])["worker"]
                if event["event"] == "image.progress" and killed is None:
                    pool.procs[busy].send_signal(signal.SIGKILL)
                    killed = busy
        types = [t for t, _ in events]
        starts = [d for t, d in events if t == "started"]
        assert killed is not None and types[-1] == "completed"
        assert [s["attempt"] for s in starts] == [1, 2] and starts[0]["worker"] == killed != starts[1]["worker"]
        assert types.count("completed") == 1 and "failed" not in types
        job = c.get(f"/v1/generations/{events[0][1]['job_id']}").json()
        assert job["status"] == "succeeded" and job["attempt"] == 2
        for image in job["images"]:
            png = c.get(image["url"])
            assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        survivor = starts[1]["worker"]
        assert "recovered 1 job" in pool.log(survivor) or "recovered 1 job" in pool.log(killed)


class OwnRedis(RedisServer):
    """A redis-server of this test only (AOF on, fsync always), that the test may stop and restart."""

    def __init__(self, workdir: Path):
        super().__init__(workdir, fsync="always", timeout=10)


def _pings(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


def test_redis_restart_under_a_running_api(redis_settings: Settings, own_redis: OwnRedis, workers: Any) -> None:
    s = redis_settings.model_copy(update={"redis_url": own_redis.url})
    workers(s).start("w1")
    with LiveServer(create_app(s)) as server, server.client() as c:
        wait_until(lambda: ready_workers(c) == 1, timeout=60)
        body = {"prompt": "a quiet harbour", "width": 128, "height": 128, "steps": 20, "thinking": {"max_tokens": 32}}
        jobs = [c.post("/v1/generations", json=body).json()["id"] for _ in range(3)]
        own_redis.stop()
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"].startswith("queue backend unreachable")
        r = c.post("/v1/generations", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable" and "retry-after" in r.headers
        assert c.get(f"/v1/generations/{jobs[0]}").status_code == 503
        time.sleep(1.0)
        own_redis.start()
        wait_until(lambda: c.get("/readyz").status_code == 200, timeout=30)
        jobs.append(c.post("/v1/generations", json=body).json()["id"])
        wait_until(
            lambda: all(c.get(f"/v1/generations/{j}").json()["status"] in ("succeeded", "failed") for j in jobs),
            timeout=60,
        )
        assert [c.get(f"/v1/generations/{j}").json()["status"] for j in jobs] == ["succeeded"] * 4
        events = [e["event"] for e in read_stream(c, "GET", f"/v1/generations/{jobs[-1]}/events")]
        assert events[0] == "queued" and events[-1] == "completed"


def test_200_concurrent_submissions_against_a_bound_of_10(redis_settings: Settings, workers: Any) -> None:
    s = redis_settings.model_copy(update={"queue_max": 10})
    pool = workers(s)
    metrics_port = free_port()
    pool.start("w1", "--metrics-port", str(metrics_port))
    pool.start("w2")
    with LiveServer(create_app(s)) as server:
        with server.client() as c:
            wait_until(lambda: ready_workers(c) == 2, timeout=60)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as ac:
                return await asyncio.gather(
                    *(ac.post("/v1/generations", json={"prompt": f"p{i}", **TINY}) for i in range(200))
                )

        answers = asyncio.run(burst())
        codes = [r.status_code for r in answers]
        assert set(codes) <= {202, 429}, sorted(set(codes))
        accepted = [r.json()["id"] for r in answers if r.status_code == 202]
        assert len(accepted) >= 10
        assert all(int(r.headers["retry-after"]) > 0 for r in answers if r.status_code == 429)
        with server.client() as c:
            wait_until(
                lambda: all(c.get(f"/v1/generations/{j}").json()["status"] == "succeeded" for j in accepted),
                timeout=90,
                interval=0.5,
            )
            api_metrics = c.get("/metrics").text
        assert "irg_workers_alive 2.0" in api_metrics and "irg_queue_depth 0.0" in api_metrics
        assert 'irg_jobs_rejected_total{reason="queue_full"}' in api_metrics
        worker_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text  # the worker's own
        assert 'irg_jobs_total{mode="direct",outcome="succeeded",reason="none"}' in worker_metrics
        assert 'irg_stage_seconds_count{round="1",stage="image"}' in worker_metrics
        # each process exports its own metrics only: no worker-only metric at 0 on the API, no API one on a worker
        assert "irg_workers_alive" not in worker_metrics and "irg_jobs_submitted" not in worker_metrics
        assert "irg_stage_seconds" not in api_metrics and "irg_gpu_memory_bytes" not in api_metrics
