"""Which serving defaults the API resolves requests with (no torch: read before any model is loaded).

The API process learns the model's defaults from the model directory it is configured with, the same one
the workers load (`--model-dir` / `IRG_MODEL_DIR`): only `serving_defaults.json` is read there, so an API
replica in front of Redis needs that small file, not the weights. No model directory means the embedded
demo checkpoint for `irg serve` alone (its defaults are a constant of `weights.demo`), and the recipe for an
API replica in front of Redis. See docs/server.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

from irg_core.defaults import RECIPE, ServingDefaults, load_serving_defaults

log = logging.getLogger(__name__)


def demo_defaults() -> ServingDefaults:
    from weights.demo import DEMO_SERVING_DEFAULTS

    return RECIPE.with_overrides(DEMO_SERVING_DEFAULTS, "demo checkpoint")


def serving_defaults(
    model_dir: str | Path | None, dummy: bool = False, demo_when_unset: bool = True
) -> ServingDefaults:
    """The defaults of the model the server runs: the directory's `serving_defaults.json` over the recipe
    (raises DefaultsError if bad); the recipe's for dummy weights; without a directory, the demo's where the
    process runs the demo itself (`demo_when_unset`), else the recipe's (an API replica in front of Redis that
    was not told the workers' model directory assumes a real checkpoint)."""
    if dummy:
        return RECIPE
    if model_dir is None:
        return demo_defaults() if demo_when_unset else RECIPE
    if not Path(model_dir).is_dir():
        log.warning("model directory %s is not here: requests get the recipe's defaults", model_dir)
        return RECIPE
    return load_serving_defaults(model_dir)
