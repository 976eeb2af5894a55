"""`irg serve` and `irg worker` as commands (subprocesses, as a user runs them)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.server.serverkit import (
    IRG_ORDER,
    REDIS_URL,
    REPO,
    collapse,
    free_port,
    python_cmd,
    read_stream,
    wait_until,
)


def test_serve_runs_the_whole_flow_on_the_demo_model(demo_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, IRG_HOME=str(tmp_path), IRG_MODEL_DIR=str(demo_dir))
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        python_cmd("serve", "--port", str(port), "--device", "cpu"),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            first = wait_until(lambda: _get(c, "/readyz"), timeout=20)  # the API answers before the model is in
            assert first.status_code in (200, 503)
            wait_until(lambda: _get(c, "/readyz") and c.get("/readyz").status_code == 200, timeout=60)
            assert c.get("/healthz").json() == {"status": "ok"}
            events = read_stream(
                c,
                "POST",
                "/v1/generations",
                json={
                    "prompt": "a red fox",
                    "width": 64,
                    "height": 64,
                    "steps": 4,
                    "thinking": {"max_tokens": 8},
                    "stream": True,
                },
            )
            assert collapse([e["event"] for e in events]) == IRG_ORDER
            assert events[-1]["data"]["status"] == "succeeded"
            metrics = c.get("/metrics").text
            for name in (
                "irg_jobs_total{",
                "irg_queue_depth",
                "irg_queue_wait_seconds_bucket",
                'irg_stage_seconds_count{round="1",stage="thinking"}',
                'stage="reflection"',
                'stage="image"',
                'stage="total"',
                "irg_decode_tokens_per_second_count",
                "irg_denoise_steps_per_second_count",
                "irg_workers_alive 1.0",
                "irg_workers_busy",
            ):
                assert name in metrics, name
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful shutdown
        assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _get(client: httpx.Client, path: str) -> httpx.Response | None:
    try:
        return client.get(path)
    except httpx.TransportError:
        return None


def test_serve_with_a_bad_model_dir_exits_with_the_reason(tmp_path: Path) -> None:
    out = subprocess.run(
        python_cmd("serve", "--port", str(free_port()), "--model-dir", str(tmp_path / "nope")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "could not load the model" in out.stderr and "nope" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker"], "--redis URL"),
        (["worker", "--redis", "redis://127.0.0.1:1/0"], "unreachable"),
        (["serve", "--redis", REDIS_URL, "--model-dir", "/x"], "irg worker"),
    ],
)
def test_commands_refuse_what_cannot_work(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRG_")}
    out = subprocess.run(python_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.parametrize(("backend", "extra"), [("flash", ".[flash]"), ("xformers", ".[xformers]")])
def test_an_attention_backend_without_its_package_fails_at_start_naming_the_extra(
    backend: str, extra: str, tmp_path: Path
) -> None:
    for command in (["serve", "--port", str(free_port())], ["worker", "--redis", REDIS_URL]):
        p = subprocess.run(
            python_cmd(*command, "--attention", backend, "--device", "cpu"),
            cwd=REPO,
            env=dict(os.environ, IRG_HOME=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2, (command, p.stderr[-2000:])
        assert f"pip install {extra}" in p.stderr and "Traceback" not in p.stderr
