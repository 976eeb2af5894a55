"""`irg generate`, `irg bench` and `irg weights init-demo` as a user runs them."""

from __future__ import annotations

import contextlib
import io
import json
import logging
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


def irg_here(*args: str) -> subprocess.CompletedProcess[str]:
    """`irg ARGS` run by `server.cli.main` in this process, its output captured: for lists of refused inputs,
    where one case per list goes through a real process and the rest need no interpreter start-up each. An
    unexpected exception propagates (where the real command would print a traceback)."""
    from server.cli import main

    weights_log = logging.getLogger("weights")
    saved = (weights_log.handlers[:], weights_log.level, weights_log.propagate)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        weights_log.handlers[:], weights_log.level, weights_log.propagate = saved
    return subprocess.CompletedProcess(["irg", *args], code, out.getvalue(), err.getvalue())


def test_golden_acceptance_check_passes(irg_on_path: dict[str, str], golden_dir: Path) -> None:
    """shared/checks/golden_check.py: irg generate with the case's parameters vs the official numbers."""
    p = subprocess.run(
        [sys.executable, str(SHARED / "checks" / "golden_check.py"), str(golden_dir)],
        env=irg_on_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all stages within tolerance" in p.stdout


def test_generate_writes_images_record_and_tensors(irg_on_path, demo_dir: Path, tmp_path: Path) -> None:
    guidance = tmp_path / "g.json"
    guidance.write_text(json.dumps({"rounds": [{"text_scale": 3.0}, {"image_scale": 1.5, "renorm": "channel"}]}))
    out = tmp_path / "out"
    p = irg(
        irg_on_path,
        "generate",
        "Ein Fuchs im Schnee, 狐狸",
        "--model-dir",
        str(demo_dir),
        "--width",
        "96",
        "--height",
        "64",
        "--steps",
        "4",
        "--seed",
        "5",
        "--max-think-tokens",
        "5",
        "--guidance",
        str(guidance),
        "--out",
        str(out),
        "--save-tensors",
        "--quiet",
    )
    assert p.returncode == 0, p.stderr
    record = json.loads((out / "trajectory.json").read_text())
    assert record["seed"] == 5 and [r["round"] for r in record["rounds"]] == [1, 2]
    assert record["rounds"][0]["guidance"]["text_scale"] == 3.0
    assert record["rounds"][1]["guidance"] == {
        "text_scale": 2.0,
        "image_scale": 1.5,
        "interval": [0.0, 1.0],
        "renorm": "channel",
        "renorm_min": 0.0,
        "timestep_shift": 3.0,
    }
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
        (
            ["generate", "x", "--model-dir", str(golden_dir / "model"), "--guidance", str(tmp_path / "none.json")],
            "--guidance",
        ),
    ]
    for i, (args, words) in enumerate(cases):
        p = irg(irg_on_path, *args) if i == 0 else irg_here(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and words in p.stderr, p.stderr


def test_bench_prints_a_stage_table(irg_on_path, golden_dir: Path, tmp_path: Path) -> None:
    p = irg(
        irg_on_path,
        "bench",
        "--model-dir",
        str(golden_dir / "model"),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "4",
        "--max-think-tokens",
        "8",
        "--json",
        str(tmp_path / "b.json"),
    )
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
    assert files == {
        "llm_config.json",
        "vit_config.json",
        "ae_config.json",
        "ema.safetensors",
        "ae.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "serving_defaults.json",
    }
    from irg_core.loader import load_model

    m = load_model(tmp_path / "demo", device="cpu")
    assert len(m.tokenizer) == 151665


def test_taylorseer_golden_mode_and_previews_from_the_command_line(
    irg_on_path, golden_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    """golden_modes_check.py direct_taylorseer (9 of 19 steps, as the official cache); --previews N files."""
    modes = golden_dir.parent / "tiny_bagel_modes"
    p = subprocess.run(
        [sys.executable, str(SHARED / "checks" / "golden_modes_check.py"), str(modes), "direct_taylorseer"],
        env=irg_on_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0 and "1 modes within tolerance" in p.stdout, p.stdout + p.stderr
    assert "model_evaluations=9" in p.stdout
    out = tmp_path / "out"
    p = irg(
        irg_on_path,
        "generate",
        "a fox",
        "--model-dir",
        str(demo_dir),
        "--mode",
        "direct",
        "--width",
        "128",
        "--height",
        "64",
        "--steps",
        "12",
        "--seed",
        "1",
        "--previews",
        "3",
        "--cache",
        "taylorseer",
        "--out",
        str(out),
        "--quiet",
    )
    assert p.returncode == 0, p.stderr
    files = sorted((out / "previews").iterdir())
    assert [f.name for f in files] == ["round-1-step-003.jpg", "round-1-step-006.jpg", "round-1-step-009.jpg"]
    assert all(Image.open(f).size == (128, 64) for f in files)
    record = json.loads((out / "trajectory.json").read_text())
    assert record["cache"]["method"] == "taylorseer" and record["previews"] == 3
    # 11 steps, CFG on (t > 0.4) at steps 0-8: cond calls 0-10 full at 0-4, 7, 10 (7 full, 4 forecast);
    # no_text calls 0-8 full at 0-4, 7 (6 full, 3 forecast)
    assert record["rounds"][0]["denoising"] == {
        "steps": 11,
        "model_evaluations": 7,
        "branch_evaluations": 13,
        "forecast_steps": 4,
        "forecast_branch_calls": 7,
    }
    for bad in (
        ["--previews", "-1"],
        ["--cache-options", '{"max_order": 2}'],
        ["--cache", "taylorseer", "--cache-options", "[1]"],
    ):
        p = irg(irg_on_path, "generate", "x", "--model-dir", str(demo_dir), "--out", str(tmp_path / "bad"), *bad)
        assert p.returncode != 0 and "Traceback" not in p.stderr and bad[0] in p.stderr, p.stderr
