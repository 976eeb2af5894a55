"""Serving defaults: the recipes' values per mode, a checkpoint's own file over them, and how they resolve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from irg_core.defaults import RECIPE, SERVING_DEFAULTS_FILE, DefaultsError, load_serving_defaults, recipe_defaults
from irg_core.params import GenerationParams, ParamError


def test_recipe_per_mode() -> None:
    irg, think, direct = (recipe_defaults(m) for m in ("irg", "think", "direct"))
    # IRG script: do_sample=True, temperature=0.3, max_length=4096 (the start token counts: 4095 generated)
    assert (irg.temperature, irg.max_think_tokens) == (0.3, 4095)
    # BAGEL inferencer: do_sample=False, max_think_token_n=1000 (999 generated)
    assert (think.temperature, think.max_think_tokens) == (0.0, 999)
    assert (direct.temperature, direct.max_think_tokens) == (0.0, 999)
    assert {(d.width, d.height, d.steps) for d in (irg, think, direct)} == {(1024, 1024, 50)}


def test_generation_params_resolve_thought_knobs_per_mode() -> None:
    irg = GenerationParams("a fox").resolved()
    assert (irg.temperature, irg.max_think_tokens) == (0.3, 4095)
    think = GenerationParams("a fox", mode="think").resolved()
    assert (think.temperature, think.max_think_tokens) == (0.0, 999)
    given = GenerationParams("a fox", temperature=0.0, max_think_tokens=12).resolved()
    assert (given.temperature, given.max_think_tokens) == (0.0, 12)
    assert given.resolved() == given
    with pytest.raises(ParamError, match="max_think_tokens"):
        GenerationParams("a fox").validate()  # unresolved: no silent None
    with pytest.raises(ParamError, match="temperature"):
        GenerationParams("a fox", max_think_tokens=8).validate()


def test_checkpoint_file_over_recipe(tmp_path: Path) -> None:
    (tmp_path / SERVING_DEFAULTS_FILE).write_text(
        json.dumps({"width": 256, "height": 128, "steps": 20, "modes": {"irg": {"max_think_tokens": 64}}}), "utf-8"
    )
    d = load_serving_defaults(tmp_path)
    assert d.source.endswith(SERVING_DEFAULTS_FILE)
    irg, think = d.for_mode("irg"), d.for_mode("think")
    assert (irg.width, irg.height, irg.steps, irg.max_think_tokens, irg.temperature) == (256, 128, 20, 64, 0.3)
    assert (think.width, think.steps, think.max_think_tokens, think.temperature) == (256, 20, 999, 0.0)


def test_real_layout_checkpoint_without_file_gets_recipe(golden_dir: Path) -> None:
    assert not (golden_dir / "model" / SERVING_DEFAULTS_FILE).exists()
    assert load_serving_defaults(golden_dir / "model") == RECIPE
    assert load_serving_defaults(None) == RECIPE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not readable JSON"),
        ("[1]", "must be a JSON object"),
        ('{"widht": 256}', "unknown key(s) widht"),
        ('{"width": 250}', "width: must be a multiple of 16"),
        ('{"steps": 1}', "steps: must be an integer within [2, 200]"),
        ('{"steps": 20.0}', "steps: must be an integer"),
        ('{"temperature": -1}', "temperature: must be a number within [0, 10]"),
        ('{"modes": {"fast": {}}}', "unknown mode(s) fast"),
        ('{"modes": {"irg": {"max_think_tokens": 5000}}}', "modes.irg.max_think_tokens"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / SERVING_DEFAULTS_FILE).write_text(content, "utf-8")
    with pytest.raises(DefaultsError) as info:
        load_serving_defaults(tmp_path)
    assert message in str(info.value) and SERVING_DEFAULTS_FILE in str(info.value)


def test_demo_checkpoint_carries_its_defaults(demo_dir: Path) -> None:
    from server.defaults import demo_defaults, serving_defaults
    from weights.demo import DEMO_SERVING_DEFAULTS

    on_disk = load_serving_defaults(demo_dir)
    assert on_disk.modes == demo_defaults().modes == serving_defaults(None).modes
    irg = on_disk.for_mode("irg")
    assert (irg.width, irg.steps, irg.max_think_tokens) == (
        DEMO_SERVING_DEFAULTS["width"],
        DEMO_SERVING_DEFAULTS["steps"],
        DEMO_SERVING_DEFAULTS["max_think_tokens"],
    )
    assert irg.temperature == 0.3  # not named by the demo: the recipe's
    assert serving_defaults(None, dummy=True) == RECIPE
