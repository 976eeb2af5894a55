"""Live previews through the API (real demo model): `image.preview` events before each round's `image.done`,
ephemeral (no SSE id, not in the event log) on both queue backends, and a resume after a preview loses no
durable event."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from server.settings import Settings
from server.worker import WorkerThread
from tests.server.serverkit import LiveServer, read_stream, sse_events, wait_until

JOB = {
    "prompt": "a lighthouse at dusk",
    "mode": "irg",
    "width": 256,
    "height": 256,
    "steps": 10,
    "thinking": {"max_tokens": 6},
    "previews": 4,
}


@pytest.fixture
def serve_redis(redis_settings: Settings, runner: Any) -> Iterator[Callable[[], LiveServer]]:
    """The API on the Redis queue with one worker thread (its own Redis connection) on the demo model."""
    from server.api.main import create_app
    from server.queue.redis import RedisJobQueue, RedisWorkerQueue

    servers: list[LiveServer] = []

    def make() -> LiveServer:
        worker = WorkerThread(RedisWorkerQueue(redis_settings), redis_settings, lambda: runner, name="pv-worker")
        server = LiveServer(create_app(redis_settings, RedisJobQueue(redis_settings), [worker])).__enter__()
        servers.append(server)
        with server.client() as c:
            wait_until(lambda: c.get("/readyz").status_code == 200, timeout=20)
        return server

    yield make
    for server in servers:
        server.__exit__()


def check_previews(events: list[dict[str, Any]], rounds: int, width: int, height: int) -> None:
    done: set[int] = set()
    seen: dict[int, int] = {}
    for e in events:
        if e["event"] == "image.preview":
            d = e["data"]
            assert "id" not in e, "a preview must not carry an SSE id (it is not in the event log)"
            assert d["round"] not in done, "a preview after its round's image.done"
            assert 1 <= d["step"] <= d["steps"] and d["format"] == "jpeg"
            image = Image.open(io.BytesIO(base64.b64decode(d["b64"])))
            image.load()
            assert image.format == "JPEG" and image.size == (width, height) == (d["width"], d["height"])
            seen[d["round"]] = seen.get(d["round"], 0) + 1
        elif e["event"] == "image.done":
            assert seen.get(e["data"]["round"], 0) >= 4, f"round {e['data']['round']}: {seen}"
            done.add(e["data"]["round"])
    assert done == set(range(1, rounds + 1))


def durable_ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in events if "id" in e]


def test_streamed_irg_job_delivers_previews_before_each_image(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        events = read_stream(c, "POST", "/v1/generations", live=True, json={**JOB, "stream": True})
        check_previews(events, 2, 256, 256)
        job_id = events[0]["data"]["job_id"]
        # the event log holds no preview: a fresh read of the finished job replays durable events only
        replay = read_stream(c, "GET", f"/v1/generations/{job_id}/events", live=True)
        assert [e["event"] for e in replay] == [e["event"] for e in events if "id" in e]
        assert durable_ids(replay) == durable_ids(events)
        job = c.get(f"/v1/generations/{job_id}").json()
        assert job["params"]["previews"] == 4 and job["params"]["preview_decoder"] == "fast"


def test_resume_after_a_preview_loses_no_durable_event(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        job = c.post("/v1/generations", json=JOB).json()
        url = f"/v1/generations/{job['id']}/events"
        first: list[dict[str, str]] = []
        with c.stream("GET", url) as r:  # drop the connection right after the first preview
            for event in sse_events(r.iter_lines()):
                first.append(event)
                if event["event"] == "image.preview":
                    break
        assert first[-1]["event"] == "image.preview" and "id" not in first[-1]
        last_id = durable_ids(first)[-1]
        rest = read_stream(c, "GET", url, live=True, headers={"Last-Event-ID": last_id})
        assert rest[0]["event"] == "stream.resumed" and "id" not in rest[0]
        everything = read_stream(c, "GET", url, live=True)
        assert durable_ids(first) + durable_ids(rest) == durable_ids(everything)
        assert everything[-1]["event"] == "completed"


def test_previews_off_and_bad_values(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        body = {**JOB, "mode": "direct", "width": 64, "height": 64, "previews": 0, "stream": True}
        events = read_stream(c, "POST", "/v1/generations", live=True, json=body)
        assert events[-1]["event"] == "completed" and not [e for e in events if e["event"] == "image.preview"]
        for bad in ({"previews": -1}, {"previews": 51}, {"preview_decoder": "jpeg"}, {"previews": "4"}):
            r = c.post("/v1/generations", json={**JOB, **bad})
            assert r.status_code == 422, (bad, r.text)
            assert next(iter(bad)) in r.text


def test_vae_preview_decoder(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        body = {**JOB, "mode": "direct", "width": 128, "height": 64, "preview_decoder": "vae", "stream": True}
        events = read_stream(c, "POST", "/v1/generations", live=True, json=body)
        check_previews(events, 1, 128, 64)


def test_previews_over_redis_are_ephemeral(serve_redis: Any) -> None:
    server = serve_redis()
    with server.client() as c:
        events = read_stream(c, "POST", "/v1/generations", live=True, json={**JOB, "stream": True})
        check_previews(events, 2, 256, 256)
        replay = read_stream(c, "GET", f"/v1/generations/{events[0]['data']['job_id']}/events", live=True)
        assert not [e for e in replay if e["event"] == "image.preview"]
        assert durable_ids(replay) == durable_ids(events)


def test_a_resumed_stream_says_so_on_redis(serve_redis: Any) -> None:
    server = serve_redis()
    with server.client() as c:
        job = c.post("/v1/generations", json={**JOB, "mode": "direct", "width": 64, "height": 64}).json()
        url = f"/v1/generations/{job['id']}/events"
        with httpx.Client(base_url=str(c.base_url), timeout=60) as other:
            first = []
            with other.stream("GET", url) as r:
                for event in sse_events(r.iter_lines()):
                    first.append(event)
                    if event["event"] == "started":
                        break
        rest = read_stream(c, "GET", url, live=True, headers={"Last-Event-ID": first[-1]["id"]})
        assert rest[0]["event"] == "stream.resumed"
        assert durable_ids(first) + durable_ids(rest) == durable_ids(read_stream(c, "GET", url))


def test_openai_partial_images_beyond_the_drafts_are_previews(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        body = {
            "prompt": "a lighthouse at dusk",
            "size": "128x64",
            "stream": True,
            "partial_images": 3,
            "steps": 10,
            "thinking": {"max_tokens": 6},
        }
        events = read_stream(c, "POST", "/v1/images/generations", live=True, json=body)
        kinds = [e["event"] for e in events]
        assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"], kinds
        partials = [e["data"] for e in events[:3]]
        assert [p["partial_image_index"] for p in partials] == [0, 1, 2]
        previews = [p for p in partials if "irg_preview" in p]
        assert len(previews) == 2, "one slot is the draft's, the other two go to previews"
        for p in partials:
            image = Image.open(io.BytesIO(base64.b64decode(p["b64_json"])))
            assert image.format == "PNG" and image.size == (128, 64)
        # without partial_images: the drafts only, as before
        events = read_stream(
            c,
            "POST",
            "/v1/images/generations",
            live=True,
            json={k: v for k, v in body.items() if k != "partial_images"},
        )
        assert [e["event"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]


def test_step_cache_through_the_api_reports_its_counts(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        body = {
            "prompt": "a boat",
            "mode": "direct",
            "width": 64,
            "height": 64,
            "steps": 12,
            "previews": 0,
            "cache": {"method": "taylorseer"},
            "wait": True,
        }
        job = c.post("/v1/generations", json=body).json()
        assert job["status"] == "succeeded", job
        assert job["params"]["cache"] == {
            "method": "taylorseer",
            "fresh_threshold": 3,
            "first_enhance": 5,
            "max_order": 6,
        }
        (image,) = [s for s in job["timings"]["stages"] if s["stage"] == "image"]
        # 11 steps: full at 0-4, 7, 10 (7), forecast at 5, 6, 8, 9 (4)
        assert (image["steps"], image["model_evaluations"], image["forecast_steps"]) == (11, 7, 4)
        exact = c.post("/v1/generations", json={**body, "cache": None}).json()
        (image,) = [s for s in exact["timings"]["stages"] if s["stage"] == "image"]
        assert exact["params"]["cache"] is None and (image["model_evaluations"], image["forecast_steps"]) == (11, 0)
        for bad, name in (
            ({"method": "fora"}, "method"),
            ({"method": "taylorseer", "max_order": 11}, "max_order"),
            ({"method": "taylorseer", "fresh_ratio": 0.5}, "fresh_ratio"),
            ({}, "method"),
        ):
            r = c.post("/v1/generations", json={**body, "cache": bad})
            assert r.status_code == 422 and name in r.text, (bad, r.text)
