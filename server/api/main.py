"""The HTTP API: `create_app()` wires settings, the queue and the routers (the routes live in `routes/`).

No torch here: an API replica in front of Redis starts in about a second and stays light.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from irg_core.defaults import ServingDefaults
from server import metrics
from server.api import errors
from server.api.http_metrics import HttpMetrics
from server.api.limits import BodyLimit
from server.api.routes import chat, docs, generations, health, openai_edits, openai_images, web
from server.api.routes import defaults as defaults_route
from server.api.streams import remember_transport
from server.api.uploads import UPLOAD_PATHS, MultipartGenerations
from server.defaults import serving_defaults
from server.queue.base import JobQueue
from server.settings import Settings, get_settings


class Service(Protocol):
    """Something that runs beside the API in the same process (the embedded worker of `irg serve`): with one,
    /metrics exports the worker's metrics too."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def make_queue(settings: Settings) -> JobQueue:
    if settings.redis_url:
        from server.queue.redis import RedisJobQueue

        return RedisJobQueue(settings)
    from server.queue.memory import MemoryQueue

    return MemoryQueue(settings)


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The schema of this deployment: without API keys configured, no operation requires one."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if not settings.api_keys:
            schema.get("components", {}).pop("securitySchemes", None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.pop("security", None)
        app.openapi_schema = schema
    return app.openapi_schema


class App(FastAPI):
    """FastAPI, that notes in each request's scope how to abort its connection (a stalled event stream)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        remember_transport(scope, send)
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    queue: JobQueue | None = None,
    services: Sequence[Service] = (),
    defaults: ServingDefaults | None = None,
) -> FastAPI:
    """`defaults`: the serving defaults of the model the workers run (default: read from settings.model_dir;
    without one, the demo's in-process and the recipe's in front of Redis, see server.defaults)."""
    settings = settings or get_settings()
    queue = queue or make_queue(settings)
    defaults = defaults or serving_defaults(settings.model_dir, demo_when_unset=not settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check = getattr(queue, "check_durability", None)  # Redis: warn when a restart would lose jobs
        if check is not None:
            await check()
        for service in services:
            service.start()
        try:
            yield
        finally:
            for service in services:
                service.stop()
            await queue.close()

    app = App(
        title="IRG Server",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description="Interleaving Reasoning Generation on BAGEL: prompt -> thinking -> "
        "draft image -> reflection -> final image, with every stage streamed (see API.md).",
    )
    app.state.settings = settings
    app.state.queue = queue
    app.state.metrics = metrics.Exposition("api", *(("worker",) if services else ()))
    app.state.serving_defaults = defaults
    errors.install(app)
    app.add_middleware(MultipartGenerations)  # inside the body limit: a multipart upload becomes the JSON request
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, upload_bytes=settings.max_upload_bytes, upload_paths=UPLOAD_PATHS
    )
    # web last: `/{name}` must not shadow the API
    routers = (generations, defaults_route, openai_images, openai_edits, chat, health, docs, web)
    # outermost: it counts the body limit's 413s too, under the route they were sent to
    app.add_middleware(HttpMetrics, routes=[route for module in routers for route in module.router.routes])
    for module in routers:
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    return app
