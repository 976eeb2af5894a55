"""benchmarks/gpu_decode.py, the decode part of gpu_check.sh, runs its whole flow on the CPU (eager only) before
it ever meets a GPU: a mistake in it would cost a device call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu_decode import main
from tests.conftest import REPO


def test_gpu_decode_flow_on_the_cpu(golden_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.chdir(REPO)
    args = [str(golden_dir), "--device", "cpu", "--full", "irg_core/data/dummy_medium.json"]
    assert main([*args, "--tokens", "2", "--context", "16", "--kv-gb", "0.02"]) == 0
    record = json.loads((tmp_path / "decode.json").read_text())
    assert record["graph_equals_eager"] is True and record["graphs_captured"] == 0
    assert record["config"] == "dummy_medium.json"
    assert record["decode_ms_batch1_eager"] > 0 and record["decode_ms_batch8_eager"] > 0
    assert record["batch8_speedup_eager"] > 0 and "decode_ms_batch1_graph" not in record
