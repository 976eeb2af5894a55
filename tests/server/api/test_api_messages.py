"""Messages a client can act on: a body sent as something else than JSON, an empty body, JSON nested too deep,
the OpenAI route's `n` bound, an Idempotency-Key reused with another request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.api.body import is_json
from server.api.main import create_app
from server.queue.memory import MemoryQueue
from server.settings import Settings

GOOD = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}
ROUTES = ("/v1/generations", "/v1/images/generations")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    s = settings.model_copy(update={"max_images": 3})
    queue = MemoryQueue(s)
    with TestClient(create_app(s, queue)) as c:
        c.queue = queue  # type: ignore[attr-defined]
        yield c


def message(r: object) -> str:
    return r.json()["error"]["message"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml"]
)
def test_wrong_content_type_is_415_naming_json(client: TestClient, route: str, ctype: str) -> None:
    r = client.post(route, content=b'{"prompt": "a fox"}', headers={"Content-Type": ctype})
    if route == "/v1/generations" and ctype == "multipart/form-data":  # an upload (an edit), malformed here
        assert r.status_code == 422 and "multipart" in message(r), r.text
        assert client.queue._jobs == {}  # type: ignore[attr-defined]
        return
    assert r.status_code == 415, r.text
    assert "Content-Type: application/json" in message(r) and ctype in message(r)
    assert client.queue._jobs == {}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "ctype",
    [None, "application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"],
)
def test_json_content_types_are_accepted(ctype: str | None) -> None:
    assert is_json(ctype)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("headers", [{"Content-Type": "application/json"}, {}])
def test_empty_body_says_it_is_empty(client: TestClient, route: str, headers: dict[str, str]) -> None:
    r = client.post(route, content=b"", headers=headers)
    assert r.status_code in (400, 422) and "body is empty" in message(r), r.text
    assert "None" not in message(r)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body", [b"[" * 1000 + b"]" * 1000, b'{"a":' * 1000 + b"1" + b"}" * 1000])
def test_deep_nesting_says_so(client: TestClient, route: str, body: bytes) -> None:
    r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in message(r), r.text
    assert "UTF-8" not in message(r)


@pytest.mark.parametrize("route", ROUTES)
def test_not_utf8_and_not_an_object(client: TestClient, route: str) -> None:
    r = client.post(route, content=b'{"prompt": "\xff"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not UTF-8" in message(r)
    r = client.post(route, content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422) and message(r) == "the body must be a JSON object, not an array"


@pytest.mark.parametrize("n", [0, -1, 4, 11, 1000])
def test_openai_n_bound_is_one_message(client: TestClient, n: int) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "a fox", "n": n})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"
    assert message(r) == "n: must be an integer within [1, 3] on this server"  # IRG_MAX_IMAGES=3 here


def test_idempotency_key_with_another_request_is_409(client: TestClient) -> None:
    key = {"Idempotency-Key": "order-17"}
    first = client.post("/v1/generations", json=GOOD, headers=key)
    assert first.status_code == 202
    # the same request (keys in another order, a delivery option changed) returns the same job
    again = client.post("/v1/generations", json={**dict(reversed(list(GOOD.items()))), "wait": False}, headers=key)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    other = client.post("/v1/generations", json={**GOOD, "prompt": "a blue fox"}, headers=key)
    assert other.status_code == 409, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency_conflict" and error["field"] == "Idempotency-Key"
    assert "order-17" in error["message"] and "different request" in error["message"]
    assert len(client.queue._jobs) == 1  # type: ignore[attr-defined]
    assert "request_digest" not in first.text  # the digest stays inside the server
