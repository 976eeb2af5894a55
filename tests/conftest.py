"""Fixtures shared by every test package: where the goldens are, the demo checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    """IRG_SHARED_DIR, else `../shared` beside the checkout (CI); a git worktree one level deeper also works."""
    candidates = [Path(os.environ["IRG_SHARED_DIR"])] if os.environ.get("IRG_SHARED_DIR") else []
    candidates += [REPO.parent / "shared", REPO.parents[1] / "shared"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED = _shared_dir()
GOLDEN = SHARED / "golden" / "tiny_bagel_a"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "golden.safetensors").is_file():
        pytest.fail(f"the golden checkpoint is missing at {GOLDEN} (set IRG_SHARED_DIR to the shared folder)")
    return GOLDEN


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint, written once per test session into a temporary directory."""
    from weights.demo import init_demo

    return init_demo(tmp_path_factory.mktemp("demo") / "demo")
