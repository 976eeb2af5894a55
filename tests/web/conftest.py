"""Fixtures of the browser test: a real `irg serve` on the demo model (a subprocess on a free port) and a
real headless Chromium driven by Selenium. Neither is faked, and neither is skipped: a browser that does not
start fails the test with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.server.serverkit import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "web"
READY_TIMEOUT_S = 180  # first start writes the demo checkpoint, loads it and warms up, on a busy 2-core box
API_KEY = "web-test-key-0123456789abcdef"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    key: str | None = None

    def request(
        self, method: str, path: str, body: dict | None = None, headers: dict | None = None, timeout: float = 30
    ) -> tuple[int, bytes, dict]:
        """One HTTP request (with the server's API key, if any): status, body bytes, headers."""
        data = json.dumps(body).encode() if body is not None else None
        h = {"Content-Type": "application/json", **(headers or {})}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        status, raw, _ = self.request(method, path, body)
        assert status < 300, f"{method} {path}: HTTP {status} {raw[:500]!r}"
        return json.loads(raw)

    def events(self, job_id: str) -> list[tuple[str, str, dict]]:
        """The job's whole event stream, read fresh from the start: (id, event, data) per event."""
        status, raw, _ = self.request("GET", f"/v1/generations/{job_id}/events", timeout=60)
        assert status == 200, f"events of {job_id}: HTTP {status}"
        out = []
        for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
            fields: dict[str, list[str]] = {}
            for line in block.split("\n"):
                if line and not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
            if "data" in fields:
                out.append((fields["id"][0], fields["event"][0], json.loads("\n".join(fields["data"]))))
        return out

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def start_server(home: Path, name: str, **settings: str) -> Server:
    """`python -m server.cli serve` on the demo model with IRG_* `settings`, once /readyz answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRG_")}  # nothing leaks in from the shell
    env.update({"IRG_HOME": str(home), "PYTHONPATH": str(ROOT), **{f"IRG_{k.upper()}": v for k, v in settings.items()}})
    log = home / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--no-access-log"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log, settings.get("api_keys"))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`irg serve` exited with {proc.returncode} before it was ready:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return server
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    stop_server(server)
    pytest.fail(f"`irg serve` was not ready within {READY_TIMEOUT_S} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def irg_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("irg-home")  # the demo checkpoint is written here once


@pytest.fixture(scope="module")
def server(irg_home: Path) -> Iterator[Server]:
    """The server as `irg serve` runs it, one job at a time with a one-job queue, so that a full queue is quick to
    reach (a worker claims up to IRG_MAX_ACTIVE jobs, which would empty the queue)."""
    s = start_server(irg_home, "server", queue_max="1", retry_after_s="3", max_active="1")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def keyed_server(irg_home: Path) -> Iterator[Server]:
    """A server with API keys on, whose jobs fail (timeout) after 10 s (the small jobs take a second or two)."""
    s = start_server(irg_home, "keyed-server", api_keys=API_KEY, job_timeout_s="10")
    yield s
    stop_server(s)


def _which(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((p for p in (shutil.which(n) for n in names) if p), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = _which("IRG_TEST_CHROMIUM", "chromium", "chromium-browser")
    driver_path = _which("IRG_TEST_CHROMEDRIVER", "chromedriver")
    if not chromium or not driver_path:
        pytest.fail(
            "the browser test needs Debian's `chromium` and `chromium-driver` packages "
            f"(found chromium={chromium}, chromedriver={driver_path})",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    except Exception as e:  # any failure to start is the test's failure, with its reason
        pytest.fail(f"headless Chromium did not start ({chromium}, {driver_path}): {e}", pytrace=False)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
