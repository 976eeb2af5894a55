"""A cancel reaches a job between two stages of its VAE decode or re-encode: it stops within a second and
nothing is published after `cancelled`."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from tests.server.serverkit import sse_events


@pytest.mark.parametrize("when", ["decode", "reencode"])
def test_cancel_during_the_vae_stops_within_a_second(serve: Any, when: str) -> None:
    server = serve()
    body = {
        "prompt": "A lighthouse on a cliff",
        "mode": "irg",
        "width": 512,
        "height": 512,
        "steps": 3,
        "thinking": {"max_tokens": 4, "temperature": 0.0},
        "previews": 0,
    }
    with server.client() as c:
        job = c.post("/v1/generations", json=body).json()["id"]
        events: list[tuple[float, str, dict]] = []
        sent: dict[str, float] = {}
        with c.stream("GET", f"/v1/generations/{job}/events") as r:
            for e in sse_events(r.iter_lines()):
                data = json.loads(e["data"])
                events.append((time.monotonic(), e["event"], data))
                last_denoise = e["event"] == "image.progress" and data["round"] == 1 and data["step"] == data["steps"]
                first_draft = e["event"] == "image.done" and data["round"] == 1
                if not sent and ((when == "decode" and last_denoise) or (when == "reencode" and first_draft)):
                    sent["at"] = time.monotonic()  # the VAE decode (or the draft's re-encode) starts now
                    threading.Thread(target=lambda: c.delete(f"/v1/generations/{job}"), daemon=True).start()
                if e["event"] in ("completed", "failed", "cancelled"):
                    break
    kinds = [k for _, k, _ in events]
    assert kinds[-1] == "cancelled", kinds
    assert events[-1][0] - sent["at"] < 1.0, events[-1][0] - sent["at"]
    assert "reflection.delta" not in kinds and "reflection.done" not in kinds  # it stopped before round 2
