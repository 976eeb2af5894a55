"""Bad input never gives a 5xx: each case answers 4xx with a JSON error naming the field, and queues nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.main import create_app
from server.queue.memory import MemoryQueue
from server.settings import Settings

GOOD = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    s = settings.model_copy(update={"max_body_bytes": 64 * 1024, "max_prompt_chars": 500})
    queue = MemoryQueue(s)
    with TestClient(create_app(s, queue)) as c:
        c.queue = queue  # type: ignore[attr-defined]
        yield c


def body(**changes: Any) -> dict[str, Any]:
    out = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


BAD_BODIES = [
    ("prompt", body(prompt=...)),
    ("prompt", body(prompt="")),
    ("prompt", body(prompt="   \n\t ")),
    ("prompt", body(prompt=42)),
    ("prompt", body(prompt="x" * 501)),
    ("steps", body(steps="4")),
    ("steps", body(steps=4.0)),
    ("steps", body(steps=True)),
    ("steps", body(steps=-3)),
    ("steps", body(steps=1)),
    ("steps", body(steps=10**30)),
    ("width", body(width=100)),
    ("width", body(width=0)),
    ("width", body(width=2048)),
    ("height", body(height=-16)),
    ("height", body(height="64")),
    ("mode", body(mode="dream")),
    ("rounds", body(rounds=1)),
    ("rounds", body(rounds=99)),
    ("rounds", body(mode="direct", rounds=3)),
    ("seed", body(seed=-1)),
    ("seed", body(seed=2**64)),
    ("seed", body(seed="7")),
    ("thinking.max_tokens", body(thinking={"max_tokens": 0})),
    ("thinking.max_tokens", body(thinking={"max_tokens": 10**9})),
    ("thinking.temperature", body(thinking={"temperature": -0.5})),
    ("thinking.bogus", body(thinking={"bogus": 1})),
    ("guidance[0].text_scale", body(guidance=[{"text_scale": 1000}])),
    ("guidance[0].text_scale", body(guidance=[{"text_scale": -1}])),
    ("guidance[0].interval", body(guidance=[{"interval": [0.9, 0.1]}])),
    ("guidance[0].interval", body(guidance=[{"interval": [0.1]}])),
    ("guidance[0].renorm", body(guidance=[{"renorm": "none"}])),
    ("guidance[1].timestep_shift", body(guidance=[{}, {"timestep_shift": 0}])),
    ("guidance", body(guidance=[{}, {}, {}])),
    ("guidance", body(guidance={"text_scale": 1})),
    ("unknown_field", body(unknown_field=1)),
    ("stream", body(stream="yes")),
]


@pytest.mark.parametrize(("field", "payload"), BAD_BODIES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_BODIES)])
def test_bad_fields_answer_422_naming_the_field(client: TestClient, field: str, payload: dict[str, Any]) -> None:
    r = client.post("/v1/generations", json=payload)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["code"] == "invalid_request"
    assert field.split(".")[0].split("[")[0] in error["message"]
    assert client.queue._jobs == {}  # type: ignore[attr-defined]


def test_range_is_named_in_the_message(client: TestClient) -> None:
    error = client.post("/v1/generations", json=body(width=2048)).json()["error"]
    assert "[16, 1024]" in error["message"] and "multiple of 16" in error["message"]
    error = client.post("/v1/generations", json=body(steps=500)).json()["error"]
    assert "[2, 200]" in error["message"]


@pytest.mark.parametrize(
    "text",
    [
        '{"prompt": NaN, "width": 64}',
        '{"prompt": "x", "steps": 4, "guidance": [{"text_scale": NaN}]}',
        '{"prompt": "x", "guidance": [{"image_scale": Infinity}]}',
        '{"prompt": "x", "thinking": {"temperature": -Infinity}}',
        '{"prompt": "x", "guidance": [{"text_scale": 1e400}]}',
    ],
)
def test_nan_and_inf_are_refused(client: TestClient, text: str) -> None:
    r = client.post("/v1/generations", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b'{"prompt": "a fox", ', "application/json"),
        (b"not json at all", "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b"null", "application/json"),
        (b'{"prompt": "\xff\xfe broken utf-8"}', "application/json"),
        (b"\xc3\x28", "application/json"),
        (b'{"prompt": "a fox"}', "text/plain"),
        (b"", "application/json"),
    ],
)
def test_broken_bodies_are_4xx(client: TestClient, content: bytes, ctype: str) -> None:
    r = client.post("/v1/generations", content=content, headers={"content-type": ctype})
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


def test_a_30_mb_body_is_refused(client: TestClient) -> None:
    # /v1/generations takes input images: its bound is IRG_MAX_UPLOAD_BYTES (24 MiB), not IRG_MAX_BODY_BYTES
    big = json.dumps({"prompt": "x" * (30 * 1024 * 1024)})
    r = client.post("/v1/generations", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(480):
            yield b"x" * 65536

    r = client.post("/v1/generations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize(
    "path",
    [
        "/v1/generations/gen_000000000000000000000000",
        "/v1/generations/nope",
        "/v1/generations/' OR 1=1 --",
        "/v1/generations/gen_000000000000000000000000/events",
        "/v1/generations/gen_000000000000000000000000/images/final",
        "/v1/generations/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    ],
)
def test_unknown_jobs_are_404(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404
    assert client.delete(path).status_code in (404, 405)


def test_image_names_are_a_closed_set(client: TestClient) -> None:
    job = client.post("/v1/generations", json=GOOD).json()
    base = f"/v1/generations/{job['id']}/images"
    for name in ("draft", "final", "round-1", "round-2"):
        assert client.get(f"{base}/{name}").status_code == 404  # not drawn yet
    assert client.get(f"{base}/round-3").status_code == 404  # this job has 2 rounds
    for name in ("passwd", "round-0", "round-9", "final.png", "..%2f..%2fsecret", "%2e%2e", "round-1%00"):
        r = client.get(f"{base}/{name}")
        assert r.status_code in (404, 422), (name, r.status_code)
    assert client.get(f"{base}/../../../etc/passwd").status_code == 404


def test_method_not_allowed_is_json(client: TestClient) -> None:
    r = client.put("/v1/generations", json=GOOD)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
