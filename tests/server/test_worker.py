"""The worker loop: events in order, records kept current, every failure confined to its job."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from typing import Any

import pytest
import redis
from PIL import Image

from server import metrics
from server.jobs import JobRecord, build_params, new_job
from server.queue.memory import MemoryQueue
from server.queue.redis import RedisJobQueue, RedisWorkerQueue
from server.schemas import GenerateRequest
from server.settings import Settings
from server.worker import Worker
from tests.server.serverkit import IRG_ORDER, FakeRunner, collapse, wait_until


def submit(queue: Any, settings: Settings, image_b64: bool = False, **request: Any) -> JobRecord:
    req = GenerateRequest(
        **{
            "prompt": "a lighthouse at dusk",
            "width": 64,
            "height": 64,
            "steps": 4,
            "thinking": {"max_tokens": 8},
            **request,
        }
    )
    job = new_job(build_params(req, req.prompt, req.width, req.height, settings), "", image_b64)
    asyncio.run(queue.submit(job))
    return job


def events(queue: Any, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e.type, json.loads(e.data)) for e in asyncio.run(queue.read_events(job_id, None, 0.01))]


def run_next(queue: Any, worker: Worker) -> JobRecord:
    claim = queue.claim(worker.name, 1.0)
    assert claim is not None
    worker.run_job(claim)
    return asyncio.run(queue.get(claim.job.id))


@pytest.fixture
def memq(settings: Settings) -> MemoryQueue:
    return MemoryQueue(settings)


def test_irg_job_publishes_every_stage_in_order(memq: MemoryQueue, settings: Settings, runner: Any) -> None:
    worker = Worker(memq, settings, "w")
    worker.runner = runner
    before = metrics.JOBS.labels("irg", "succeeded", "none")._value.get()
    job = submit(memq, settings, width=64, height=48)
    done = run_next(memq, worker)
    got = events(memq, job.id)
    assert collapse([t for t, _ in got]) == IRG_ORDER
    images = [d for t, d in got if t == "image.done"]
    assert [(d["round"], d["kind"], d["width"], d["height"]) for d in images] == [
        (1, "draft", 64, 48),
        (2, "final", 64, 48),
    ]
    assert images[0]["url"].endswith("/images/draft") and images[1]["url"].endswith("/images/final")
    assert all(d["job_id"] == job.id for _, d in got)
    for k in (1, 2):
        png = asyncio.run(memq.get_image(job.id, k))
        assert Image.open(io.BytesIO(png)).size == (64, 48)
    assert done.status == "succeeded" and done.attempt == 1
    thinking = "".join(d["text"] for t, d in got if t == "thinking.delta")
    assert [(t["round"], t["kind"], t["done"]) for t in done.texts] == [(1, "thinking", True), (2, "reflection", True)]
    assert done.texts[0]["text"] == thinking.strip() or done.texts[0]["text"] in thinking
    assert {s["stage"] for s in done.timings["stages"]} >= {"prefill", "thinking", "image", "reencode", "reflection"}
    assert done.usage["image_tokens"] == 2 * (64 // 16) * (48 // 16) and done.usage["text_tokens"] > 0
    completed = got[-1][1]
    assert completed["status"] == "succeeded" and completed["params"]["seed"] == job.params["seed"]
    assert metrics.JOBS.labels("irg", "succeeded", "none")._value.get() == before + 1


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (
            "think",
            ["queued", "started", "thinking.delta", "thinking.done", "image.progress", "image.done", "completed"],
        ),
        ("direct", ["queued", "started", "image.progress", "image.done", "completed"]),
    ],
)
def test_think_and_direct_modes(
    memq: MemoryQueue, settings: Settings, runner: Any, mode: str, expected: list[str]
) -> None:
    worker = Worker(memq, settings, "w")
    worker.runner = runner
    job = submit(memq, settings, mode=mode)
    assert run_next(memq, worker).status == "succeeded"
    got = events(memq, job.id)
    assert collapse([t for t, _ in got]) == expected
    assert [d["kind"] for t, d in got if t == "image.done"] == ["final"]


def test_three_rounds_name_their_drafts(memq: MemoryQueue, settings: Settings) -> None:
    worker = Worker(memq, settings, "w")
    worker.runner = FakeRunner()
    job = submit(memq, settings, rounds=3)
    done = run_next(memq, worker)
    urls = [d["url"].rsplit("/", 1)[1] for t, d in events(memq, job.id) if t == "image.done"]
    assert urls == ["round-1", "round-2", "final"]
    assert [i["kind"] for i in done.images] == ["draft", "draft", "final"]


def test_b64_images_on_request(memq: MemoryQueue, settings: Settings) -> None:
    worker = Worker(memq, settings, "w")
    worker.runner = FakeRunner()
    job = submit(memq, settings, image_b64=True)
    run_next(memq, worker)
    for _, data in (e for e in events(memq, job.id) if e[0] == "image.done"):
        assert Image.open(io.BytesIO(base64.b64decode(data["b64"]))).size == (64, 64)


def test_a_bad_job_fails_alone(memq: MemoryQueue, settings: Settings, runner: Any) -> None:
    worker = Worker(memq, settings, "w")
    worker.runner = runner
    bad = submit(memq, settings)
    bad.params["steps"] = 1  # what the API refuses, slipped past it
    memq._jobs[bad.id]["params"] = json.dumps(bad.params)
    failed = run_next(memq, worker)
    assert failed.status == "failed" and failed.error["code"] == "invalid_params"
    assert "steps" in failed.error["message"]
    assert events(memq, bad.id)[-1] == ("failed", {"job_id": bad.id, "error": failed.error})
    submit(memq, settings)
    assert run_next(memq, worker).status == "succeeded"


@pytest.mark.parametrize(
    ("error", "code"), [(RuntimeError("boom"), "internal_error"), (MemoryError("no room"), "out_of_memory")]
)
def test_exceptions_fail_the_job_not_the_worker(
    memq: MemoryQueue, settings: Settings, error: Exception, code: str
) -> None:
    worker = Worker(memq, settings, "w")
    worker.runner = FakeRunner(fail=error)
    submit(memq, settings)
    failed = run_next(memq, worker)
    assert failed.status == "failed" and failed.error["code"] == code and str(error) in failed.error["message"]
    worker.runner = FakeRunner()
    submit(memq, settings)
    assert run_next(memq, worker).status == "succeeded"


def _start(queue: Any, settings: Settings, runner: Any) -> tuple[Worker, threading.Thread]:
    worker = Worker(queue, settings, "w")
    worker.start(runner)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def _status(queue: Any, job_id: str) -> str:
    return asyncio.run(queue.get(job_id)).status


def test_cancel_a_running_job(memq: MemoryQueue, settings: Settings) -> None:
    worker, thread = _start(memq, settings, FakeRunner(step_s=0.2))
    job = submit(memq, settings)
    wait_until(lambda: _status(memq, job.id) == "running")
    asyncio.run(memq.cancel(job.id))
    wait_until(lambda: _status(memq, job.id) == "cancelled", timeout=5)
    assert events(memq, job.id)[-1][0] == "cancelled"
    worker.request_stop()
    thread.join(5)
    worker.close()


def test_a_job_past_its_time_fails(memq: MemoryQueue, settings: Settings) -> None:
    worker = Worker(memq, settings.model_copy(update={"job_timeout_s": 0.3}), "w")
    worker.runner = FakeRunner(step_s=0.2)
    submit(memq, settings)
    failed = run_next(memq, worker)
    assert failed.status == "failed" and failed.error["code"] == "timeout"


def test_stop_drains_then_hands_back(memq: MemoryQueue, settings: Settings) -> None:
    worker, thread = _start(memq, settings, FakeRunner(step_s=0.1))
    first = submit(memq, settings)
    wait_until(lambda: _status(memq, first.id) == "running")
    worker.request_stop()  # drain: the job in hand finishes, nothing more is claimed
    second = submit(memq, settings)
    thread.join(10)
    assert _status(memq, first.id) == "succeeded" and _status(memq, second.id) == "queued"

    worker, thread = _start(memq, settings, FakeRunner(step_s=0.2))
    wait_until(lambda: _status(memq, second.id) == "running")
    worker.request_stop()
    worker.request_stop()  # a second signal: hand it back now
    thread.join(5)
    back = asyncio.run(memq.get(second.id))
    assert back.status == "queued" and asyncio.run(memq.position(second.id)) == 1
    claim = memq.claim("w2", 1.0)
    assert claim is not None and claim.attempt == 1  # the handed-back attempt does not count
    worker.close()


class SyncRedisApi:
    """The API face of the Redis queue, called from sync test code (one event loop per call)."""

    def __init__(self, settings: Settings):
        self.s = settings

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any) -> Any:
            queue = RedisJobQueue(self.s)
            try:
                return await getattr(queue, name)(*args)
            finally:
                await queue.close()

        return call


def test_a_worker_whose_lease_is_gone_abandons_its_job(redis_settings: Settings) -> None:
    s = redis_settings.model_copy(update={"lease_s": 0.6})
    api, wq = SyncRedisApi(s), RedisWorkerQueue(s)
    worker, thread = _start(wq, s, FakeRunner(step_s=0.2))
    job = submit(api, s)
    wait_until(lambda: _status(api, job.id) == "running")
    redis.Redis.from_url(s.redis_url).delete(wq.k.lease(job.id))  # as if the lease had expired
    wait_until(lambda: _status(api, job.id) == "succeeded", timeout=10)
    types = [t for t, _ in events(api, job.id)]
    second = types.index("started", types.index("started") + 1)  # recovered, then run again
    assert not any(t in ("completed", "failed", "cancelled") for t in types[:second])
    assert types.count("completed") == 1 and asyncio.run(api.get(job.id)).attempt == 2
    worker.request_stop()
    thread.join(5)
    worker.close()
