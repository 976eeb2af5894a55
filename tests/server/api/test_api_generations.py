"""`/v1/generations` end to end: a real uvicorn server, the in-process queue and a worker on the demo model."""

from __future__ import annotations

import io
import threading
from typing import Any

from PIL import Image

from tests.server.serverkit import IRG_ORDER, SMALL, FakeRunner, collapse, read_stream, sse_events, wait_until


def test_stream_true_yields_every_stage_in_order_and_valid_pngs(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        events = read_stream(
            c,
            "POST",
            "/v1/generations",
            json={"prompt": "a red fox in snow", "stream": True, **SMALL, "width": 80, "height": 48},
        )
        assert collapse([e["event"] for e in events]) == IRG_ORDER
        ids = [e["id"] for e in events]
        assert ids == sorted(ids, key=int) and len(set(ids)) == len(ids)
        job_id = events[0]["data"]["job_id"]
        done = [e["data"] for e in events if e["event"] == "image.done"]
        assert [d["kind"] for d in done] == ["draft", "final"]
        for d in done:
            r = c.get(d["url"])
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            image = Image.open(io.BytesIO(r.content))
            image.verify()
            assert image.format == "PNG" and image.size == (80, 48)
        job = c.get(f"/v1/generations/{job_id}").json()
        assert job["status"] == "succeeded" and events[-1]["data"]["id"] == job_id


def test_accept_header_also_streams(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        events = read_stream(
            c,
            "POST",
            "/v1/generations",
            json={"prompt": "a boat", "mode": "direct", **SMALL},
            headers={"Accept": "text/event-stream"},
        )
        assert collapse([e["event"] for e in events]) == [
            "queued",
            "started",
            "image.progress",
            "image.done",
            "completed",
        ]


def test_reconnect_with_last_event_id_gets_the_rest_exactly_once(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        job = c.post(
            "/v1/generations",
            json={"prompt": "a castle", "width": 128, "height": 128, "steps": 12, "thinking": {"max_tokens": 32}},
        ).json()
        url = f"/v1/generations/{job['id']}/events"
        first: list[dict[str, str]] = []
        with c.stream("GET", url) as r:  # read a little, then drop the connection mid-job
            for event in sse_events(r.iter_lines()):
                first.append(event)
                if event["event"] == "thinking.delta":
                    break
        assert c.get(f"/v1/generations/{job['id']}").json()["status"] == "running"
        rest = read_stream(c, "GET", url, headers={"Last-Event-ID": first[-1]["id"]})
        everything = read_stream(c, "GET", url)
        assert [e["id"] for e in first] + [e["id"] for e in rest] == [e["id"] for e in everything]
        assert [e["event"] for e in everything][-1] == "completed"
        assert c.get(url, headers={"Last-Event-ID": everything[-1]["id"]}).status_code == 204  # nothing left
        assert c.get(url, headers={"Last-Event-ID": "../etc"}).status_code == 422


def test_202_then_get_shows_the_job(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        r = c.post("/v1/generations", json={"prompt": "a tree", **SMALL})
        assert r.status_code == 202
        job = r.json()
        assert job["status"] in ("queued", "running") and r.headers["location"] == job["links"]["self"]
        assert job["params"]["seed"] >= 0 and job["params"]["guidance"][1]["image_scale"] == 2.0
        wait_until(lambda: c.get(job["links"]["self"]).json()["status"] == "succeeded", timeout=20)
        done = c.get(job["links"]["self"]).json()
        assert [t["kind"] for t in done["texts"]] == ["thinking", "reflection"]
        assert [i["name"] for i in done["images"]] == ["draft", "final"]
        assert done["timings"]["run_seconds"] > 0 and done["timings"]["stages"]
        assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
        assert c.get(f"{job['links']['self']}/images/round-2").content == c.get(done["images"][1]["url"]).content


def test_wait_true_returns_the_ended_job(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        r = c.post("/v1/generations", json={"prompt": "a tree", "wait": True, "seed": 7, **SMALL})
        assert r.status_code == 200 and r.json()["status"] == "succeeded" and r.json()["params"]["seed"] == 7


def test_wait_is_bounded(serve: Any) -> None:
    server = serve(worker=False, wait_timeout_s=0.3)
    with server.client() as c:
        r = c.post("/v1/generations", json={"prompt": "a tree", "wait": True, **SMALL})
        assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["queue_position"] == 1


def test_cancel_a_queued_job_it_never_runs(serve: Any) -> None:
    server = serve(worker=False)
    with server.client() as c:
        job = c.post("/v1/generations", json={"prompt": "a tree", **SMALL}).json()
        r = c.delete(job["links"]["self"])
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert [e["event"] for e in read_stream(c, "GET", job["links"]["events"])] == ["queued", "cancelled"]
        assert c.delete(job["links"]["self"]).status_code == 200  # idempotent


def test_cancel_a_running_job_stops_it(serve: Any) -> None:
    server = serve(use_runner=FakeRunner(step_s=0.3))
    with server.client() as c:
        job = c.post("/v1/generations", json={"prompt": "a tree", **SMALL}).json()
        wait_until(lambda: c.get(job["links"]["self"]).json()["status"] == "running")
        r = c.delete(job["links"]["self"])
        assert r.status_code == 202 and r.json()["cancel_requested"]
        events = read_stream(c, "GET", job["links"]["events"])
        assert events[-1]["event"] == "cancelled"
        assert c.get(job["links"]["self"]).json()["status"] == "cancelled"


def test_full_queue_answers_429_and_drops_nothing(serve: Any) -> None:
    server = serve(worker=False, queue_max=2)
    with server.client() as c:
        accepted = [c.post("/v1/generations", json={"prompt": f"p{i}", **SMALL}) for i in range(2)]
        r = c.post("/v1/generations", json={"prompt": "one too many", **SMALL})
        assert [a.status_code for a in accepted] == [202, 202]
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "queue_full"
        assert [c.get(a.json()["links"]["self"]).json()["queue_position"] for a in accepted] == [1, 2]


def test_idempotency_key_returns_the_same_job(serve: Any) -> None:
    server = serve(worker=False)
    with server.client() as c:
        body = {"prompt": "a tree", **SMALL}
        a = c.post("/v1/generations", json=body, headers={"Idempotency-Key": "k-1"}).json()
        b = c.post("/v1/generations", json=body, headers={"Idempotency-Key": "k-1"}).json()
        other = c.post("/v1/generations", json=body, headers={"Idempotency-Key": "k-2"}).json()
        assert a["id"] == b["id"] != other["id"] and a["params"]["seed"] == b["params"]["seed"]


def test_many_watchers_of_one_job(serve: Any) -> None:
    server = serve(use_runner=FakeRunner(step_s=0.05))
    with server.client() as c:
        job = c.post("/v1/generations", json={"prompt": "a tree", **SMALL}).json()
    results: list[list[str]] = []

    def watch() -> None:
        with server.client() as c:
            results.append([e["id"] for e in read_stream(c, "GET", job["links"]["events"])])

    threads = [threading.Thread(target=watch) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 20 and all(r == results[0] for r in results)
