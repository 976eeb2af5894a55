"""The queue's contract, held by both backends: the in-process one and Redis (a real server, private prefix)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from server.jobs import JobRecord, build_params, new_job
from server.queue.base import Claim, LeaseLost, QueueFull, WorkerInfo
from server.queue.memory import MemoryQueue
from server.queue.redis import RedisJobQueue, RedisWorkerQueue
from server.schemas import GenerateRequest
from server.settings import Settings
from tests.server.serverkit import REDIS_URL


class Pair:
    """The API face (async) and the worker face (sync) of one backend."""

    def __init__(self, api: Any, worker: Any, settings: Settings):
        self.api, self.worker, self.s = api, worker, settings

    def job(self, **request: Any) -> JobRecord:
        req = GenerateRequest(prompt="a lighthouse", width=64, height=64, steps=4, **request)
        return new_job(build_params(req, req.prompt, 64, 64, self.s), "", False)

    async def claim(self, name: str = "w1", timeout: float = 1.0) -> Claim | None:
        return await asyncio.to_thread(self.worker.claim, name, timeout)

    async def types(self, job_id: str) -> list[str]:
        return [e.type for e in await self.api.read_events(job_id, None, 0.01)]


@pytest.fixture(params=["memory", "redis"])
async def q(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Pair]:
    s = settings.model_copy(
        update={"queue_max": 3, "lease_s": 0.4, "max_attempts": 2, "result_ttl_s": 1, "redis_url": REDIS_URL}
    )
    if request.param == "memory":
        backend = MemoryQueue(s)
        yield Pair(backend, backend, s)
        return
    pair = Pair(RedisJobQueue(s), RedisWorkerQueue(s), s)
    yield pair
    await pair.api.close()
    pair.worker.close()
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{s.redis_prefix}:*"))
    if keys:
        r.delete(*keys)


async def test_submit_is_idempotent_and_bounded(q: Pair) -> None:
    job = q.job()
    stored, position, created = await q.api.submit(job)
    assert (stored.id, position, created) == (job.id, 1, True)
    again, position, created = await q.api.submit(job)
    assert (again.id, position, created) == (job.id, 1, False)
    await q.api.submit(q.job())
    await q.api.submit(q.job())
    with pytest.raises(QueueFull):
        await q.api.submit(q.job())
    assert await q.api.depth() == 3
    assert await q.types(job.id) == ["queued"]
    event = (await q.api.read_events(job.id, None, 0.01))[0]
    assert json.loads(event.data) == {"job_id": job.id, "position": 1}


async def test_claim_in_order_and_record_round_trip(q: Pair) -> None:
    first, second = q.job(seed=1), q.job(seed=2)
    await q.api.submit(first)
    await q.api.submit(second)
    assert await q.api.position(second.id) == 2
    claim = await q.claim("w1")
    assert claim is not None and claim.job.id == first.id and claim.attempt == 1
    assert claim.job.params == first.params and claim.job.status == "running" and claim.job.worker == "w1"
    assert await q.api.position(second.id) == 1
    assert await q.types(first.id) == ["queued", "started"]
    started = json.loads((await q.api.read_events(first.id, None, 0.01))[1].data)
    assert started == {"job_id": first.id, "worker": "w1", "attempt": 1}


async def test_claim_waits_and_wakes_on_submit(q: Pair) -> None:
    waiting = asyncio.ensure_future(q.claim("w1", timeout=5.0))
    await asyncio.sleep(0.2)
    job = q.job()
    t0 = time.monotonic()
    await q.api.submit(job)
    claim = await waiting
    assert claim is not None and claim.job.id == job.id
    assert time.monotonic() - t0 < 1.0
    assert await q.claim("w1", timeout=0.1) is None


async def test_events_resume_after_any_id(q: Pair) -> None:
    job = q.job()
    await q.api.submit(job)
    claim = await q.claim()
    assert claim is not None
    for i in range(5):
        q.worker.emit(claim, "image.progress", {"job_id": job.id, "round": 1, "step": i + 1, "steps": 5})
    events = await q.api.read_events(job.id, None, 0.01)
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids) == 7
    for i, event_id in enumerate(ids):
        assert [e.id for e in await q.api.read_events(job.id, event_id, 0.01)] == ids[i + 1 :]
    reader = asyncio.ensure_future(q.api.read_events(job.id, ids[-1], 5.0))
    await asyncio.sleep(0.1)
    q.worker.emit(claim, "image.done", {"job_id": job.id}, {"images": "[]"})
    assert [e.type for e in await reader] == ["image.done"]


async def test_emit_updates_fields_and_finish_ends(q: Pair) -> None:
    job = q.job()
    await q.api.submit(job)
    claim = await q.claim()
    assert claim is not None
    texts = [{"round": 1, "kind": "thinking", "text": "a plan", "done": False}]
    q.worker.emit(
        claim, "thinking.delta", {"job_id": job.id, "round": 1, "text": "a plan"}, {"texts": json.dumps(texts)}
    )
    assert (await q.api.get(job.id)).texts == texts
    q.worker.put_image(claim, 1, b"png bytes")
    assert await q.api.get_image(job.id, 1) == b"png bytes"
    q.worker.finish(claim, "completed", {"job_id": job.id}, {"status": "succeeded", "finished_at": "1.5"})
    done = await q.api.get(job.id)
    assert done.status == "succeeded" and done.finished_at == 1.5 and done.terminal
    assert (await q.types(job.id))[-1] == "completed"
    with pytest.raises(LeaseLost):
        q.worker.emit(claim, "image.progress", {})


async def test_cancel_queued_never_runs(q: Pair) -> None:
    job = q.job()
    await q.api.submit(job)
    cancelled = await q.api.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert await q.claim(timeout=0.1) is None
    assert await q.types(job.id) == ["queued", "cancelled"]
    assert await q.api.cancel("gen_" + "0" * 24) is None


async def test_cancel_running_sets_a_flag(q: Pair) -> None:
    job = q.job()
    await q.api.submit(job)
    claim = await q.claim()
    assert claim is not None and not q.worker.cancel_requested(job.id)
    flagged = await q.api.cancel(job.id)
    assert flagged.status == "running" and flagged.cancel
    assert q.worker.cancel_requested(job.id)


async def test_expired_lease_requeues_then_fails_past_max_attempts(q: Pair) -> None:
    job = q.job()
    await q.api.submit(job)
    first = await q.claim("w1")
    assert first is not None and q.worker.renew(first)
    await asyncio.sleep(0.5)  # lease_s 0.4: w1 "died"
    assert q.worker.recover() == 1
    assert (await q.api.get(job.id)).status == "queued"
    second = await q.claim("w2")
    assert second is not None and second.job.id == job.id and second.attempt == 2
    with pytest.raises(LeaseLost):  # w1 comes back: its writes are fenced off
        q.worker.emit(first, "image.progress", {"job_id": job.id})
    assert not q.worker.renew(first)
    await asyncio.sleep(0.5)
    assert q.worker.recover() == 1  # max_attempts 2: it fails with a clear error
    failed = await q.api.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"
    types = await q.types(job.id)
    assert types == ["queued", "started", "started", "failed"]


async def test_release_hands_back_without_counting(q: Pair) -> None:
    job = q.job()
    await q.api.submit(job)
    claim = await q.claim("w1")
    q.worker.release(claim)
    assert await q.api.position(job.id) == 1
    again = await q.claim("w2")
    assert again is not None and again.attempt == 1


async def test_heartbeats_expire(q: Pair) -> None:
    q.worker.heartbeat(WorkerInfo("w1", ready=True, busy=True))
    workers = await q.api.workers()
    assert [(w.name, w.ready, w.busy) for w in workers] == [("w1", True, True)]
    q.worker.remove_worker("w1")
    assert await q.api.workers() == []
    short = q.s.model_copy(update={"heartbeat_s": 0.1})
    q.worker.s = short
    q.worker.heartbeat(WorkerInfo("w2", ready=True))
    await asyncio.sleep(0.4)
    assert await q.api.workers() == []


async def test_finished_jobs_expire(q: Pair) -> None:
    job = q.job()
    await q.api.submit(job)
    claim = await q.claim()
    q.worker.put_image(claim, 1, b"png")
    q.worker.finish(claim, "completed", {"job_id": job.id}, {"status": "succeeded"})
    assert await q.api.get(job.id) is not None
    await asyncio.sleep(1.2)  # result_ttl_s 1
    await q.api.submit(q.job())  # the in-process queue purges on its next call
    assert await q.api.get(job.id) is None
    assert await q.api.get_image(job.id, 1) is None
    assert await q.api.read_events(job.id, None, 0.01) == []


async def test_the_in_process_queue_keeps_a_bounded_number_of_finished_jobs(settings: Settings) -> None:
    q = MemoryQueue(settings.model_copy(update={"keep_finished": 2}))
    pair = Pair(q, q, q.s)
    done = []
    for _ in range(3):
        job = pair.job()
        await q.submit(job)
        claim = await pair.claim()
        q.finish(claim, "completed", {"job_id": job.id}, {"status": "succeeded"})
        done.append(job.id)
    await q.submit(pair.job())
    assert [await q.get(j) is not None for j in done] == [False, True, True]


async def test_input_images_travel_with_the_job_to_every_attempt(q: Pair) -> None:
    """An edit's input bytes are stored with the job: the worker of each attempt decodes the very same image."""
    import io

    import numpy as np
    from PIL import Image

    from server.jobs import check_input_images, input_images

    buf = io.BytesIO()
    Image.fromarray(np.arange(24 * 40 * 3, dtype=np.uint8).reshape(24, 40, 3)).save(buf, "PNG")
    inputs = check_input_images([buf.getvalue()], q.s)
    req = GenerateRequest(prompt="make it red", mode="direct", steps=4)
    job = new_job(build_params(req, req.prompt, None, None, q.s, inputs=inputs), "", False, None, inputs)
    assert (job.params["width"], job.params["height"]) == (848, 512) and job.params["edit"]
    await q.api.submit(job)
    first = await q.claim("w1")
    assert first is not None and first.job.inputs == job.inputs and first.job.params == job.params
    await asyncio.sleep(0.6)  # the lease (0.4 s) runs out: the job goes back to the queue
    await asyncio.to_thread(q.worker.recover)
    second = await q.claim("w2")
    assert second is not None and second.attempt == 2 and second.job.inputs == job.inputs
    (image,) = input_images(second.job)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(buf.getvalue()))))
    assert (await q.api.get(job.id)).inputs == []  # the API's view leaves the bytes out: only claims carry them
