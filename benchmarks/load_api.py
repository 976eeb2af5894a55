"""What the API sustains on this machine, with the in-process queue and with Redis.

    python benchmarks/load_api.py                      # both backends (Redis at redis://127.0.0.1:6379/0)
    python benchmarks/load_api.py --backend memory --submissions 3000 --watchers 100

Three measurements per backend, each against a real uvicorn server in its own process:
- submissions per second: concurrent `POST /v1/generations` (202s counted; nothing consumes the queue);
- SSE fan-out: `--watchers` clients follow one job's event stream while a publisher writes `--events` events at
  `--rate` per second; every event must reach every watcher;
- added latency per event: from the publisher's write (a `time.time()` stamp in the event) to a client parsing
  it, for one watcher and for all of them.
The publisher stands in for the GPU worker (no model): in-process it is a thread of the API process, as in
`irg serve`; with Redis it is a separate process, as `irg worker` is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_PROMPT = "bench events={events} rate={rate} delay={delay}"
BODY = {"prompt": "a red fox in fresh snow", "mode": "direct", "width": 64, "height": 64, "steps": 4}


# -- the publisher (a stand-in for the worker) --------------------------------------------------------------


def publish_loop(queue: Any, stop: threading.Event) -> None:
    """Claim bench jobs and write their events at the rate the prompt asks for, stamped with time.time()."""
    from server.events import COMPLETED

    while not stop.is_set():
        claim = queue.claim("bench-publisher", 0.5)
        if claim is None:
            continue
        spec = dict(kv.split("=") for kv in claim.job.params["prompt"].split()[1:])
        events, rate, delay = int(spec["events"]), float(spec["rate"]), float(spec["delay"])
        time.sleep(delay)  # the watchers connect meanwhile
        start = time.perf_counter()
        for i in range(events):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            queue.emit(
                claim,
                "image.progress",
                {"job_id": claim.job.id, "round": 1, "step": i + 1, "steps": events, "t": time.time()},
            )
        queue.finish(
            claim,
            COMPLETED,
            {"job_id": claim.job.id, "t": time.time()},
            {"status": "succeeded", "finished_at": str(time.time())},
        )


def settings_for(backend: str, redis_url: str, prefix: str) -> Any:
    from server.settings import Settings

    return Settings(
        redis_url=redis_url if backend == "redis" else None,
        redis_prefix=prefix,
        queue_max=1_000_000,
        sse_ping_s=15,
        lease_s=60,
    )


def serve(backend: str, port: int, redis_url: str, prefix: str, publisher: bool) -> None:
    """The API process: uvicorn, plus the publisher thread for the in-process queue."""
    import uvicorn

    from server.api.main import create_app
    from server.queue.memory import MemoryQueue

    settings = settings_for(backend, redis_url, prefix)
    queue = MemoryQueue(settings) if backend == "memory" else None
    stop = threading.Event()
    if queue is not None and publisher:
        threading.Thread(target=publish_loop, args=(queue, stop), daemon=True).start()
    app = create_app(settings, queue)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    stop.set()


def publish(redis_url: str, prefix: str) -> None:
    from server.queue.redis import RedisWorkerQueue

    publish_loop(RedisWorkerQueue(settings_for("redis", redis_url, prefix)), threading.Event())


# -- the client side ------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


async def submissions(url: str, total: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        for _ in range(min(200, total)):  # warm up connections
            await client.post("/v1/generations", json=BODY)
        todo = iter(range(total))

        async def one_client() -> None:
            for _ in todo:
                t0 = time.perf_counter()
                r = await client.post("/v1/generations", json=BODY)
                latencies.append(time.perf_counter() - t0)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    assert set(codes) == {202}, codes
    return {"per_s": total / elapsed, "p50_ms": 1000 * pct(latencies, 50), "p99_ms": 1000 * pct(latencies, 99)}


async def watch(url: str, path: str, lat: list[float]) -> int:
    """Follow a stream to its end over a bare socket (a light client, so the numbers are the server's);
    append each stamped event's latency; return the events received."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    received, buffer = 0, b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        now = time.time()
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            received += 1
            stamp = line.find(b'"t":')
            if stamp >= 0:
                lat.append(now - float(line[stamp + 4 :].rstrip(b"}\r")))
    writer.close()
    return received


async def fan_out(url: str, watchers: int, events: int, rate: float) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        delay = 1.0 + watchers / 50
        prompt = BENCH_PROMPT.format(events=events, rate=rate, delay=delay)
        job = (await client.post("/v1/generations", json=dict(BODY, prompt=prompt))).json()
    path = f"/v1/generations/{job['id']}/events"
    lat: list[float] = []
    start = time.perf_counter()
    counts = await asyncio.gather(*(watch(url, path, lat) for _ in range(watchers)))
    elapsed = time.perf_counter() - start - delay
    expected = events + 3  # queued, started, the events, completed
    return {
        "watchers": watchers,
        "complete": sum(c == expected for c in counts),
        "events": sum(counts),
        "deliveries_per_s": sum(counts) / elapsed,
        "p50_ms": 1000 * pct(lat, 50),
        "p99_ms": 1000 * pct(lat, 99),
        "max_ms": 1000 * max(lat),
    }


def wait_http(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Server:
    """The API (and, with Redis, the publisher) in processes of their own, on a private Redis prefix."""

    def __init__(self, backend: str, redis_url: str, publisher: bool):
        from tests.server.serverkit import free_port

        self.backend, self.redis_url = backend, redis_url
        port, self.prefix = free_port(), f"irgbench:{uuid.uuid4().hex[:8]}"
        self.url = f"http://127.0.0.1:{port}"
        me = [sys.executable, str(Path(__file__).resolve()), "--redis", redis_url, "--prefix", self.prefix]
        self.procs = [
            subprocess.Popen(
                [*me, "--serve", backend, "--port", str(port), *(["--with-publisher"] if publisher else [])], cwd=REPO
            )
        ]
        if backend == "redis" and publisher:
            self.procs.append(subprocess.Popen([*me, "--publish"], cwd=REPO))
        wait_http(self.url)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(10)
        if self.backend == "redis":
            import redis

            r = redis.Redis.from_url(self.redis_url)
            for key in r.scan_iter(match=f"{self.prefix}:*", count=10_000):
                r.delete(key)


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": backend}
    server = Server(backend, args.redis, publisher=False)  # nothing consumes: the queue takes it all
    try:
        out["submit"] = asyncio.run(submissions(server.url, args.submissions, args.concurrency))
    finally:
        server.close()
    server = Server(backend, args.redis, publisher=True)
    try:
        out["one"] = asyncio.run(fan_out(server.url, 1, args.events, args.rate))
        out["fan"] = asyncio.run(fan_out(server.url, args.watchers, args.events, args.rate))
    finally:
        server.close()
    return out


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = [
        "| backend | submissions/s | submit p50 / p99 ms | 1 watcher: event latency p50 / p99 ms | "
        f"{args.watchers} watchers: complete | deliveries/s | event latency p50 / p99 / max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, one, fan = r["submit"], r["one"], r["fan"]
        rows.append(
            f"| {r['backend']} | {s['per_s']:.0f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | "
            f"{one['p50_ms']:.2f} / {one['p99_ms']:.2f} | {fan['complete']}/{fan['watchers']} | "
            f"{fan['deliveries_per_s']:.0f} | {fan['p50_ms']:.1f} / {fan['p99_ms']:.1f} / "
            f"{fan['max_ms']:.1f} |"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("memory", "redis", "both"), default="both")
    p.add_argument("--redis", default=os.environ.get("IRG_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--submissions", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--events", type=int, default=300)
    p.add_argument("--rate", type=float, default=100.0, help="events per second the publisher writes")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--serve", choices=("memory", "redis"), help=argparse.SUPPRESS)
    p.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--with-publisher", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.redis, args.prefix, args.with_publisher)
        return 0
    if args.publish:
        publish(args.redis, args.prefix)
        return 0
    backends = ("memory", "redis") if args.backend == "both" else (args.backend,)
    results = [run_backend(b, args) for b in backends]
    sys.stdout.write(
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}; {args.submissions} submissions at "
        f"concurrency {args.concurrency}; {args.events} events at {args.rate:g}/s\n"
    )
    sys.stdout.write(table(results, args) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
