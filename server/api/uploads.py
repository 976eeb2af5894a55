"""Multipart uploads to `POST /v1/generations`: a `request` part (the JSON body) plus `image` file parts become
the JSON request with the images base64-encoded in `images`, so one route and one schema serve both forms.

Runs inside the body limit (the bytes were already bounded); the images are validated by the route like any
base64 image.
"""

from __future__ import annotations

import base64
import json

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body

UPLOAD_PATHS = ("/v1/generations", "/v1/images/edits", "/v1/chat/completions")
MAX_PARTS = 32


class MultipartGenerations:
    def __init__(self, app: ASGIApp, path: str = "/v1/generations"):
        self.app, self.path = app, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.path:
            return await self.app(scope, receive, send)
        ctype = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").lower()
        if not ctype.startswith("multipart/form-data"):
            return await self.app(scope, receive, send)
        try:
            body = await _to_json(Request(scope, receive))
        except ValueError as e:
            return await _refuse(scope, send, str(e))
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(dict(scope, headers=headers), replay, send)


async def _to_json(request: Request) -> bytes:
    try:
        form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS)
    except Exception as e:  # malformed multipart: python-multipart raises its own errors
        raise ValueError(f"the multipart body could not be parsed ({e})") from e
    raw = form.get("request")
    if raw is None:
        raise ValueError("a multipart request needs a `request` part holding the JSON body")
    text = (await raw.read()).decode("utf-8", "replace") if isinstance(raw, UploadFile) else raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the `request` part is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError("the `request` part must be a JSON object")
    files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
    if files:
        if "images" in data:
            raise ValueError("send images either as `image` parts or in `images`, not both")
        data["images"] = [base64.b64encode(await f.read()).decode("ascii") for f in files]
    return json.dumps(data).encode()


async def _refuse(scope: Scope, send: Send, message: str) -> None:
    payload = json.dumps(error_body(scope["path"], 422, "invalid_request", message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 422,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
