"""Helpers of the operations tests: an API process (`irg serve --redis`) whose memory can be read, and
reading its Prometheus metrics."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.server.serverkit import REPO, free_port, python_cmd, wait_until


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (from /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024  # type: ignore[union-attr]


def connections(port: int) -> int:
    """Established TCP connections whose local port is `port` (the server's side of its clients)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        n += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return n


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text page."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not in the metrics"
    return float(found.group(1))


class ApiProcess:
    """`irg serve --redis URL` in its own process, on a free port, logging to a file."""

    def __init__(self, redis_url: str, prefix: str, log: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = dict(os.environ, IRG_REDIS_PREFIX=prefix, **env)
        self.cmd = python_cmd("serve", "--redis", redis_url, "--port", str(self.port), "--no-access-log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiProcess:
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        wait_until(self._answers, timeout=30)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)
