"""Chaos: the Redis deployment under a steady load while things break, then a check that nothing was lost.

    python benchmarks/chaos.py                        # 120 s of load on the demo model, figures as a table
    python benchmarks/chaos.py --duration 300 --submit-every 0.5 --model-dir /models/demo

It starts its own redis-server (AOF on, a free port), one API (`irg serve --redis`) and two workers
(`irg worker`), all as separate processes on this machine. For `--duration` seconds it submits a job every
`--submit-every` seconds (a 429 or 503 is retried with the same Idempotency-Key, as a client should); every job
has a reader that follows its event stream, hangs up part-way (`--disconnect-share` of them) and resumes with
Last-Event-ID, and retries through outages; `--cancel-share` of the jobs are cancelled at a random moment.
At 30 % of the run it `kill -9`s a worker that is running a job (and starts a replacement unless
`--no-replace`), at 60 % it restarts Redis. Then it waits for every accepted job to end and checks:

- every accepted job is `succeeded` or `cancelled` (`lost`: any other end, or none, or gone);
- every stream a reader put together across its reconnections equals the job's full event log, which itself
  has unique, increasing ids, starts with `queued` and ends with exactly one terminal event;
- no 5xx outside the Redis outage (from the stop until 5 s after Redis answers again);
- the API process's memory grew by at most `--max-rss-growth-mb`.

`tests/server/ops/test_chaos.py` runs a short version of it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
ENV = {
    "IRG_LEASE_S": "2",
    "IRG_HEARTBEAT_S": "0.5",
    "IRG_CANCEL_POLL_S": "0.1",
    "IRG_QUEUE_MAX": "1000",
    "OMP_NUM_THREADS": "1",
    "IRG_SSE_PING_S": "2",
}
JOB = {"mode": "think", "width": 64, "height": 64, "steps": 8, "thinking": {"max_tokens": 16}}  # ~1 s on a CPU
TERMINAL = ("completed", "failed", "cancelled")
OUTAGE_GRACE_S = 5.0  # 5xx are allowed from Redis's stop until this long after it answers again


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) / 1024 if found else 0.0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


class RedisServer:
    """A redis-server of this run: AOF on, in its own directory, stopped (SIGTERM) and started again at will.
    (The Redis tests use it too, with `fsync="always"`.)"""

    def __init__(self, workdir: Path, fsync: str = "everysec", timeout: float = 20.0):
        self.port, self.dir = free_port(), workdir
        self.fsync, self.timeout = fsync, timeout  # seconds to start, and to stop
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.fsync,
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        import redis

        def pings() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
            except redis.exceptions.RedisError:
                return False

        wait_for(pings, self.timeout, "redis-server answers")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(self.timeout)


class Processes:
    """The API and the workers, each a process logging to its own file under `workdir`."""

    def __init__(self, workdir: Path, redis_url: str, prefix: str, model_dir: Path | None):
        self.dir, self.redis_url, self.model_dir = workdir, redis_url, model_dir
        self.env = dict(os.environ, IRG_REDIS_PREFIX=prefix, **ENV)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def api(self, port: int) -> subprocess.Popen[bytes]:
        return self._spawn("api", "serve", "--redis", self.redis_url, "--port", str(port), "--no-access-log")

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        model = ["--model-dir", str(self.model_dir)] if self.model_dir else []
        return self._spawn(name, "worker", "--redis", self.redis_url, "--name", name, "--device", "cpu", *model)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Outage:
    """When Redis was down (monotonic), for telling expected 503s from unexpected 5xx."""

    start: float | None = None
    end: float | None = None  # when Redis answered again, plus the grace

    def covers(self, t0: float, t1: float) -> bool:
        return self.start is not None and t1 >= self.start and (self.end is None or t0 <= self.end)


@dataclass
class Figures:
    duration_s: float = 0.0
    accepted: int = 0
    succeeded: int = 0
    cancelled: int = 0
    lost: int = 0
    jobs_rerun: int = 0  # ran again after their worker was killed (attempt 2)
    worker_kills: int = 0
    redis_restarts: int = 0
    streams_checked: int = 0
    streams_exact: int = 0
    resumes: int = 0
    http_5xx_in_outage: int = 0
    http_5xx_outside_outage: int = 0
    submit_p50_ms: float = 0.0
    submit_p99_ms: float = 0.0
    job_p50_s: float = 0.0
    job_p99_s: float = 0.0
    api_rss_start_mb: float = 0.0
    api_rss_peak_mb: float = 0.0
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [(k, v) for k, v in asdict(self).items() if k != "problems"]
        out = ["| figure | value |", "|---|---|"]
        out += [f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
        return "\n".join(out)


class Reader:
    """Follows one job's events to its end on its own thread, hanging up once part-way if told to, and
    resuming with Last-Event-ID after every drop (outages included)."""

    def __init__(self, base: str, job_id: str, submitted: float, hang_up_after: int | None, run: Chaos):
        self.base, self.job_id, self.submitted, self.run = base, job_id, submitted, run
        self.hang_up_after = hang_up_after
        self.events: list[tuple[str, str, str]] = []  # (id, type, data)
        self.connections = 0
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        deadline = time.monotonic() + self.run.cfg.duration + 240
        with httpx.Client(base_url=self.base, timeout=httpx.Timeout(30, connect=5)) as c:
            while time.monotonic() < deadline:
                headers = {"Last-Event-ID": self.events[-1][0]} if self.events else {}
                self.connections += 1
                t0 = time.monotonic()
                try:
                    with c.stream("GET", f"/v1/generations/{self.job_id}/events", headers=headers) as r:
                        if r.status_code == 204:
                            self.ended_at = time.monotonic()
                            return
                        if r.status_code != 200:
                            self.run.http_status(r.status_code, t0, f"events {self.job_id}")
                            if r.status_code < 500 and r.status_code != 429:
                                self.run.problem(f"events {self.job_id}: {r.status_code}")
                                return
                            time.sleep(0.3)
                            continue
                        if self._consume(r):
                            return
                except httpx.HTTPError:
                    time.sleep(0.3)  # a drop (e.g. the API's Redis outage ended the stream): resume

    def _consume(self, r: httpx.Response) -> bool:
        """Read one connection's events; True at the job's end."""
        event: dict[str, str] = {}
        for line in r.iter_lines():
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(":")
                    event[name] = value[1:] if value.startswith(" ") else value
                continue
            if "data" not in event or "id" not in event:  # ephemeral events (previews, stream.resumed) have no id
                event = {}
                continue
            self.events.append((event.get("id", ""), event.get("event", "message"), event["data"]))
            event = {}
            if self.events[-1][1] in TERMINAL:
                self.ended_at = time.monotonic()
                return True
            if self.hang_up_after is not None and len(self.events) >= self.hang_up_after:
                self.hang_up_after = None
                self.run.count("resumes")
                return False  # hang up; the loop resumes after the last event
        return False


class Chaos:
    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.figures = Figures()
        self.outage = Outage()
        self.lock = threading.Lock()
        self.readers: dict[str, Reader] = {}
        self.submit_ms: list[float] = []
        self.peak = 0.0
        self.restarter: threading.Thread | None = None

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self.figures, name, getattr(self.figures, name) + n)

    def problem(self, text: str) -> None:
        with self.lock:
            self.figures.problems.append(text)

    def http_status(self, code: int, t0: float, what: str) -> None:
        if code < 500:
            return
        if self.outage.covers(t0, time.monotonic()):
            self.count("http_5xx_in_outage")
        else:
            self.count("http_5xx_outside_outage")
            with self.lock:
                self.figures.problems.append(f"{what}: {code} outside the Redis outage")

    def run(self) -> Figures:
        workdir = Path(self.cfg.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        redis_server = RedisServer(workdir)
        redis_server.start()
        procs = Processes(workdir, redis_server.url, f"chaos{uuid.uuid4().hex[:8]}", self.cfg.model_dir)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        try:
            api = procs.api(port)
            for i in range(2):
                procs.worker(f"w{i + 1}")
            with httpx.Client(base_url=base, timeout=30) as c:
                wait_for(
                    lambda: c.get("/readyz").status_code == 200 and c.get("/readyz").json()["workers"] == 2,
                    self.cfg.start_timeout,
                    "the API with two ready workers",
                )
                self.figures.api_rss_start_mb = self.peak = rss_mb(api.pid)
                sampler = threading.Thread(target=self._sample, args=(api.pid,), daemon=True)
                sampler.start()
                self._load(c, base, procs, redis_server)
                self._settle(c)
                self._check(c)
        finally:
            self.done = True
            procs.stop()
            redis_server.stop()
        self.figures.api_rss_peak_mb = self.peak
        return self.figures

    done = False

    def _sample(self, pid: int) -> None:
        while not self.done:
            try:
                self.peak = max(self.peak, rss_mb(pid))
            except OSError:
                return
            time.sleep(0.2)

    def _submit(self, c: httpx.Client, i: int) -> str | None:
        key = f"chaos-{i}-{uuid.uuid4().hex}"
        body = dict(JOB, prompt=f"chaos job {i}", seed=i)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                r = c.post("/v1/generations", json=body, headers={"Idempotency-Key": key})
            except httpx.HTTPError:
                time.sleep(0.3)
                continue
            self.http_status(r.status_code, t0, f"submit {i}")
            if r.status_code == 202:
                self.submit_ms.append((time.monotonic() - t0) * 1000)
                return str(r.json()["id"])
            if r.status_code not in (429, 503):
                self.figures.problems.append(f"submit {i}: {r.status_code} {r.text[:200]}")
                return None
            time.sleep(0.3)
        self.figures.problems.append(f"submit {i}: not accepted within 60 s")
        return None

    def _cancel_later(self, base: str, job_id: str) -> None:
        def cancel() -> None:
            for _ in range(50):
                t0 = time.monotonic()
                try:
                    r = httpx.delete(f"{base}/v1/generations/{job_id}", timeout=30)
                except httpx.HTTPError:
                    time.sleep(0.3)
                    continue
                self.http_status(r.status_code, t0, f"cancel {job_id}")
                if r.status_code < 500:
                    return
                time.sleep(0.3)

        timer = threading.Timer(self.rng.uniform(0.0, 2.0), cancel)
        timer.daemon = True
        timer.start()

    def _kill_busy_worker(self, c: httpx.Client, procs: Processes, job_id: str) -> bool:
        """`kill -9` the worker running `job_id` (just submitted) once it runs; False if it ended first."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                job = c.get(f"/v1/generations/{job_id}").json()
            except (httpx.HTTPError, ValueError):
                return False
            name = job.get("worker")
            if job.get("status") == "running" and name in procs.procs and procs.procs[name].poll() is None:
                procs.procs[name].send_signal(signal.SIGKILL)
                procs.procs[name].wait()
                self.count("worker_kills")
                say(f"[{self._t():6.1f}s] kill -9 {name} (running {job_id})")
                if self.cfg.replace:
                    procs.worker(f"w{len(procs.procs)}")
                return True
            if job.get("status") not in ("queued", "running"):
                return False
            time.sleep(0.01)
        return False

    def _restart_redis(self, redis_server: RedisServer) -> None:
        self.outage.start = time.monotonic()
        say(f"[{self._t():6.1f}s] redis stop")
        redis_server.stop()
        time.sleep(1.0)
        redis_server.start()
        self.outage.end = time.monotonic() + OUTAGE_GRACE_S
        self.count("redis_restarts")
        say(f"[{self._t():6.1f}s] redis answers again")

    def _t(self) -> float:
        return time.monotonic() - self.t_start

    def _load(self, c: httpx.Client, base: str, procs: Processes, redis_server: RedisServer) -> None:
        self.t_start = time.monotonic()
        end = self.t_start + self.cfg.duration
        i = 0
        while time.monotonic() < end:
            t = self._t()
            if self.restarter is None and t >= 0.6 * self.cfg.duration:
                self.restarter = threading.Thread(target=self._restart_redis, args=(redis_server,), daemon=True)
                self.restarter.start()
            submitted = time.monotonic()
            job_id = self._submit(c, i)
            if job_id is not None:
                self.count("accepted")
                hang_up = self.rng.randint(2, 8) if self.rng.random() < self.cfg.disconnect_share else None
                self.readers[job_id] = Reader(base, job_id, submitted, hang_up, self)
                if self.figures.worker_kills == 0 and t >= 0.3 * self.cfg.duration:
                    self._kill_busy_worker(c, procs, job_id)
                elif self.rng.random() < self.cfg.cancel_share:
                    self._cancel_later(base, job_id)
            i += 1
            time.sleep(max(0.0, submitted + self.cfg.submit_every - time.monotonic()))
        self.figures.duration_s = self._t()
        if self.restarter is not None:
            self.restarter.join(60)

    def _settle(self, c: httpx.Client) -> None:
        deadline = time.monotonic() + self.cfg.settle_timeout
        for reader in self.readers.values():
            reader.thread.join(max(0.1, deadline - time.monotonic()))

    def _check(self, c: httpx.Client) -> None:
        f = self.figures
        job_s = []
        for job_id, reader in self.readers.items():
            job = c.get(f"/v1/generations/{job_id}")
            status = job.json().get("status") if job.status_code == 200 else f"http {job.status_code}"
            if job.status_code == 200 and (job.json().get("attempt") or 1) > 1:
                f.jobs_rerun += 1
            if status == "succeeded":
                f.succeeded += 1
            elif status == "cancelled":
                f.cancelled += 1
            else:
                f.lost += 1
                f.problems.append(f"{job_id}: {status}")
            full = self._full_log(c, job_id)
            f.streams_checked += 1
            problem = log_problem(full) or (
                None
                if reader.events == full
                else f"read {len(reader.events)} events over {reader.connections} connections, the log has {len(full)}"
            )
            if problem:
                f.problems.append(f"{job_id}: {problem}")
            else:
                f.streams_exact += 1
            if reader.ended_at is not None:
                job_s.append(reader.ended_at - reader.submitted)
        f.submit_p50_ms, f.submit_p99_ms = percentile(self.submit_ms, 50), percentile(self.submit_ms, 99)
        f.job_p50_s, f.job_p99_s = percentile(job_s, 50), percentile(job_s, 99)

    @staticmethod
    def _full_log(c: httpx.Client, job_id: str) -> list[tuple[str, str, str]]:
        events = []
        with c.stream("GET", f"/v1/generations/{job_id}/events") as r:
            event: dict[str, str] = {}
            for line in r.iter_lines():
                if line and not line.startswith(":"):
                    name, _, value = line.partition(":")
                    event[name] = value[1:] if value.startswith(" ") else value
                elif not line and "data" in event:
                    if "id" in event:  # durable events only (previews and stream.resumed have no id)
                        events.append((event.get("id", ""), event.get("event", "message"), event["data"]))
                    event = {}
        return events


