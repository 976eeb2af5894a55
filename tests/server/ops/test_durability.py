"""Redis without persistence is said at start: a warning in the log of `irg serve --redis` and `irg worker`, and
`irg_redis_durable 0` in the metrics; with `appendonly yes` neither."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.queue.durability import classify
from tests.server.ops.opskit import ApiProcess, metric
from tests.server.serverkit import REPO, free_port, python_cmd, wait_until
from tests.server.test_redis_e2e import OwnRedis, _pings, own_redis  # noqa: F401 (a fixture)

NO_PERSISTENCE = "a Redis restart loses every queued and running job"


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test with no persistence at all (neither AOF nor snapshots)."""
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp_path),
            "--appendonly",
            "no",
            "--save",
            "",
            "--protected-mode",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _pings(url), timeout=10)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_classify() -> None:
    assert classify({"appendonly": "yes", "save": ""}, None).mode == "aof"
    assert classify({"appendonly": "no", "save": "3600 1 300 100"}, None).mode == "rdb"
    assert classify({"appendonly": b"no", "save": b""}, None).mode == "none"
    assert classify(None, {"aof_enabled": 1}).mode == "aof"  # CONFIG refused (managed Redis): INFO tells AOF
    assert classify(None, {"aof_enabled": 0}).mode == "unknown"
    assert classify(None, None).mode == "unknown"
    assert classify({"appendonly": "yes"}, None).durable and not classify({"appendonly": "no"}, None).durable


def test_api_and_worker_warn_when_redis_has_no_persistence(volatile_redis: str, tmp_path: Path) -> None:
    api = ApiProcess(volatile_redis, "irgdur", tmp_path / "api.log").start()
    try:
        with api.client() as c:
            page = c.get("/metrics").text
        assert metric(page, "irg_redis_durable") == 0
        assert metric(page, 'irg_redis_persistence{mode="none"}') == 1
        assert metric(page, 'irg_redis_persistence{mode="aof"}') == 0
    finally:
        api.stop()
    assert (
        f"WARNING server.queue.durability api: Redis has no persistence: {NO_PERSISTENCE}"
        in (tmp_path / "api.log").read_text()
    )
    # a worker says it before it loads its model (here one that does not exist, so it stops right after)
    worker = subprocess.run(
        python_cmd("worker", "--redis", volatile_redis, "--model-dir", str(tmp_path / "none")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"worker: Redis has no persistence: {NO_PERSISTENCE}" in worker.stderr, worker.stderr[-2000:]


def test_no_warning_with_appendonly(own_redis: OwnRedis, tmp_path: Path) -> None:  # noqa: F811
    api = ApiProcess(own_redis.url, "irgdur", tmp_path / "api.log").start()
    try:
        with api.client() as c:
            page = c.get("/metrics").text
        assert metric(page, "irg_redis_durable") == 1 and metric(page, 'irg_redis_persistence{mode="aof"}') == 1
    finally:
        api.stop()
    log = (tmp_path / "api.log").read_text()
    assert "api: redis persistence: aof (appendonly yes)" in log and "WARNING server.queue.durability" not in log
