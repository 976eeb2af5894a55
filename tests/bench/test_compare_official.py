"""benchmarks/compare_official.py: ours beside the official run, stage by stage, only at the same shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import SHARED

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "compare_official.py"
OFFICIAL = SHARED / "bench" / "official_h200.json"


def ours(mode: str, tokens: int, stages: list[tuple[str, int, float]]) -> dict:
    return {
        "params": {"mode": mode, "width": 1024, "height": 1024, "steps": 50, "max_think_tokens": tokens},
        "stages": [{"stage": s, "round": r, "seconds": t} for s, r, t in stages],
        "total_seconds": sum(t for _, _, t in stages),
        "peak_memory_bytes": 30 * 2**30,
    }


def run(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, paths)], capture_output=True, text=True)


def test_stage_table_and_targets(tmp_path: Path) -> None:
    irg = ours(
        "irg",
        256,
        [("prefill", 0, 0.1), ("thinking", 1, 2.0), ("image", 1, 8.0), ("decode", 1, 0.1), ("reencode", 1, 0.4)]
        + [("reflection", 2, 2.0), ("image", 2, 14.0), ("decode", 2, 0.1)],
    )
    direct = ours("direct", 1024, [("prefill", 0, 0.1), ("image", 1, 7.5), ("decode", 1, 0.1)])
    (tmp_path / "irg.json").write_text(json.dumps(irg))
    (tmp_path / "direct.json").write_text(json.dumps(direct))
    p = run(OFFICIAL, tmp_path / "irg.json", tmp_path / "direct.json")
    assert p.returncode == 0, p.stderr
    official = json.loads(OFFICIAL.read_text())["headline"]["irg/none"][0]
    line = next(x for x in p.stdout.splitlines() if x.startswith("image 2 (denoising)"))
    assert line.split()[-1] == f"{official['image2_denoise_s'] / 14.0:.2f}x"
    assert "IRG total: 26.7 s (target <= 28 s)" in p.stdout
    assert "one image: 7.7 s (target <= 8 s)" in p.stdout
    assert "% of the measured bf16 matmul ceiling" in p.stdout and "peak memory: 30.0 GiB" in p.stdout


def test_different_shapes_are_refused(tmp_path: Path) -> None:
    small = ours("irg", 64, [("image", 1, 1.0)])
    small["params"]["width"] = 512
    (tmp_path / "irg.json").write_text(json.dumps(small))
    p = run(OFFICIAL, tmp_path / "irg.json")
    assert p.returncode == 1
    assert "width: official 1024, ours 512" in p.stderr and "thought tokens: official 256, ours 64" in p.stderr
