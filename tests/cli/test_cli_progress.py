"""What a newcomer sees while commands run: the demo checkpoint being created, `irg generate`'s bars counting
tokens to 100 %, `irg bench` saying what it does as it goes, packaged configs found from any directory."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from irg_core.params import EngineEvent
from server.cli.common import packaged_configs, read_config
from server.cli.errors import CommandError
from server.cli.generate import Progress
from tests.conftest import REPO


def test_thinking_bar_counts_tokens_and_ends_at_100(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress = Progress(True, max_tokens=50)
    # 7 tokens in 3 pieces (a piece may span tokens), then the thought ends on its own before the limit
    for text, tokens in (("A", 2), (" red", 5), (" fox", 7)):
        progress(EngineEvent("thinking.delta", {"round": 1, "text": text, "tokens": tokens}))
    assert progress.bar.n == 7
    progress(EngineEvent("thinking.done", {"round": 1, "text": "A red fox", "tokens": 7}))
    for step in (1, 2, 3):
        progress(EngineEvent("image.progress", {"round": 1, "step": step, "steps": 3}))
    progress(EngineEvent("image.done", {"round": 1, "kind": "draft"}))
    bars = err.getvalue().replace("\r", "\n")
    assert "thinking 1: 100%" in bars and "7/7" in bars and "image 1: 100%" in bars and "3/3" in bars


def test_packaged_configs_resolve_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert {"dummy_medium", "bagel_7b_mot"} <= set(packaged_configs())
    for value in ("dummy_medium", "dummy_medium.json", "irg_core/data/dummy_medium.json"):
        config, where = read_config(Path(value))
        assert where == "irg_core/data/dummy_medium.json" and {"llm", "vit", "vae"} <= set(config)
    own = tmp_path / "mine.json"
    own.write_text((REPO / "irg_core" / "data" / "dummy_medium.json").read_text())
    assert read_config(own)[1] == str(own)
    with pytest.raises(CommandError, match=r"no such file, nor a packaged config \(packaged: bagel_7b_mot"):
        read_config(Path("dummy_huge"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CommandError, match="not a readable JSON config"):
        read_config(tmp_path / "broken.json")


def test_generate_logs_the_demo_checkpoint_and_fills_its_bars(tmp_path: Path) -> None:
    env = {"IRG_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "generate",
            "a fox",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "3",
            "--max-think-tokens",
            "6",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stderr.replace("\r", "\n").splitlines()
    assert (
        lines[0] == f"irg: creating the demo checkpoint in {tmp_path / 'home' / 'demo-v1'} (first use only: "
        "a tiny BAGEL with random weights)"
    )
    assert re.match(r"irg: demo checkpoint ready in .* \(\d+\.\d s\)$", lines[1])
    for stage in ("thinking 1", "reflection 2", "image 1", "image 2"):
        assert any(line.startswith(f"{stage}: 100%") for line in lines), (stage, p.stderr)


def test_bench_says_what_it_does_as_it_goes(tmp_path: Path, golden_dir: Path) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "bench",
            "--model-dir",
            str(golden_dir / "model"),
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "4",
            "--max-think-tokens",
            "4",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stderr is not None
    first = p.stderr.readline()  # arrives while the command still runs
    assert first == "irg bench: loading the model\n" and p.poll() is None
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    for line in (
        "irg bench: warm-up run",
        "irg bench: run 1/1: irg, 32x32, 4 steps",
        "irg bench: run 1/1: thinking 1 done (4 tokens)",
        "irg bench: run 1/1: image 2 done (final)",
    ):
        assert line in err, (line, err)
    assert "total" in out and "run 1/1" not in out  # progress on stderr, the table on stdout
