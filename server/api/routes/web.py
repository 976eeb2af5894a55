"""The web page (`server/web/`): `/` and its assets, a closed set of names read once at start-up.

Explicit routes rather than a static mount at `/`: a mount there would also answer every unknown path and
method (e.g. `GET /v1/generations` must stay a 405, not a 404 from the file server), and no name a client
sends ever becomes a file path.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def _load() -> dict[str, tuple[bytes, str]]:
    files = {}
    if WEB_DIR.is_dir():
        for path in WEB_DIR.iterdir():
            if path.is_file() and not path.name.startswith("."):
                kind = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                files[path.name] = (path.read_bytes(), f"{kind}; charset=utf-8" if kind.startswith("text/") else kind)
    return files


router = APIRouter(tags=["web page"], include_in_schema=False)
FILES = _load()


def _serve(name: str) -> Response:
    found = FILES.get(name)
    if found is None:
        raise HTTPException(404, "Not Found")
    body, kind = found
    return Response(body, media_type=kind, headers={"Cache-Control": "no-cache"})


@router.get("/")
async def page() -> Response:
    return _serve("index.html")


@router.get("/{name}")
async def asset(name: str) -> Response:
    return _serve(name)
