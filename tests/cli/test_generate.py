"""`irg generate`, `irg bench` and `irg weights init-demo` as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, SHARED


@pytest.fixture(scope="module")
def irg_on_path(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose `irg` runs this checkout's code (whatever is installed elsewhere)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "irg"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m server.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    return env


def irg(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["irg", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_golden_acceptance_check_passes(irg_on_path: dict[str, str], golden_dir: Path) -> None:
    """shared/checks/golden_check.py: irg generate with the case's parameters vs the official numbers."""
    p = subprocess.run([sys.executable, str(SHARED / "checks" / "golden_check.py"), str(golden_dir)],
                       env=irg_on_path, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all stages within tolerance" in p.stdout


def test_generate_writes_images_record_and_tensors(irg_on_path, demo_dir: Path, tmp_path: Path) -> None:
    guidance = tmp_path / "g.json"
    guidance.write_text(json.dumps({"rounds": [{"text_scale": 3.0}, {"image_scale": 1.5, "renorm": "channel"}]}))
    out = tmp_path / "out"
    p = irg(irg_on_path, "generate", "Ein Fuchs im Schnee, 狐狸", "--model-dir", str(demo_dir), "--width", "96",
            "--height", "64", "--steps", "4", "--seed", "5", "--max-think-tokens", "5", "--guidance", str(guidance),
            "--out", str(out), "--save-tensors", "--quiet")
    assert p.returncode == 0, p.stderr
    record = json.loads((out / "trajectory.json").read_text())
    assert record["seed"] == 5 and [r["round"] for r in record["rounds"]] == [1, 2]
    assert record["rounds"][0]["guidance"]["text_scale"] == 3.0
    assert record["rounds"][1]["guidance"] == {"text_scale": 2.0, "image_scale": 1.5, "interval": [0.0, 1.0],
                                               "renorm": "channel", "renorm_min": 0.0, "timestep_shift": 3.0}
    assert all(len(r["token_ids"]) <= 5 for r in record["rounds"])
    # a thought is cut exactly when it used the whole limit (the random demo model never ends one in 5 tokens)
    assert [r["truncated"] for r in record["rounds"]] == [len(r["token_ids"]) == 5 for r in record["rounds"]]
    assert record["temperature"] == 0.3  # irg's default: sampled thoughts
    assert {t["stage"] for t in record["timings"]} >= {"prefill", "thinking", "image", "reencode", "reflection"}
    for k in (1, 2):
        assert np.asarray(Image.open(out / f"round-{k}.png")).shape == (64, 96, 3)
    from safetensors.torch import load_file

    tensors = load_file(str(out / "tensors.safetensors"))
    assert tensors["round1.init_noise"].shape == (24, 64) and tensors["round2.final_latent"].shape == (24, 64)


def test_generate_errors_are_one_line(irg_on_path, golden_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(golden_dir / "model", broken)
    (broken / "llm_config.json").chmod(0o644)
    (broken / "llm_config.json").unlink()
    cases = [
        (["generate", "x", "--model-dir", str(broken)], "llm_config.json: missing"),
        (["generate", "x", "--model-dir", str(golden_dir / "model"), "--width", "100"], "width"),
        (["generate", "x", "--model-dir", str(tmp_path / "nowhere")], "does not exist"),
        (["generate", "x", "--model-dir", str(golden_dir / "model"), "--guidance", str(tmp_path / "none.json")],
         "--guidance"),
    ]
    for args, words in cases:
        p = irg(irg_on_path, *args)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and words in p.stderr, p.stderr


def test_bench_prints_a_stage_table(irg_on_path, golden_dir: Path, tmp_path: Path) -> None:
    p = irg(irg_on_path, "bench", "--model-dir", str(golden_dir / "model"), "--width", "64", "--height", "64",
            "--steps", "4", "--max-think-tokens", "8", "--json", str(tmp_path / "b.json"))
    assert p.returncode == 0, p.stderr
    for word in ("thinking", "reflection", "image", "reencode", "tok/s", "steps/s", "total"):
        assert word in p.stdout
    record = json.loads((tmp_path / "b.json").read_text())
    thinking = [s for s in record["stages"] if s["stage"] == "thinking"]
    assert thinking[0]["tokens"] == 8  # fixed thought length


def test_init_demo_writes_a_loadable_official_layout(irg_on_path, tmp_path: Path) -> None:
    p = irg(irg_on_path, "weights", "init-demo", str(tmp_path / "demo"))
    assert p.returncode == 0, p.stderr
    files = {f.name for f in (tmp_path / "demo").iterdir()}
    assert files == {"llm_config.json", "vit_config.json", "ae_config.json", "ema.safetensors", "ae.safetensors",
                     "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "serving_defaults.json"}
    from irg_core.loader import load_model

    m = load_model(tmp_path / "demo", device="cpu")
    assert len(m.tokenizer) == 151665
