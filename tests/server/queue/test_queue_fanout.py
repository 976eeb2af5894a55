"""The Redis fan-out: one stream read per process for many watchers, history straight from Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.jobs import build_params, new_job
from server.queue import fanout
from server.queue.redis import RedisJobQueue, RedisWorkerQueue
from server.schemas import GenerateRequest
from server.settings import Settings


@pytest.fixture
async def queues(redis_settings: Settings) -> AsyncIterator[tuple[RedisJobQueue, RedisWorkerQueue]]:
    api, worker = RedisJobQueue(redis_settings), RedisWorkerQueue(redis_settings)
    yield api, worker
    await api.close()
    worker.close()


async def test_many_watchers_share_one_read(
    queues: tuple[RedisJobQueue, RedisWorkerQueue], redis_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "BUFFER", 8)
    api, worker = queues
    req = GenerateRequest(prompt="a fox", width=64, height=64, steps=4)
    job = new_job(build_params(req, req.prompt, 64, 64, redis_settings), "", False)
    await api.submit(job)
    claim = await asyncio.to_thread(worker.claim, "w", 1.0)
    assert claim is not None
    first = (await api.read_events(job.id, None, 0.01))[-1].id  # queued, started

    async def watcher() -> list[str]:
        seen, after = [], first
        while len(seen) < 20:
            events = await api.read_events(job.id, after, 5.0)
            seen += [e.id for e in events]
            after = events[-1].id
        return seen

    watchers = [asyncio.ensure_future(watcher()) for _ in range(30)]
    await asyncio.sleep(0.2)
    for i in range(20):
        await asyncio.to_thread(worker.emit, claim, "image.progress", {"job_id": job.id, "step": i})
    results = await asyncio.gather(*watchers)
    assert all(r == results[0] for r in results) and len(results[0]) == 20
    assert list(api.fanout.followers) == [api.k.events(job.id)]  # one read of the stream for all 30
    everything = [e.id for e in await api.read_events(job.id, None, 0.01)]
    assert everything[2:] == results[0]
    follower = api.fanout.followers[api.k.events(job.id)]
    assert len(follower.events) == 8 and not follower.covers(first)  # trimmed: old ids come from Redis
    assert [e.id for e in await api.read_events(job.id, first, 0.01)] == results[0]
