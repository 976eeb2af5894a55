"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import metrics
from server.api.deps import QueueDep, get_owner
from server.queue.base import QueueUnavailable
from server.schemas import ReadyStatus, WorkerCapacity

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
PING_TIMEOUT_S = 2.0


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyStatus,
    summary="Readiness: queue reachable and a worker ready",
    responses={503: {"model": ReadyStatus, "description": "not ready; `reason` says why"}},
)
async def readyz(queue: QueueDep) -> JSONResponse:
    try:
        await asyncio.wait_for(queue.ping(), PING_TIMEOUT_S)
        workers = await queue.workers()
        depth = await queue.depth()
    except (QueueUnavailable, TimeoutError) as e:  # the details (host, port) go to the log, not to callers
        log.warning("readyz: queue backend unreachable: %s", e or f"no answer within {PING_TIMEOUT_S:g} s")
        reason = "queue backend unreachable" + ("" if e else f": no answer within {PING_TIMEOUT_S:g} s")
        return JSONResponse(ReadyStatus(status="unavailable", reason=reason).model_dump(), status_code=503)
    ready = [w for w in workers if w.ready]
    if not ready:
        reason = "no worker with a loaded model is alive"
        body = ReadyStatus(status="unavailable", reason=reason, queue_depth=depth)
        return JSONResponse(body.model_dump(), status_code=503)
    capacity = [
        WorkerCapacity(name=w.name, active=w.active, capacity=w.capacity, free=max(0, w.capacity - w.active))
        for w in ready
    ]
    body = ReadyStatus(
        status="ready",
        workers=len(ready),
        queue_depth=depth,
        capacity=capacity,
        free_capacity=sum(c.free for c in capacity),
    )
    return JSONResponse(body.model_dump())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[Depends(get_owner)],
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def prometheus(queue: QueueDep, request: Request) -> Response:
    try:
        workers = [w for w in await queue.workers() if w.ready]
        metrics.observe_workers(len(workers), sum(w.busy for w in workers), await queue.depth())
    except QueueUnavailable:
        metrics.observe_workers(0, 0, None)
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
