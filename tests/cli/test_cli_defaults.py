"""`irg generate` / `irg bench` take what the command line leaves out from the model's serving defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import build_parser
from server.cli.errors import CommandError
from server.cli.generate import params_from_args


def params(*argv: str):
    return params_from_args(build_parser().parse_args(["generate", "a fox", *argv]))


def test_real_layout_checkpoint_gets_the_recipe(golden_dir: Path) -> None:
    model = str(golden_dir / "model")
    p = params("--model-dir", model)
    assert (p.temperature, p.max_think_tokens, p.width, p.height, p.steps) == (0.3, 4095, 1024, 1024, 50)
    for mode in ("think", "direct"):
        p = params("--model-dir", model, "--mode", mode)
        assert (p.temperature, p.max_think_tokens) == (0.0, 999)
    p = params("--model-dir", model, "--temperature", "0", "--max-think-tokens", "11", "--width", "128")
    assert (p.temperature, p.max_think_tokens, p.width, p.height) == (0.0, 11, 128, 1024)


def test_demo_and_dummy_defaults(demo_dir: Path) -> None:
    p = params("--model-dir", str(demo_dir))
    assert (p.width, p.steps, p.max_think_tokens, p.temperature) == (256, 20, 256, 0.3)
    p = params("--dummy-weights", "irg_core/data/dummy_medium.json")
    assert (p.width, p.steps, p.max_think_tokens) == (1024, 50, 4095)


def test_bad_serving_defaults_is_a_command_error(tmp_path: Path) -> None:
    (tmp_path / "serving_defaults.json").write_text(json.dumps({"width": 100}), "utf-8")
    with pytest.raises(CommandError, match="width: must be a multiple of 16"):
        params("--model-dir", str(tmp_path))
