"""A server with IRG_MAX_ACTIVE=4 on the golden model runs four IRG jobs at once, each with the result it gets
alone."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from irg_core.params import GenerationParams
from irg_core.trajectory import run_trajectory
from tests.server.serverkit import read_stream


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_four_irg_jobs_run_concurrently_and_match_their_solo_results(serve: Any, golden_dir: Path) -> None:
    from irg_core.engine import Engine
    from irg_core.loader import load_model
    from server.runner import EngineRunner

    engine = Engine(load_model(golden_dir / "model", "cpu"), page_size=16)
    runner = EngineRunner(engine, model="golden-a")
    server = serve(use_runner=runner, max_active=4)
    bodies = [
        {
            "prompt": f"A lighthouse number {i}",
            "mode": "irg",
            "width": 64,
            "height": 64,
            "steps": 4,
            "seed": 10 + i,
            "thinking": {"max_tokens": 6, "temperature": 0.0},
        }
        for i in range(4)
    ]
    with server.client() as c:
        answers = [c.post("/v1/generations", json=b) for b in bodies]
        assert all(a.status_code in (200, 201, 202) for a in answers), answers[0].text
        ids = [a.json()["id"] for a in answers]
        streams = [read_stream(c, "GET", f"/v1/generations/{i}/events") for i in ids]
        finals = [c.get(f"/v1/generations/{i}/images/final").content for i in ids]
        readyz = c.get("/readyz").json()
        records = [c.get(f"/v1/generations/{i}").json() for i in ids]
    assert all(st[-1]["event"] == "completed" for st in streams)
    # every job started before any job completed
    assert max(r["started_at"] for r in records) < min(r["finished_at"] for r in records), records
    for body, final in zip(bodies, finals):
        params = GenerationParams(
            **{k: v for k, v in body.items() if k != "thinking"}, max_think_tokens=6, temperature=0.0
        )
        alone = run_trajectory(engine, params)
        assert np.abs(_png(final) - alone.rounds[-1].image.astype(int)).max() <= 1
    assert readyz["free_capacity"] == 4 and readyz["capacity"][0]["capacity"] == 4
