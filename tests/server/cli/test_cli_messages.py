"""Command-line failures are one line naming the problem: a bad IRG_ variable (not pydantic's traceback with
internal field names), a flag out of range, a port already taken (and no "serving on" before it is bound)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from server.settings import SettingsError, load_settings
from tests.server.serverkit import REPO, free_port, python_cmd, wait_until


def irg(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IRG_")}
    return subprocess.run(
        python_cmd(*args), cwd=REPO, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        (("serve",), {"IRG_PORT": "eighty"}, "IRG_PORT='eighty': Input should be a valid integer"),
        (("serve",), {"IRG_MAX_SIDE": "1000"}, "IRG_MAX_SIDE='1000': Input should be a multiple of 16"),
        (("serve",), {"IRG_API_KEYS": "short-secret"}, "IRG_API_KEYS: every API key needs at least 16 characters"),
        (("serve", "--port", "70000"), {}, "--port 70000: Input should be less than or equal to 65535"),
        (
            ("worker", "--redis", "redis://127.0.0.1:1/0"),
            {"IRG_HEARTBEAT_S": "-1"},
            "IRG_HEARTBEAT_S='-1': Input should be greater than 0",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(
    command: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    p = irg(*command, env=env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"irg {command[0]}: error: invalid setting: {expected}"), p.stderr
    assert "short-secret" not in p.stderr  # secrets are named, never echoed
    assert "Traceback" not in p.stderr and "pydantic" not in p.stderr


def test_settings_error_names_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRG_REDIS_URL", "redis://:hunter2@host")
    monkeypatch.setenv("IRG_QUEUE_MAX", "0")
    monkeypatch.setenv("IRG_SSE_PING_S", "soon")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value) == (
        "invalid setting: IRG_QUEUE_MAX='0': Input should be greater than or equal to 1; "
        "IRG_SSE_PING_S='soon': Input should be a valid number, unable to parse string as a number"
    )


def test_a_taken_port_fails_cleanly_before_serving_on(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = irg("serve", "--port", str(port), env={"IRG_HOME": str(tmp_path)})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"irg serve: error: cannot listen on 127.0.0.1:{port}: Address "
        "already in use (another server runs there: stop it or choose --port)"
    )
    assert "serving on" not in p.stderr + p.stdout and "Traceback" not in p.stderr


def test_serving_on_names_the_bound_port(tmp_path: Path) -> None:
    """`--port 0` takes any free port; the log line says which, and the server answers there."""
    proc = subprocess.Popen(
        python_cmd("serve", "--port", "0", "--redis", f"redis://127.0.0.1:{free_port()}/0"),
        cwd=REPO,
        env=dict(os.environ, IRG_HOME=str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = next(line for line in proc.stdout if "serving on" in line)
        url = line.split("serving on ")[1].split()[0]
        assert not url.endswith(":0")
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, timeout=20)
    finally:
        proc.terminate()
        proc.wait(20)
