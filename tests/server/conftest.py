"""Fixtures of the server tests: the demo model (real, tiny, on CPU), settings with a private Redis prefix,
and live API servers (in-process queue, a worker thread on the demo model)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from server.settings import Settings
from server.worker import WorkerThread
from tests.server.serverkit import REDIS_URL, LiveServer, replace_settings, wait_until


@pytest.fixture(scope="session")
def runner(demo_dir: Path) -> Any:
    """The real demo model behind a warmed-up EngineRunner (shared: one job runs at a time)."""
    from irg_core.engine import Engine
    from irg_core.loader import load_model
    from server.runner import EngineRunner

    r = EngineRunner(Engine(load_model(demo_dir, "cpu")), model="demo")
    r.warm_up()
    return r


@pytest.fixture
def settings() -> Settings:
    """Settings with a private Redis prefix and quick timers (no environment needed)."""
    return Settings(
        redis_url=None,
        redis_prefix=f"irgtest:{uuid.uuid4().hex[:12]}",
        lease_s=3.0,
        heartbeat_s=0.5,
        cancel_poll_s=0.05,
        wait_timeout_s=20.0,
        result_ttl_s=600,
        drain_s=5.0,
    )


@pytest.fixture
def redis_settings(settings: Settings) -> Iterator[Settings]:
    """`settings` on the shared test Redis; every key under its prefix is deleted afterwards."""
    s = settings.model_copy(update={"redis_url": REDIS_URL})
    yield s
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{s.redis_prefix}:*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture
def serve(settings: Settings, runner: Any) -> Iterator[Callable[..., LiveServer]]:
    """Start the API (in-process queue, one worker thread on the demo model unless `worker=False`)."""
    from server.api.main import create_app
    from server.queue.memory import MemoryQueue

    live: list[LiveServer] = []

    def make(worker: bool = True, use_runner: Any = None, **overrides: Any) -> LiveServer:
        s = replace_settings(settings, **overrides)
        queue = MemoryQueue(s)
        services = [WorkerThread(queue, s, lambda: use_runner or runner, name="test-worker")] if worker else []
        server = LiveServer(create_app(s, queue, services)).__enter__()
        server.queue, server.settings = queue, s  # type: ignore[attr-defined]
        live.append(server)
        if worker:
            with server.client() as c:
                wait_until(lambda: c.get("/readyz").status_code == 200, timeout=15)
        return server

    yield make
    for server in live:
        server.__exit__()
