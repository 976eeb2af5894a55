"""The golden model directory and writable copies of it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """`../shared` beside the checkout (CI), or IRG_SHARED_DIR; a git worktree one level deeper also works."""
    candidates = [Path(os.environ["IRG_SHARED_DIR"])] if os.environ.get("IRG_SHARED_DIR") else []
    candidates += [REPO.parent / "shared", REPO.parents[1] / "shared"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


@pytest.fixture(scope="session")
def golden_model() -> Path:
    path = shared_dir() / "golden" / "tiny_bagel_a" / "model"
    if not (path / "ema.safetensors").is_file():
        pytest.fail(f"the golden model directory is missing at {path} (set IRG_SHARED_DIR to the shared folder)")
    return path


@pytest.fixture
def model_copy(golden_model: Path, tmp_path: Path) -> Path:
    """A writable copy of the golden model directory (the original is read-only)."""
    return Path(shutil.copytree(golden_model, tmp_path / "model", copy_function=shutil.copyfile))
