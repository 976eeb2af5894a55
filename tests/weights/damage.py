"""Damaged copies of a model directory, and running the `irg` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]


def run_irg(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


RENAMED = (
    "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight",
    "language_model.model.layers.0.self_attn.q_proj.gen.weight",
)
RESHAPED = "latent_pos_embed.pos_embed"  # [4096, 64]: saved as if max_latent_size were 32 (BAGEL's class default)
AS_F32 = "vae2llm.weight"
AS_I32 = "connector.fc1.bias"


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def rename_tensor(model: Path, old: str = RENAMED[0], new: str = RENAMED[1]) -> None:
    edit_tensors(model / "ema.safetensors", lambda t: t.__setitem__(new, t.pop(old)))


def reshape_tensor(model: Path, name: str = RESHAPED) -> None:
    edit_tensors(model / "ema.safetensors", lambda t: t.__setitem__(name, t[name][:1024].clone()))


def retype_tensor(model: Path, name: str, dtype: torch.dtype) -> None:
    edit_tensors(model / "ema.safetensors", lambda t: t.__setitem__(name, t[name].to(dtype)))


def truncate(path: Path, keep: float = 0.5) -> None:
    with path.open("r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text("utf-8"))
    edit(data)
    path.write_text(json.dumps(data), "utf-8")


def drop_special_token(model: Path, content: str) -> None:
    edit_json(
        model / "tokenizer.json",
        lambda t: t.__setitem__("added_tokens", [a for a in t["added_tokens"] if a["content"] != content]),
    )
