"""The normal loader on the damaged copies `irg weights verify` is tested on: one clear error, no deep traceback."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from irg_core.errors import ModelError
from irg_core.loader import load_model
from tests.weights import damage

DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "renamed": (damage.rename_tensor, f"missing tensor {damage.RENAMED[0]}"),
    "wrong shape": (damage.reshape_tensor, f"tensor {damage.RESHAPED} has shape [1024, 64], expected [4096, 64]"),
    "integer dtype": (
        lambda m: damage.retype_tensor(m, damage.AS_I32, torch.int32),
        f"tensor {damage.AS_I32} has dtype I32",
    ),
    "missing config": (lambda m: (m / "vit_config.json").unlink(), "vit_config.json: missing from"),
    "truncated": (lambda m: damage.truncate(m / "ema.safetensors"), "ema.safetensors: truncated"),
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_load_model_names_the_problem(model_copy: Path, kind: str) -> None:
    apply, message = DAMAGES[kind]
    apply(model_copy)
    with pytest.raises(ModelError, match=re.escape(message)):
        load_model(model_copy, device="cpu")


def test_renamed_tensor_names_both_sides(model_copy: Path) -> None:
    damage.rename_tensor(model_copy)
    with pytest.raises(ModelError) as e:
        load_model(model_copy, device="cpu")
    assert str(e.value) == (
        f"ema.safetensors: missing tensor {damage.RENAMED[0]} (expected shape [64, 64]); "
        f"ema.safetensors: unexpected tensor {damage.RENAMED[1]} (shape [64, 64])"
    )


def test_float_tensor_of_another_dtype_still_loads(model_copy: Path) -> None:
    """verify flags a mixed-dtype file, but the loader casts every tensor to the model dtype, so it works."""
    damage.retype_tensor(model_copy, damage.AS_F32, torch.float32)
    loaded = load_model(model_copy, device="cpu", dtype=torch.bfloat16)
    assert loaded.model.vae2llm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["truncated", "wrong shape"])
def test_generate_prints_one_line(model_copy: Path, kind: str) -> None:
    DAMAGES[kind][0](model_copy)
    r = damage.run_irg(
        "generate", "a red fox", "--model-dir", str(model_copy), "--steps", "2", "--out", str(model_copy / "out")
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("irg generate: error: ema.safetensors: ")
    assert DAMAGES[kind][1] in line
