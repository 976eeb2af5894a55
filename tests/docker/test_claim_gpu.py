"""docker/claim_gpu.py: each worker container of `--scale worker=N` gets a GPU no other worker holds."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docker.files import REPO

SCRIPT = REPO / "docker" / "claim_gpu.py"
_spec = importlib.util.spec_from_file_location("claim_gpu", SCRIPT)
claim_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claim_gpu)

PRINT_GPU = [sys.executable, "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'none'))"]


def test_visible_gpus_from_device_nodes(tmp_path: Path) -> None:
    for name in ("nvidia0", "nvidia1", "nvidia7", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "null"):
        (tmp_path / name).touch()
    assert claim_gpu.visible_gpus({}, dev=tmp_path) == ["0", "1", "2"]  # CUDA indices, not device minors
    assert claim_gpu.visible_gpus({"IRG_GPUS": "2, 3"}, dev=tmp_path) == ["2", "3"]
    assert claim_gpu.visible_gpus({}, dev=tmp_path / "empty") == []


def test_claims_are_exclusive_until_released(tmp_path: Path) -> None:
    first = claim_gpu.claim(["0", "1"], tmp_path)
    second = claim_gpu.claim(["0", "1"], tmp_path)
    assert first[0] == "0" and second[0] == "1"
    assert claim_gpu.claim(["0", "1"], tmp_path) is None
    os.close(first[1])
    again = claim_gpu.claim(["0", "1"], tmp_path)
    assert again[0] == "0"
    for _, fd in (second, again):
        os.close(fd)


def environ(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}, **extra}


def run(env: dict[str, str], argv: list[str] = PRINT_GPU) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60, env=environ(**env)
    )


def test_worker_processes_hold_their_gpu(tmp_path: Path) -> None:
    """A running worker keeps its lock through exec; the next container gets the next GPU; one too many fails."""
    env = {"IRG_GPUS": "0,1", "IRG_GPU_LOCK_DIR": str(tmp_path / "locks")}
    holder = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            sys.executable,
            "-c",
            "import os, sys, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ(**env),
    )
    try:
        assert holder.stdout.readline().strip() == "0"
        r = run(env)
        assert r.returncode == 0 and r.stdout.strip() == "1"  # GPU 0 is held; 1 is free again after r exits
        assert "runs on GPU 1 of 2" in r.stderr
        second = subprocess.Popen(
            [sys.executable, str(SCRIPT), sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ(**env),
        )
        try:
            _wait_for_lock(tmp_path / "locks" / "gpu-1.lock")
            r = run(env)
            assert r.returncode == 1 and r.stdout == ""
            assert r.stderr.strip() == (
                f"irg-claim-gpu: error: all 2 GPUs of this machine are held by other "
                f"workers (locks in {tmp_path / 'locks'}); run at most 2 workers here"
            )
        finally:
            second.communicate("", timeout=30)
    finally:
        holder.communicate("", timeout=30)
    assert run(env).stdout.strip() == "0"  # both exited: their locks went with them


def _wait_for_lock(path: Path, timeout: float = 30) -> None:
    """Until another process holds the lock on `path` (the file itself outlives earlier holders)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            with path.open("rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return
                fcntl.flock(f, fcntl.LOCK_UN)
        time.sleep(0.05)
    raise AssertionError(f"nobody locked {path}")


def test_preset_device_is_respected(tmp_path: Path) -> None:
    r = run({"CUDA_VISIBLE_DEVICES": "3", "IRG_GPUS": "0", "IRG_GPU_LOCK_DIR": str(tmp_path)})
    assert r.stdout.strip() == "3" and r.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_no_gpu_runs_anyway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = []
    monkeypatch.setattr(claim_gpu, "visible_gpus", lambda env: [])
    monkeypatch.setattr(claim_gpu.os, "execvpe", lambda file, argv, env: ran.append((argv, env)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("IRG_GPU_LOCK_DIR", str(tmp_path))
    claim_gpu.main(["irg", "worker"])
    [(argv, env)] = ran
    assert argv == ["irg", "worker"] and "CUDA_VISIBLE_DEVICES" not in env
    assert "no GPU is visible in this container; running without one" in capsys.readouterr().err


def test_usage_and_unknown_command(tmp_path: Path) -> None:
    r = run({}, argv=[])
    assert r.returncode == 2 and r.stderr.startswith("usage: irg-claim-gpu COMMAND")
    r = run({"CUDA_VISIBLE_DEVICES": "0"}, argv=["no-such-command-here"])
    assert r.returncode == 127
    assert r.stderr.strip() == "irg-claim-gpu: error: cannot run no-such-command-here: No such file or directory"
