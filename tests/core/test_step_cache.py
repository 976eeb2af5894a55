"""TaylorSeer step caching against the official numbers of shared/golden/tiny_bagel_modes (`direct_taylorseer`).

Schedule and counts are exact (they depend on no value); the forecast itself is checked through the velocities
and final latent the official code produced (tolerances of the golden README: latent <= 5 %, and nearer the
cached official run than the cache-off one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from irg_core.engine import Branches, Engine
from irg_core.kv_cache import EMPTY
from irg_core.loader import load_model
from irg_core.params import GenerationParams, ParamError, RoundGuidance, StepCacheParams
from irg_core.step_cache import StepCounter, TaylorSeer, TaylorSeerBranch, new_step_cache
from irg_core.trajectory import run_trajectory


@pytest.fixture(scope="module")
def modes_dir(golden_dir: Path) -> Path:
    d = golden_dir.parent / "tiny_bagel_modes"
    if not (d / "golden.safetensors").is_file():
        pytest.fail(f"the golden modes are missing at {d}")
    return d


@pytest.fixture(scope="module")
def golden(modes_dir: Path) -> dict:
    return json.loads((modes_dir / "golden.json").read_text())["modes"]["direct_taylorseer"]


@pytest.fixture(scope="module")
def G(modes_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(modes_dir / "golden.safetensors"))


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_schedule_and_orders_match_the_official_replay(golden: dict) -> None:
    b = TaylorSeerBranch(StepCacheParams())
    for entry in golden["schedule"]:
        want = entry["cond"]
        assert b.call == want["branch_call"]
        if b.should_compute():
            assert want["type"] == "full", entry["step"]
            b.update(torch.full((2, 3), float(b.call)))
            assert len(b.factors) == want["n_factors_stored"], entry["step"]
        else:
            assert want["type"] == "forecast", entry["step"]
            assert b.order == want["taylor_order"] and b.call - b.last_full == want["x"]
            b.forecast()
    assert (b.full_calls, b.forecast_calls) == (9, 10)


def test_forecast_is_the_official_taylor_formula() -> None:
    """Factors by the official recursion (divided by the latest distance only), forecast sum F_i x^i / i!."""
    b = TaylorSeerBranch(StepCacheParams(first_enhance=2, fresh_threshold=3, max_order=2))
    h = {k: torch.tensor([float(k) ** 3]) for k in range(8)}
    b.update(h[0])  # call 0: full, no derivative (k <= first_enhance - 2)
    b.update(h[1])  # call 1: F1 = h1 - h0
    assert torch.allclose(b.factors[1], h[1] - h[0])
    assert b.should_compute() is False
    f2 = b.forecast()  # call 2: x = 1
    assert torch.allclose(f2, h[1] + (h[1] - h[0]))
    b.forecast()
    assert b.should_compute()  # call 4 - last full 1 == fresh_threshold
    b.update(h[4])
    d1 = (h[4] - h[1]) / 3
    assert torch.allclose(b.factors[1], d1) and torch.allclose(b.factors[2], (d1 - (h[1] - h[0])) / 3)
    x = 2
    b.forecast()  # call 5: x = 1
    assert torch.allclose(b.forecast(), h[4] + d1 * x + b.factors[2] * x * x / 2)  # call 6: x = 2


def test_counter_counts_every_branch_call() -> None:
    c = StepCounter()
    assert c.plan(["cond", "no_text"]) == [True, True]
    assert c.plan(["cond"]) == [True]
    assert c.counts() == {
        "model_evaluations": 2,
        "branch_evaluations": 3,
        "forecast_steps": 0,
        "forecast_branch_calls": 0,
    }
    assert isinstance(new_step_cache(None), StepCounter) and not new_step_cache(None).forecasts
    assert isinstance(new_step_cache(StepCacheParams()), TaylorSeer)


def test_cache_params_are_validated() -> None:
    assert StepCacheParams.from_dict({"method": "taylorseer"}) == StepCacheParams()
    with pytest.raises(ParamError, match="cache.method"):
        StepCacheParams.from_dict({"method": "fora"})
    with pytest.raises(ParamError, match="cache.fresh_ratio"):
        StepCacheParams.from_dict({"method": "taylorseer", "fresh_ratio": 0.1})
    with pytest.raises(ParamError, match="cache.max_order"):
        StepCacheParams.from_dict({"method": "taylorseer", "max_order": -1})
    with pytest.raises(ParamError, match="cache.fresh_threshold"):
        GenerationParams("x", cache=StepCacheParams(fresh_threshold=0)).resolved()


def _direct_branches(engine: Engine, golden_modes: dict, G) -> Branches:
    ids = golden_modes["direct"]["contexts_at_gen_image"]["cond"]["segments"][0]["ids"]
    engine.reset_pool(600, 8)
    cond = engine.prefill_text(EMPTY, ids)
    return Branches(cond, EMPTY, cond)


def test_direct_taylorseer_reproduces_the_official_cached_run(engine: Engine, modes_dir: Path, G) -> None:
    modes = json.loads((modes_dir / "golden.json").read_text())["modes"]
    hyper = modes["direct_taylorseer"]["generate_image"]
    g = RoundGuidance(
        hyper["cfg_text_scale"],
        hyper["cfg_img_scale"],
        tuple(hyper["cfg_interval"]),
        hyper["cfg_renorm_type"],
        hyper["cfg_renorm_min"],
        hyper["timestep_shift"],
    )
    branches = _direct_branches(engine, modes, G)
    noise = G["direct_taylorseer.init_noise"]
    vts: list[torch.Tensor] = []
    cache = TaylorSeer(StepCacheParams())
    latent = engine.generate_image(
        branches,
        128,
        128,
        20,
        g,
        noise,
        cache=cache,
        observe=lambda name, i, t: vts.append(t.clone()) if name == "v_t" else None,
    )
    assert cache.counts() == {
        "model_evaluations": 9,
        "branch_evaluations": 17,
        "forecast_steps": 10,
        "forecast_branch_calls": 18,
    }
    assert rel(torch.stack(vts), G["direct_taylorseer.v_t"]) < 0.05
    on, off = rel(latent, G["direct_taylorseer.final_latent"]), rel(latent, G["direct_ts_exact.final_latent"])
    assert on < 0.02 and on < off
    # exact, counted: bit for bit the uncached path
    plain = engine.generate_image(branches, 128, 128, 20, g, noise)
    counter = StepCounter()
    counted = engine.generate_image(branches, 128, 128, 20, g, noise, cache=counter)
    assert torch.equal(plain, counted)
    assert counter.counts()["model_evaluations"] == 19 and counter.counts()["branch_evaluations"] == 35
    assert rel(plain, G["direct_ts_exact.final_latent"]) < 0.02


@pytest.mark.parametrize("mode", ["direct", "think", "irg"])
def test_every_mode_runs_with_the_cache_and_reports_counts(engine: Engine, mode: str) -> None:
    steps = 12
    p = GenerationParams(
        "a red fox",
        mode=mode,
        rounds=2,
        width=64,
        height=64,
        steps=steps,
        seed=3,
        max_think_tokens=4,
        cache=StepCacheParams(),
    )
    result = run_trajectory(engine, p)
    images = [s for s in result.stages if s.stage == "image"]
    assert len(images) == (2 if mode == "irg" else 1)
    for s in images:
        # 11 calls: full at 0-4, 7, 10; forecast at 5, 6, 8, 9
        assert (s.steps, s.model_evaluations, s.forecast_steps) == (11, 7, 4)
        assert s.branch_evaluations > 0 and s.forecast_branch_calls > 0
    exact = run_trajectory(
        engine,
        GenerationParams(
            "a red fox", mode=mode, rounds=2, width=64, height=64, steps=steps, seed=3, max_think_tokens=4
        ),
    )
    assert all(s.model_evaluations == 11 and s.forecast_steps == 0 for s in exact.stages if s.stage == "image")
