"""Request defaults follow the mode and the model: the recipe on a real-layout checkpoint, the demo's own
small ones on the demo; the resolved values are in the job's params, and `GET /v1/defaults` tells them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.main import create_app
from server.queue.memory import MemoryQueue
from server.settings import Settings


def client(settings: Settings, **update: object) -> TestClient:
    s = settings.model_copy(update=update)
    return TestClient(create_app(s, MemoryQueue(s)))


def test_prompt_only_on_a_real_layout_checkpoint(settings: Settings, golden_dir: Path) -> None:
    with client(settings, model_dir=golden_dir / "model") as c:  # a BAGEL layout without serving_defaults.json
        irg = c.post("/v1/generations", json={"prompt": "a fox"})
        assert irg.status_code == 202
        p = irg.json()["params"]
        assert p["thinking"] == {"max_tokens": 4095, "temperature": 0.3}
        assert (p["mode"], p["width"], p["height"], p["steps"]) == ("irg", 1024, 1024, 50)
        for mode in ("think", "direct"):
            p = c.post("/v1/generations", json={"prompt": "a fox", "mode": mode}).json()["params"]
            assert p["thinking"] == {"max_tokens": 999, "temperature": 0.0}, mode
        given = c.post("/v1/generations", json={"prompt": "a fox", "thinking": {"temperature": 0}}).json()
        assert given["params"]["thinking"] == {"max_tokens": 4095, "temperature": 0.0}
        assert c.get(f"/v1/generations/{irg.json()['id']}").json()["params"]["thinking"]["temperature"] == 0.3
        d = c.get("/v1/defaults").json()
        assert d["source"] == "recipe" and d["modes"]["irg"]["max_think_tokens"] == 4095


def test_demo_defaults_and_deployment_caps(settings: Settings) -> None:
    with client(settings) as c:  # no model directory: the embedded demo checkpoint
        p = c.post("/v1/generations", json={"prompt": "a fox"}).json()["params"]
        assert (p["width"], p["height"], p["steps"]) == (256, 256, 20)
        assert p["thinking"] == {"max_tokens": 256, "temperature": 0.3}
        assert c.get("/v1/defaults").json()["modes"]["think"] == {
            "width": 256,
            "height": 256,
            "steps": 20,
            "max_think_tokens": 256,
            "temperature": 0.0,
        }
    with client(settings, max_side=128, max_think_tokens=100) as c:
        p = c.post("/v1/generations", json={"prompt": "a fox"}).json()["params"]
        assert (p["width"], p["thinking"]["max_tokens"]) == (128, 100)
        assert c.get("/v1/defaults").json()["modes"]["irg"]["width"] == 128


def test_api_replica_in_front_of_redis(settings: Settings, golden_dir: Path) -> None:
    from server.defaults import serving_defaults

    redis = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})  # never contacted here
    app = create_app(redis, MemoryQueue(settings))  # no model directory: it cannot know the workers' model
    assert app.state.serving_defaults == serving_defaults(golden_dir / "model")  # the recipe's
    assert app.state.serving_defaults.for_mode("irg").max_think_tokens == 4095


def test_bad_serving_defaults_file_stops_the_app(settings: Settings, tmp_path: Path) -> None:
    from irg_core.defaults import DefaultsError

    (tmp_path / "serving_defaults.json").write_text('{"steps": 0}', "utf-8")
    with pytest.raises(DefaultsError, match="steps"):
        create_app(settings.model_copy(update={"model_dir": tmp_path}), MemoryQueue(settings))
