"""The web page's routes: `/` and a closed set of asset names; nothing else answers from them."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.api.main import create_app
from server.queue.memory import MemoryQueue
from server.settings import Settings


def test_page_and_assets_are_served_and_nothing_else(settings: Settings) -> None:
    with TestClient(create_app(settings, MemoryQueue(settings))) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "app.js" in r.text
        assert c.get("/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/app.css").headers["content-type"].startswith("text/css")
        for path in ("/nothing.js", "/..%2Fsettings.py", "/%2e%2e/api/main.py", "/web/app.js"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        # the page's routes do not swallow the API's: a wrong method is still a 405
        assert c.get("/v1/generations").status_code == 405
        assert c.put("/").status_code == 405
