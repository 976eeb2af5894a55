"""TaylorSeer step caching for the denoising loop, as the official BAGEL code does it (opt-in).

Source: ByteDance-Seed/Bagel @ 056b5fd5 (PR 232), `modeling/cache_utils/taylorseer.py` (`cache_init`,
`cal_type`, `force_scheduler`, `derivative_approximation`, `taylor_formula`) driven from
`modeling/bagel/qwen2_navit.py` (`Qwen2Model.forward_inference`, `Qwen2MoTDecoderLayer.forward_inference`).

What it does, per CFG branch (cond, no_text, no_img), each with its own call counter k = 0, 1, ...:
- call k is **full** if k < first_enhance, or if the fresh_threshold - 1 calls since the last full one were
  forecasts; every other call is a **forecast**;
- a full call runs the model and keeps its output h_k as Taylor factor F_0; from call first_enhance - 1 on,
  F_(i+1) = (F_i(new) - F_i(old)) / (k - k_prev) for i < max_order (k_prev = the previous full call);
- a forecast call runs no layer and returns sum_i F_i * x^i / i! with x = k - k_last_full (in calls, not in t).

The official code forecasts every decoder layer's output; on a forecast call every layer is forecast and a
forecasting layer ignores its input, so only the last layer's forecast reaches the output: forecasting the
last layer's output (the pre-final-norm hidden states) is the same computation. We keep only the latent rows
(the final norm is row-wise and the velocity head reads latent rows only).

The state is per request and per image round (the official `generate_image` calls `cache_init` per image and
never resets it afterwards; here a fresh `TaylorSeer` is made for every round). Pure tensor code, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from irg_core.params import StepCacheParams


@dataclass(slots=True)
class TaylorSeerBranch:
    """One CFG branch's call counter and Taylor factors."""

    params: StepCacheParams
    call: int = 0  # index of the next call of this branch
    last_full: int | None = None
    factors: list[Tensor] = field(default_factory=list)
    full_calls: int = 0
    forecast_calls: int = 0

    def should_compute(self) -> bool:
        """Is the next call a full one (`cal_type` with taylor_cache=True, fresh_ratio=0)?"""
        if self.call < self.params.first_enhance or self.last_full is None:
            return True
        return self.call - self.last_full >= self.params.fresh_threshold

    def update(self, hidden: Tensor) -> None:
        """Record a full call's output (`derivative_approximation`) and advance the counter."""
        p = self.params
        new = [hidden]
        if self.last_full is not None and self.call > p.first_enhance - 2:
            distance = self.call - self.last_full
            for i in range(min(p.max_order, len(self.factors))):
                new.append((new[i] - self.factors[i]) / distance)
        self.factors = new
        self.last_full = self.call
        self.full_calls += 1
        self.call += 1

    def forecast(self) -> Tensor:
        """The Taylor forecast of this call's output (`taylor_formula`) and advance the counter."""
        if not self.factors or self.last_full is None:
            raise RuntimeError("TaylorSeer: a forecast before any full call")
        x = self.call - self.last_full
        out: Tensor | float = 0
        for i, f in enumerate(self.factors):
            out = out + (1 / math.factorial(i)) * f * (x**i)
        self.forecast_calls += 1
        self.call += 1
        assert isinstance(out, Tensor)
        return out

    @property
    def order(self) -> int:
        """The Taylor order a forecast would use now."""
        return max(0, len(self.factors) - 1)


class StepCounter:
    """Counts one image round's model evaluations; as such (no forecasts) it is the exact, uncached run."""

    forecasts = False

    def __init__(self) -> None:
        self.model_steps = 0  # denoising steps at which at least one branch ran the model
        self.forecast_steps = 0  # denoising steps at which every branch was forecast
        self.branch_full: dict[str, int] = {}
        self.branch_forecast: dict[str, int] = {}

    def plan(self, names: list[str]) -> list[bool]:
        """Which of this step's evaluated branches run the model (True) or are forecast (False)."""
        full = self._decide(names)
        for name, f in zip(names, full):
            counter = self.branch_full if f else self.branch_forecast
            counter[name] = counter.get(name, 0) + 1
        if any(full):
            self.model_steps += 1
        else:
            self.forecast_steps += 1
        return full

    def _decide(self, names: list[str]) -> list[bool]:
        return [True] * len(names)

    def counts(self) -> dict[str, int]:
        """Per round: steps / branch passes the model ran, and those forecast (JSON-ready)."""
        return {
            "model_evaluations": self.model_steps,
            "branch_evaluations": sum(self.branch_full.values()),
            "forecast_steps": self.forecast_steps,
            "forecast_branch_calls": sum(self.branch_forecast.values()),
        }


class TaylorSeer(StepCounter):
    """The step cache of one image round: a `TaylorSeerBranch` per CFG branch plus per-step counts.

    Use: `full = cache.plan(names)` once per step, then for each branch either run the model and
    `cache.branch(name).update(hidden)` or take `cache.branch(name).forecast()`."""

    forecasts = True

    def __init__(self, params: StepCacheParams):
        super().__init__()
        if params.method != "taylorseer":
            raise ValueError(f"unknown step cache method {params.method!r}")
        self.params = params
        self.branches: dict[str, TaylorSeerBranch] = {}

    def branch(self, name: str) -> TaylorSeerBranch:
        if name not in self.branches:
            self.branches[name] = TaylorSeerBranch(self.params)
        return self.branches[name]

    def _decide(self, names: list[str]) -> list[bool]:
        return [self.branch(n).should_compute() for n in names]


def new_step_cache(params: StepCacheParams | None) -> StepCounter:
    """A fresh per-round cache for a request's `cache` parameters (None: exact, counting only)."""
    return StepCounter() if params is None else TaylorSeer(params)