def log_problem(events: list[tuple[str, str, str]]) -> str | None:
    """What is wrong with a job's full event log, if anything."""
    if not events:
        return "no events"
    ids = [tuple(int(x) for x in e[0].split("-")) for e in events]
    if any(a >= b for a, b in zip(ids, ids[1:], strict=False)):
        return "ids not strictly increasing"
    types = [e[1] for e in events]
    if types[0] != "queued":
        return f"starts with {types[0]}"
    if types[-1] not in TERMINAL or sum(t in TERMINAL for t in types) != 1:
        return f"ends with {types[-1]}, {sum(t in TERMINAL for t in types)} terminal events"
    for _, _, data in events:
        json.loads(data)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    p.add_argument("--submit-every", type=float, default=1.0, help="seconds between submissions")
    p.add_argument("--cancel-share", type=float, default=0.15, help="share of the jobs cancelled")
    p.add_argument("--disconnect-share", type=float, default=0.5, help="share of the readers that hang up and resume")
    p.add_argument("--model-dir", type=Path, help="model of the workers (default: the demo checkpoint)")
    p.add_argument("--no-replace", dest="replace", action="store_false", help="do not replace the killed worker")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds for the workers to get ready")
    p.add_argument("--settle-timeout", type=float, default=180.0, help="seconds for the jobs to end after the load")
    p.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=f"/tmp/irg-chaos-{os.getpid()}", help="logs and the AOF")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    figures = Chaos(cfg).run()
    say(figures.table())
    growth = figures.api_rss_peak_mb - figures.api_rss_start_mb
    ok = (
        figures.worker_kills >= 1
        and figures.redis_restarts == 1
        and figures.lost == 0
        and figures.streams_exact == figures.streams_checked
        and not figures.problems
        and figures.http_5xx_outside_outage == 0
        and growth <= cfg.max_rss_growth_mb
    )
    for problem in figures.problems[:20]:
        say("problem:", problem)
    say("OK" if ok else "FAILED", f"(logs in {cfg.workdir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
