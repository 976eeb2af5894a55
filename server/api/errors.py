"""Errors as JSON everywhere: `{"error": {"code", "message", "field"}}`, and OpenAI's own shape
(`{"error": {"message", "type", "param", "code"}}`) under the OpenAI-compatible routes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server import metrics
from server.api.body import unreadable_body, whole_body_error
from server.inputs import ImageInputError
from server.jobs import RequestError
from server.queue.base import QueueFull, QueueUnavailable
from server.schemas import ALLOWED

log = logging.getLogger(__name__)
OPENAI_PREFIX = ("/v1/images/", "/v1/chat/")
STATUS_CODES = {
    400: "invalid_body",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "queue_full",
    503: "unavailable",
}
# Documented on every route that takes a body.
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not UTF-8 text, or JSON nested too deeply to parse"},
    413: {"description": "the body is larger than the server accepts (IRG_MAX_BODY_BYTES)"},
    415: {"description": "the body is not sent as JSON (Content-Type: application/json)"},
}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = dict(headers or {})


def error_body(path: str, status: int, code: str, message: str, field: str | None = None) -> dict[str, Any]:
    if path.startswith(OPENAI_PREFIX):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": field, "code": code}}
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(
    path: str, status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(path, status, code, message, field), status_code=status, headers=headers)


def field_path(loc: Sequence[Any]) -> str | None:
    """("body", "guidance", 0, "text_scale") -> "guidance[0].text_scale"."""
    out = ""
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def describe(error: Mapping[str, Any]) -> tuple[str | None, str]:
    """The field and a message naming it (and what it allows) of one pydantic error."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    if loc == ("body",):  # the body as a whole: empty, or not an object
        return None, whole_body_error(kind, error.get("input"))
    if kind == "json_invalid":
        return None, f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
    name = field_path(loc)
    if kind == "extra_forbidden":
        return name, f"{name}: unknown field"
    if kind == "missing":
        return name, f"{name}: is required"
    leaf = next((p for p in reversed(loc) if isinstance(p, str)), "")
    message = f"{name or 'body'}: {error.get('msg', 'invalid')}"
    if leaf in ALLOWED:
        message += f" (allowed: {ALLOWED[leaf]})"
    return name, message


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        field, message = describe(errors[0]) if errors else (None, "invalid request")
        status = 400 if request.url.path.startswith(OPENAI_PREFIX) else 422
        return error_response(request.url.path, status, "invalid_request", message, field)

    @app.exception_handler(RequestError)
    async def _limit(request: Request, exc: RequestError) -> JSONResponse:
        status = 400 if request.url.path.startswith(OPENAI_PREFIX) else 422
        return error_response(request.url.path, status, "invalid_request", str(exc), exc.field)

    @app.exception_handler(ImageInputError)
    async def _image(request: Request, exc: ImageInputError) -> JSONResponse:
        code = "image_too_large" if exc.status == 413 else "invalid_image"
        status = 400 if exc.status == 422 and request.url.path.startswith(OPENAI_PREFIX) else exc.status
        return error_response(request.url.path, status, code, exc.message, exc.field or "images")

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI's "error parsing the body", with the parser's exception chained
            message = unreadable_body(exc.__cause__)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette lists the first route's methods only; a path can have several
            headers["Allow"] = ", ".join(
                sorted(
                    {
                        m
                        for route in request.app.router.routes
                        for m in getattr(route, "methods", None) or ()
                        if route.matches(request.scope)[0] == Match.PARTIAL
                    }
                )
            )
        return error_response(request.url.path, exc.status_code, code, message, None, headers)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        metrics.REJECTED.labels("queue_full").inc()
        retry = str(request.app.state.settings.retry_after_s)
        return error_response(request.url.path, 429, "queue_full", f"{exc}; retry later", None, {"Retry-After": retry})

    @app.exception_handler(QueueUnavailable)
    async def _down(request: Request, exc: QueueUnavailable) -> JSONResponse:
        log.warning("queue unavailable: %s", exc)
        if request.method == "POST":
            metrics.REJECTED.labels("unavailable").inc()
        # the cause (Redis's host and port) is in the log above, not in the answer to a possibly anonymous caller
        return error_response(
            request.url.path,
            503,
            "unavailable",
            "the job queue is unavailable; retry later",
            None,
            {"Retry-After": str(request.app.state.settings.retry_after_s)},
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, "internal_error", "internal server error")
