"""Request body size bound, enforced before the app reads a byte more than allowed (pure ASGI middleware)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body


class BodyLimit:
    """413 for bodies over `max_bytes`: at once when Content-Length says so, else while reading a chunked one."""

    setting = "IRG_MAX_BODY_BYTES"

    def __init__(
        self, app: ASGIApp, max_bytes: int, upload_bytes: int | None = None, upload_paths: tuple[str, ...] = ()
    ):
        self.app, self.max_bytes = app, max_bytes
        self.upload_bytes, self.upload_paths = upload_bytes or max_bytes, upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].rstrip("/") in self.upload_paths and self.upload_bytes != self.max_bytes:
            # the routes that take input images have their own, larger bound (IRG_MAX_UPLOAD_BYTES)
            limited = BodyLimit(self.app, self.upload_bytes)
            limited.setting = "IRG_MAX_UPLOAD_BYTES"
            return await limited(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._refuse(scope, send)
            return await self.app(scope, receive, send)
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # a chunked body: read it whole (it is small, or refused) and replay it
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = f"the request body is larger than {self.max_bytes} bytes ({self.setting})"
        payload = json.dumps(error_body(scope["path"], 413, "body_too_large", message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"connection", b"close"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
