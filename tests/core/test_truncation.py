"""A thought cut by max_think_tokens says so: on its `*.done` event and in the round's result."""

from __future__ import annotations

from pathlib import Path

import pytest

from irg_core.engine import Engine
from irg_core.loader import load_model
from irg_core.params import GenerationParams
from irg_core.trajectory import run_trajectory


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=16)


def small(**kw) -> GenerationParams:
    base = dict(prompt="A red apple on a wooden table.", width=32, height=32, steps=3, seed=3, temperature=0.0)
    return GenerationParams(**{**base, **kw})


def done_events(engine: Engine, params: GenerationParams) -> tuple[list[dict], list[bool]]:
    events: list = []
    result = run_trajectory(engine, params, on_event=events.append)
    done = [e.data for e in events if e.type.endswith(".done") and e.type != "image.done"]
    return done, [r.truncated for r in result.rounds]


def test_thought_at_the_limit_is_truncated(engine: Engine) -> None:
    done, rounds = done_events(engine, small(max_think_tokens=4))  # the tiny model never ends within 4 tokens
    assert [d["truncated"] for d in done] == [True, True] and rounds == [True, True]


def test_thought_that_ends_is_not_truncated(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Engine.run_decode

    def run_decode(self, steps):  # as if <|im_end|> had come after 3 tokens
        out = real(self, steps)
        return [
            (self.tok.special.eos, logits) if s.seq.step == 4 else (token, logits)
            for s, (token, logits) in zip(steps, out)
        ]

    monkeypatch.setattr(Engine, "run_decode", run_decode)
    done, rounds = done_events(engine, small(mode="think", max_think_tokens=5))
    assert [d["truncated"] for d in done] == [False] and rounds == [False]


def test_benchmark_thoughts_are_not_reported_cut(engine: Engine) -> None:
    events: list = []
    run_trajectory(engine, small(mode="think", max_think_tokens=4), on_event=events.append, fixed_thoughts=True)
    assert [e.data["truncated"] for e in events if e.type == "thinking.done"] == [False]
