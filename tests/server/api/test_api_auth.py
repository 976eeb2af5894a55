"""API keys: without one every route but /healthz and /readyz is 401; a key sees only its own jobs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.api.main import create_app
from server.queue.memory import MemoryQueue
from server.settings import Settings

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"
GOOD = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    s = settings.model_copy(update={"api_keys": [ALICE, BOB]})
    with TestClient(create_app(s, MemoryQueue(s))) as c:
        yield c


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/generations"),
        ("GET", "/v1/generations/gen_000000000000000000000000"),
        ("GET", "/v1/generations/gen_000000000000000000000000/events"),
        ("GET", "/v1/generations/gen_000000000000000000000000/images/final"),
        ("DELETE", "/v1/generations/gen_000000000000000000000000"),
        ("POST", "/v1/images/generations"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
    ],
)
def test_no_key_is_401(client: TestClient, method: str, path: str) -> None:
    for headers in ({}, auth("wrong-key-0123456789abcdef"), {"Authorization": f"Basic {ALICE}"}):
        r = client.request(method, path, json=GOOD, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "error" in r.json()


def test_health_needs_no_key(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # no worker here, but no key needed to ask


def test_a_key_sees_only_its_own_jobs(client: TestClient) -> None:
    r = client.post("/v1/generations", json=GOOD, headers=auth(ALICE))
    assert r.status_code == 202
    job = r.json()
    for path in (job["links"]["self"], job["links"]["events"], f"{job['links']['self']}/images/final"):
        assert client.get(path, headers=auth(BOB)).status_code == 404
    assert client.delete(job["links"]["self"], headers=auth(BOB)).status_code == 404
    assert client.get(job["links"]["self"], headers=auth(ALICE)).json()["status"] == "queued"
    assert ALICE not in str(client.get(job["links"]["self"], headers=auth(ALICE)).json())
    assert client.delete(job["links"]["self"], headers=auth(ALICE)).json()["status"] == "cancelled"


def test_openai_route_keeps_openai_error_shape(client: TestClient) -> None:
    error = client.post("/v1/images/generations", json={"prompt": "x"}).json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "unauthorized"


def test_short_keys_are_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="16 characters"):
        Settings(api_keys=["short"])
    assert Settings(api_keys=f"{ALICE}, {BOB}").api_keys == [ALICE, BOB]  # type: ignore[arg-type]
