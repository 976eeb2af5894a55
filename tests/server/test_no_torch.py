"""The API never imports torch (R1): an API replica in front of Redis starts in about a second and stays light."""

from __future__ import annotations

import subprocess
import sys

from tests.server.serverkit import REPO

PROBE = """
import sys, time
t = time.perf_counter()
import server.api.main, server.cli, server.cli.serve, server.queue.redis, server.queue.memory, server.metrics
from server.api.main import create_app
from server.settings import Settings
create_app(Settings(redis_url="redis://127.0.0.1:6379/0"))
print(time.perf_counter() - t)
heavy = sorted(m for m in ("torch", "irg_core.engine", "irg_core.trajectory", "numpy") if m in sys.modules)
print(",".join(heavy))
"""


def test_api_modules_do_not_import_torch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    seconds, heavy = out.stdout.splitlines()
    assert heavy == "", f"the API imported {heavy}"
    assert float(seconds) < 3.0
