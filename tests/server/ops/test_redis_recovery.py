"""Redis restarts under a running API (AOF on, this test's own redis-server): from 5 s after Redis answers again,
500 requests and 20 resumed event streams see no 5xx, `/readyz` stays 200, and every stream read back is exact."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from server.queue.base import Claim, WorkerInfo
from server.queue.redis import RedisWorkerQueue
from server.settings import Settings
from tests.server.ops.opskit import ApiProcess
from tests.server.serverkit import sse_events, wait_until
from tests.server.test_redis_e2e import OwnRedis, _pings, own_redis  # noqa: F401 (a fixture)

JOBS = 20
DELTAS = 20  # events each job writes: half before the restart, half after
GRACE_S = 5.0
KEPT = 5  # streams that stay open across the restart (they re-attach)
TINY = {"mode": "direct", "width": 32, "height": 32, "steps": 2}


class FakeWorker:
    """Heartbeats as a ready worker and writes the jobs' events, as `irg worker` would (errors while Redis is
    down are ridden out like a worker's)."""

    def __init__(self, settings: Settings):
        self.q = RedisWorkerQueue(settings)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.q.heartbeat(WorkerInfo("fake", ready=True, device="cpu", model="fake"))
            except Exception:
                pass  # Redis is down; next beat
            self.stop.wait(0.3)

    def emit(self, claim: Claim, i: int) -> None:
        self.q.emit(claim, "thinking.delta", {"job_id": claim.job.id, "round": 1, "text": f"t{i}"})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.q.close()


class Reader:
    """Reads a job's events to its end on its own thread. `resume`: it hangs up once it has the events written
    before the restart and resumes with Last-Event-ID after `go`; otherwise it keeps its one stream open across
    the restart. Any drop after `go`, or a 5xx, is an error."""

    def __init__(self, base: str, job_id: str, go: threading.Event, resume: bool):
        self.base, self.job_id, self.go, self.resume = base, job_id, go, resume
        self.seen: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last: str | None = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": last} if last else {}
            self.connections += 1
            try:
                with httpx.stream(
                    "GET", f"{self.base}/v1/generations/{self.job_id}/events", headers=headers, timeout=30
                ) as r:
                    if r.status_code != 200:
                        self.errors.append(f"{self.job_id}: {r.status_code} {r.read()[:200]!r}")
                        return
                    for e in sse_events(r.iter_lines()):
                        if "id" not in e:
                            continue  # ephemeral (previews, stream.resumed): not in the durable log
                        self.seen.append(e)
                        last = e["id"]
                        if e["event"] in ("completed", "failed", "cancelled"):
                            return
                        if self.resume and not self.go.is_set() and len(self.seen) == 2 + DELTAS // 2:
                            break  # hang up; resume once Redis has been back for the grace period
            except httpx.HTTPError as e:
                self.errors.append(f"{self.job_id}: {e!r}")
                return
            if not self.go.is_set():
                if not self.resume:
                    self.errors.append(f"{self.job_id}: the stream ended")
                    return
                self.go.wait(60)
        self.errors.append(f"{self.job_id}: no terminal event")


def test_redis_restart_no_5xx_after_it_is_back(
    redis_settings: Settings,
    own_redis: OwnRedis,  # noqa: F811
    tmp_path: Path,
) -> None:
    s = redis_settings.model_copy(update={"redis_url": own_redis.url, "heartbeat_s": 0.5, "lease_s": 60.0})
    api = ApiProcess(own_redis.url, s.redis_prefix, tmp_path / "api.log", IRG_QUEUE_MAX="10000").start()
    worker = FakeWorker(s)
    go = threading.Event()
    try:
        with api.client() as c:
            wait_until(lambda: c.get("/readyz").status_code == 200, timeout=15)
            ids = [c.post("/v1/generations", json={"prompt": f"job {i}", **TINY}).json()["id"] for i in range(JOBS)]
            claims = [worker.q.claim("fake", 5) for _ in ids]
            assert all(claims) and sorted(cl.job.id for cl in claims if cl) == sorted(ids)
            for cl in claims:
                for i in range(DELTAS // 2):
                    worker.emit(cl, i)  # type: ignore[arg-type]
            resumed = [Reader(api.url, j, go, resume=True) for j in ids]
            held = [Reader(api.url, j, go, resume=False) for j in ids[:KEPT]]
            readers = resumed + held
            wait_until(lambda: all(len(r.seen) >= 2 + DELTAS // 2 for r in readers), timeout=20)

            own_redis.stop()
            down = [
                c.get("/readyz"),
                c.get(f"/v1/generations/{ids[0]}"),
                c.post("/v1/generations", json={"prompt": "while down", **TINY}),
            ]
            assert [r.status_code for r in down] == [503] * 3
            for r in down:  # nothing about where Redis is
                assert str(own_redis.port) not in r.text and "127.0.0.1" not in r.text, r.text
            time.sleep(1.0)
            own_redis.start()  # returns once Redis answers
            time.sleep(GRACE_S)
            go.set()

            def request(i: int) -> tuple[str, int]:
                job = ids[i % JOBS]
                calls = [
                    ("GET", "/readyz", None),
                    ("GET", f"/v1/generations/{job}", None),
                    ("POST", "/v1/generations", {"prompt": f"more {i}", **TINY}),
                    ("GET", f"/v1/generations/{job}/images/final", None),
                    ("GET", "/metrics", None),
                ]
                method, path, body = calls[i % len(calls)]
                try:
                    r = shared.request(method, path, json=body)
                except httpx.HTTPError as e:
                    return f"{path}: {e!r}", -1
                return path, r.status_code

            def writer() -> None:
                for i in range(DELTAS // 2, DELTAS):
                    for cl in claims:
                        worker.emit(cl, i)  # type: ignore[arg-type]
                for cl in claims:
                    worker.q.finish(cl, "completed", {"job_id": cl.job.id}, {"status": "succeeded"})  # type: ignore

            w = threading.Thread(target=writer)
            w.start()
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool, api.client(limits=httpx.Limits(max_connections=8)) as shared:
                answers = list(pool.map(request, range(500)))
            took = time.monotonic() - started
            w.join(60)
            for r in readers:
                r.thread.join(90)
        bad = [a for a in answers if a[1] >= 500 or a[1] < 0]
        readyz = [code for path, code in answers if path == "/readyz"]
        assert not bad, f"{len(bad)} of 500 failed, e.g. {bad[:5]}"
        assert set(readyz) == {200}, readyz
        errors = [e for r in readers for e in r.errors]
        assert not errors, errors[:5]
        expected = [
            ("queued", None),
            ("started", None),
            *(("thinking.delta", f"t{i}") for i in range(DELTAS)),
            ("completed", None),
        ]
        for r in readers:
            assert [(e["event"], json.loads(e["data"]).get("text")) for e in r.seen] == expected, r.job_id
            assert len({e["id"] for e in r.seen}) == len(r.seen)
        assert [r.connections for r in resumed] == [2] * JOBS and [r.connections for r in held] == [1] * KEPT
        print(
            f"\nfrom {GRACE_S:.0f} s after Redis was back: 500 requests in {took:.1f} s and {JOBS} resumed streams "
            f"without a 5xx; {KEPT} streams held open across the restart"
        )
    finally:
        go.set()
        worker.close()
        api.stop()
