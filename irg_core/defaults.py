"""Serving defaults per mode: the official recipes' values, and the ones a checkpoint may carry.

Pure Python (no torch): the HTTP API resolves a request's defaults with this module before any model is
loaded. Two layers, the later winning:

1. the recipe (`irg_core/data/recipe_defaults.json`, sources in `irg_core/data/SOURCES.md`): irg samples
   its thoughts at temperature 0.3 with up to 4095 generated tokens (the IRG script); think and direct are
   greedy with BAGEL's own limit of 999 (`max_think_token_n=1000` counts the start token); 1024 x 1024 and
   50 timesteps everywhere;
2. the checkpoint's `serving_defaults.json` (optional, in the model directory): top-level keys apply to
   every mode, `"modes": {"irg": {...}}` to one. The demo checkpoint writes one (small images, few steps)
   so that a prompt-only request answers in seconds on a CPU; a real checkpoint has none and gets the recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

MODES: tuple[str, ...] = ("irg", "think", "direct")
SERVING_DEFAULTS_FILE = "serving_defaults.json"
_LIMITS = {"width": (16, 1024), "height": (16, 1024), "steps": (2, 200), "max_think_tokens": (1, 4096)}


class DefaultsError(ValueError):
    """A serving-defaults file is unreadable or holds a bad value; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class ModeDefaults:
    """What a request of one mode gets for the knobs it leaves out."""

    width: int
    height: int
    steps: int
    max_think_tokens: int
    temperature: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KEYS: tuple[str, ...] = tuple(f.name for f in fields(ModeDefaults))


def _check(name: str, value: Any, where: str) -> int | float:
    if name == "temperature":
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not 0.0 <= value <= 10.0
        ):
            raise DefaultsError(f"{where}.temperature: must be a number within [0, 10], got {value!r}")
        return float(value)
    lo, hi = _LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DefaultsError(f"{where}.{name}: must be an integer within [{lo}, {hi}], got {value!r}")
    if name in ("width", "height") and value % 16:
        raise DefaultsError(f"{where}.{name}: must be a multiple of 16, got {value}")
    return value


def _overrides(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise DefaultsError(f"{where}: must be a JSON object")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise DefaultsError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})")
    return {k: _check(k, v, where) for k, v in data.items()}


@dataclass(frozen=True, slots=True)
class ServingDefaults:
    """Defaults per mode, and where they come from (`source`: 'recipe' or the file read)."""

    modes: dict[str, ModeDefaults]
    source: str = "recipe"

    def for_mode(self, mode: str) -> ModeDefaults:
        return self.modes[mode]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "modes": {m: d.to_dict() for m, d in self.modes.items()}}

    def with_overrides(self, data: Any, where: str) -> ServingDefaults:
        """These defaults with a serving-defaults document (as read from JSON) applied over them."""
        if not isinstance(data, dict):
            raise DefaultsError(f"{where}: must be a JSON object")
        per_mode = data.get("modes", {})
        common = _overrides({k: v for k, v in data.items() if k != "modes"}, where)
        if not isinstance(per_mode, dict):
            raise DefaultsError(f"{where}.modes: must be an object keyed by mode")
        unknown = sorted(set(per_mode) - set(MODES))
        if unknown:
            raise DefaultsError(f"{where}.modes: unknown mode(s) {', '.join(unknown)} (known: {', '.join(MODES)})")
        out = {}
        for mode, base in self.modes.items():
            own = _overrides(per_mode.get(mode, {}), f"{where}.modes.{mode}")
            out[mode] = replace(base, **{**common, **own})
        return ServingDefaults(out, where)


def _recipe() -> ServingDefaults:
    data = json.loads(resources.files("irg_core.data").joinpath("recipe_defaults.json").read_text("utf-8"))
    return ServingDefaults({m: ModeDefaults(**_overrides(data[m], f"recipe_defaults.json.{m}")) for m in MODES})


RECIPE = _recipe()


def recipe_defaults(mode: str) -> ModeDefaults:
    """The official recipe's defaults of `mode`."""
    return RECIPE.for_mode(mode)


def load_serving_defaults(model_dir: str | Path | None) -> ServingDefaults:
    """The defaults of the checkpoint in `model_dir`: its `serving_defaults.json` over the recipe, or the
    recipe alone when it has none (or no directory is given). A bad file raises DefaultsError."""
    if model_dir is None:
        return RECIPE
    path = Path(model_dir) / SERVING_DEFAULTS_FILE
    if not path.is_file():
        return RECIPE
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DefaultsError(f"{path}: not readable JSON ({e})") from e
    return RECIPE.with_overrides(data, str(path))
