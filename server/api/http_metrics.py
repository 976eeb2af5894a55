"""HTTP request metrics (pure ASGI middleware): requests by method, route template and status, and the time
from a request to its response's status line. The label is the route's template (`/v1/generations/{job_id}`),
never the raw path, so job ids and probes of random paths cannot grow the label set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import metrics

UNMATCHED = "unmatched"  # the route label of a path no route serves (404s of random paths)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # anything else: "other"


def route_template(scope: Scope, routes: Sequence[Any]) -> str:
    """The template of the route that served (or would serve) this request, or `UNMATCHED`; `routes` is the
    flat list of the app's routes (Starlette routes, whose `matches` reads the path and method)."""
    route = scope.get("route")
    if route is None:  # refused before routing (413 of the body limit...): find the route it was meant for
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
        if route is None:
            route = next((r for r in routes if r.matches(scope)[0] == Match.PARTIAL), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class HttpMetrics:
    def __init__(self, app: ASGIApp, routes: Sequence[Any] = ()):
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: list[int] = []
        latency: list[float] = []

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start" and not status:
                status.append(message["status"])
                latency.append(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        except BaseException:
            if not status:  # the error handler outside this middleware answers 500
                status.append(500)
                latency.append(time.perf_counter() - start)
            raise
        finally:
            if status:  # a client gone before any answer has no status to count
                route = route_template(scope, self.routes)
                method = scope["method"] if scope["method"] in METHODS else "other"
                metrics.HTTP_REQUESTS.labels(method, route, str(status[0])).inc()
                metrics.HTTP_LATENCY.labels(method, route).observe(latency[0])
