"""`irg generate INSTRUCTION --image IN.png` and `irg understand`, as a user and the acceptance check run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.cli.test_generate import irg, irg_here, irg_on_path  # noqa: F401  (the fixture)
from tests.conftest import SHARED

MODES = SHARED / "golden" / "tiny_bagel_modes"


def test_golden_modes_check_passes_for_edit_and_understanding(irg_on_path) -> None:  # noqa: F811
    """shared/checks/golden_modes_check.py through `irg generate --image` and `irg understand`."""
    p = subprocess.run(
        [
            sys.executable,
            str(SHARED / "checks" / "golden_modes_check.py"),
            str(MODES),
            "edit_think",
            "understand_think",
        ],
        env=irg_on_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 modes within tolerance" in p.stdout


def test_edit_refuses_a_size_and_bad_images(irg_on_path, golden_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    model = str(golden_dir / "model")
    gif = tmp_path / "in.gif"
    Image.new("RGB", (64, 64)).save(gif)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((MODES / "input.png").read_bytes()[:200])
    cases = [
        (["generate", "x", "--image", str(MODES / "input.png"), "--width", "512"], "size follows the input"),
        (["generate", "x", "--image", str(gif)], "GIF"),
        (["generate", "x", "--image", str(truncated)], "truncated"),
        (["generate", "x", "--image", str(tmp_path / "none.png")], "cannot read"),
        (["understand", "What?", "--image", str(gif)], "GIF"),
        (["understand", "What?", "--image", str(MODES / "input.png"), "--max-tokens", "0"], "max_tokens"),
    ]
    for i, (args, words) in enumerate(cases):
        run = (lambda *a: irg(irg_on_path, *a)) if i == 0 else irg_here
        p = run(*args, "--model-dir", model, "--out", str(tmp_path / "out"))
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and words in p.stderr, p.stderr


def test_understand_writes_the_answer(irg_on_path, golden_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    p = irg(
        irg_on_path,
        "understand",
        "Describe both.",
        "--image",
        str(MODES / "input.png"),
        "--image",
        str(MODES / "input.png"),
        "--model-dir",
        str(golden_dir / "model"),
        "--max-tokens",
        "4",
        "--out",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    record = json.loads((out / "answer.json").read_text())
    assert len(record["token_ids"]) == 4 and isinstance(record["text"], str)
    assert record["text"] in p.stdout
    assert not (out / "logits0.safetensors").exists()
