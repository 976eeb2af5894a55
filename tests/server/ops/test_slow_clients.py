"""Clients that stop reading cannot grow the API's memory: 40 of them on a finished job of ~11 MB of events
(inline images included) are dropped within the send timeout, the API process grows by at most 100 MB, and a
normal client of the same job meanwhile gets every event."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from server.api.streams import WRITE_BYTES, frame, writes
from server.events import StoredEvent
from server.jobs import build_params, new_job
from server.queue.redis import RedisJobQueue, RedisWorkerQueue
from server.schemas import GenerateRequest
from server.settings import Settings
from tests.server.ops.opskit import ApiProcess, connections, metric, rss_mb
from tests.server.serverkit import read_stream, wait_until

SEND_TIMEOUT_S = 3.0
STUCK = 40
IMAGE_B64 = 2_500_000  # characters of one inline image (a 1024x1024 PNG is about this)


def finished_job(settings: Settings) -> tuple[str, int]:
    """A job that ran and succeeded, written as a worker writes it: many text events and four inline images."""
    req = GenerateRequest(prompt="a slow reader", width=64, height=64)
    job = new_job(build_params(req, req.prompt, req.width, req.height, settings), "", True)
    import asyncio

    async def submit() -> None:
        q = RedisJobQueue(settings)
        await q.submit(job)
        await q.close()

    asyncio.run(submit())
    wq = RedisWorkerQueue(settings)
    claim = wq.claim("slow-test", 5)
    assert claim is not None and claim.job.id == job.id
    for i in range(1500):
        wq.emit(claim, "thinking.delta", {"job_id": job.id, "round": 1, "text": f"{i:05d} " + "x" * 2000})
    for k in range(1, 5):
        wq.emit(
            claim,
            "image.done",
            {
                "job_id": job.id,
                "round": k,
                "kind": "draft",
                "width": 64,
                "height": 64,
                "url": "/x",
                "b64": "A" * IMAGE_B64,
            },
        )
    wq.finish(claim, "completed", {"job_id": job.id}, {"status": "succeeded"})
    wq.close()
    return job.id, 1 + 1 + 1500 + 4 + 1  # queued, started, deltas, images, completed


def stuck_client(port: int, path: str) -> socket.socket:
    """A client that sends its request and never reads (default socket buffers: the kernel takes megabytes)."""
    s = socket.socket()
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n".encode())
    return s


def test_clients_that_never_read_are_dropped_and_memory_stays_bounded(redis_settings: Settings, tmp_path: Path) -> None:
    job_id, n_events = finished_job(redis_settings)
    path = f"/v1/generations/{job_id}/events"
    api = ApiProcess(
        str(redis_settings.redis_url),
        redis_settings.redis_prefix,
        tmp_path / "api.log",
        IRG_SSE_SEND_TIMEOUT_S=str(SEND_TIMEOUT_S),
        IRG_SSE_PING_S="1",
    ).start()
    try:
        with api.client() as c:
            assert len(read_stream(c, "GET", path)) == n_events  # a first reader (the fanout loads the job)
            before = rss_mb(api.pid)
            clients = [stuck_client(api.port, path) for _ in range(STUCK)]
            opened = time.monotonic()
            wait_until(lambda: metric(c.get("/metrics").text, "irg_open_streams") >= STUCK, timeout=10)
            events = read_stream(c, "GET", path)  # a normal client meanwhile
            assert len(events) == n_events and events[-1]["event"] == "completed"
            assert [e["data"]["text"][:5] for e in events if e["event"] == "thinking.delta"] == [
                f"{i:05d}" for i in range(1500)
            ]
            assert [len(e["data"]["b64"]) for e in events if e["event"] == "image.done"] == [IMAGE_B64] * 4
            peak = before

            def dropped() -> bool:
                nonlocal peak
                peak = max(peak, rss_mb(api.pid))
                return metric(c.get("/metrics").text, "irg_open_streams") == 0

            wait_until(dropped, timeout=3 * SEND_TIMEOUT_S + 5, interval=0.2)
            took = time.monotonic() - opened
            wait_until(lambda: connections(api.port) <= 1, timeout=2)  # aborted: only `c`'s keep-alive is left
            assert metric(c.get("/metrics").text, "irg_streams_dropped_total") == STUCK
            for s in clients:
                s.close()
        log = (tmp_path / "api.log").read_text(errors="replace")
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
        assert peak - before <= 100, f"the API grew by {peak - before:.0f} MB"
        assert took <= 3 * SEND_TIMEOUT_S + 5, took
        print(f"\n{STUCK} stuck clients: dropped after {took:.1f} s, API RSS {before:.0f} -> peak {peak:.0f} MB")
    finally:
        api.stop()


def test_a_large_event_goes_out_in_bounded_writes() -> None:
    big = StoredEvent("5-0", "image.done", json.dumps({"b64": "B" * (5 * WRITE_BYTES + 7)}))
    small = [StoredEvent(f"{i}-0", "thinking.delta", json.dumps({"text": "t" * 100})) for i in range(1, 5)]
    chunks = list(writes([*small, big], 1000))
    assert max(len(c) for c in chunks) <= 2 * WRITE_BYTES
    text = b"".join(chunks).decode()
    assert text.startswith("id: 1-0\r\nevent: thinking.delta\r\nretry: 1000\r\ndata: ")
    assert text.count("retry:") == 1 and text.count("\r\n\r\n") == 5
    assert b"".join(frame(big)).decode().endswith('"}\r\n\r\n')
    odd = StoredEvent("6-0", "x", "line one\nline two")  # not our JSON: still valid SSE, one data line each
    assert b"".join(frame(odd)) == b"id: 6-0\r\nevent: x\r\ndata: line one\r\ndata: line two\r\n\r\n"
