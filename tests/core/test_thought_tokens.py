"""Thought events count tokens: each `*.delta` says how many tokens of its thought are decoded so far (a piece
of text may span several), and `*.done` the thought's length, so progress can be shown in tokens."""

from __future__ import annotations

from pathlib import Path

from irg_core.engine import Engine
from irg_core.loader import load_model
from irg_core.params import GenerationParams
from irg_core.trajectory import run_trajectory


def test_deltas_and_done_carry_token_counts(golden_dir: Path) -> None:
    engine = Engine(load_model(golden_dir / "model", device="cpu"), page_size=16)
    params = GenerationParams(
        prompt="A red apple on a wooden table.", width=32, height=32, steps=3, seed=7, max_think_tokens=9
    )
    events = []
    result = run_trajectory(engine, params, on_event=events.append)
    for kind, k in (("thinking", 1), ("reflection", 2)):
        counts = [e.data["tokens"] for e in events if e.type == f"{kind}.delta"]
        done = next(e for e in events if e.type == f"{kind}.done")
        length = len(result.rounds[k - 1].token_ids)
        assert counts == sorted(counts) and counts[-1] <= length and done.data["tokens"] == length
        assert 0 < length <= 9
