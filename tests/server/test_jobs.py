"""Requests -> resolved parameters (defaults from irg_core.params), records, image names."""

from __future__ import annotations

import pytest

from irg_core.params import FIRST_ROUND, LATER_ROUND, GenerationParams
from server.jobs import JobRecord, RequestError, build_params, generation_params, image_name, image_round, new_job
from server.schemas import GenerateRequest
from server.settings import Settings


def resolve(settings: Settings, **request: object) -> dict:
    req = GenerateRequest(prompt="a fox", **request)  # type: ignore[arg-type]
    return build_params(req, req.prompt, req.width, req.height, settings)


def test_defaults_come_from_irg_core(settings: Settings) -> None:
    p = resolve(settings)
    core = GenerationParams(prompt="a fox").resolved()
    assert (p["mode"], p["rounds"], p["width"], p["height"], p["steps"]) == (
        core.mode,
        core.rounds,
        core.width,
        core.height,
        core.steps,
    )
    assert p["thinking"] == {"max_tokens": core.max_think_tokens, "temperature": core.temperature}
    assert p["guidance"][0]["text_scale"] == FIRST_ROUND.text_scale == 4.0
    assert p["guidance"][0]["interval"] == [0.4, 1.0] and p["guidance"][0]["renorm"] == "global"
    assert p["guidance"][1]["image_scale"] == LATER_ROUND.image_scale == 2.0
    assert p["guidance"][1]["renorm"] == "text_channel" and 0 <= p["seed"] < 2**31


def test_partial_guidance_merges_with_round_defaults(settings: Settings) -> None:
    p = resolve(settings, rounds=3, guidance=[{}, {"text_scale": 5.5}], seed=9)
    assert [g["text_scale"] for g in p["guidance"]] == [4.0, 5.5, 2.0]
    assert p["guidance"][1]["image_scale"] == 2.0 and p["seed"] == 9
    params = generation_params(p)
    assert params.rounds == 3 and params.guidance[1].text_scale == 5.5 and params.guidance[1].interval == (0.0, 1.0)
    assert params.resolved() == params


def test_modes_with_one_image(settings: Settings) -> None:
    for mode in ("think", "direct"):
        p = resolve(settings, mode=mode)
        assert p["rounds"] == 1 and len(p["guidance"]) == 1


def test_deployment_limits(settings: Settings) -> None:
    small = settings.model_copy(
        update={"max_side": 256, "max_steps": 20, "max_think_tokens": 64, "max_prompt_chars": 10}
    )
    capped = resolve(small)  # defaults left out are capped by this deployment's limits
    assert (capped["width"], capped["steps"], capped["thinking"]["max_tokens"]) == (256, 20, 64)
    for request, field in (
        ({"width": 512}, "width"),
        ({"steps": 30}, "steps"),
        ({"thinking": {"max_tokens": 100}}, "thinking.max_tokens"),
    ):
        with pytest.raises(RequestError) as info:
            resolve(small, **request)
        assert info.value.field == field
    with pytest.raises(RequestError, match="at most 10 characters"):
        build_params(GenerateRequest(prompt="x" * 11), "x" * 11, 64, 64, small)


def test_record_round_trips_through_fields(settings: Settings) -> None:
    job = new_job(resolve(settings), "owner", True)
    job.texts = [{"round": 1, "kind": "thinking", "text": "é ✓", "done": True}]
    back = JobRecord.from_fields({k.encode(): v.encode() for k, v in job.to_fields().items()})
    assert back == job


@pytest.mark.parametrize(
    ("rounds", "names"), [(2, ["draft", "final"]), (3, ["round-1", "round-2", "final"]), (1, ["final"])]
)
def test_image_names(rounds: int, names: list[str]) -> None:
    assert [image_name(k, rounds) for k in range(1, rounds + 1)] == names
    for k, name in enumerate(names, 1):
        assert image_round(name, rounds) == k and image_round(f"round-{k}", rounds) == k
    assert image_round("draft", 1) is None and image_round(f"round-{rounds + 1}", rounds) is None
    assert image_round("draft", 3) == 2 and image_round("../final", rounds) is None
