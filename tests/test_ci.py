"""`.ci/run` lints with the pinned ruff before it runs the tests."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_ci_lints_before_the_tests() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text("utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    check, fmt, tests = (
        lines.index(c) for c in ("ruff check .", "ruff format --check .", "bash docs/commands/test.sh")
    )
    assert check < fmt < tests
    pin = re.search(r'"(ruff==[^"]+)"', (REPO / "pyproject.toml").read_text("utf-8"))
    assert pin is not None
    install = next(i for i, line in enumerate(lines) if "pip install" in line and "ruff==" in line)
    assert install < check
