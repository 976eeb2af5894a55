"""The golden model directory and writable copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def golden_model(golden_dir: Path) -> Path:
    return golden_dir / "model"


@pytest.fixture
def model_copy(golden_model: Path, tmp_path: Path) -> Path:
    """A writable copy of the golden model directory (the original is read-only)."""
    return Path(shutil.copytree(golden_model, tmp_path / "model", copy_function=shutil.copyfile))
