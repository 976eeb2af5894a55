"""`/v1/generations`: submit a prompt, follow its events, fetch its images, cancel it."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.responses import JSONResponse

from server import metrics
from server.api import idempotency
from server.api.deps import DefaultsDep, JobDep, OwnerDep, QueueDep, SettingsDep, get_owner, require_json
from server.api.errors import BODY_ERRORS, ApiError
from server.api.streams import event_response, sse_content, wait_for_end
from server.events import ENGINE_EVENTS, QUEUED, STARTED, TERMINAL_EVENTS, valid_event_id
from server.jobs import build_params, check_input_images, image_round, job_path, job_public, new_job
from server.schemas import IMAGE_NAME_PATTERN, ErrorResponse, GenerateRequest, JobPublic

router = APIRouter(prefix="/v1/generations", tags=["generations"], dependencies=[Depends(get_owner)])

SSE = sse_content([QUEUED, STARTED, *ENGINE_EVENTS, *sorted(TERMINAL_EVENTS)], "the job's events (API.md)")
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API keys are configured and none (or a wrong one) was sent"},
    404: {"model": ErrorResponse, "description": "no such job (or another key's)"},
}


def _job_json(job: JobPublic, status: int) -> JSONResponse:
    return JSONResponse(job.model_dump(mode="json"), status_code=status, headers={"Location": job.links.self})


def _idempotent_id(owner: str, key: str) -> str:
    return "gen_" + hashlib.sha256(f"{owner}\n{key}".encode()).hexdigest()[:24]


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Submit a prompt",
    dependencies=[Depends(require_json)],
    responses={
        200: {"model": JobPublic, "content": SSE, "description": "`stream`: the event stream; `wait`: the ended job"},
        401: ERRORS[401],
        422: {"model": ErrorResponse, "description": "invalid parameters or input image (nothing is queued)"},
        409: {"model": ErrorResponse, "description": "the Idempotency-Key was used before with a different body"},
        429: {"model": ErrorResponse, "description": "the queue is full; see Retry-After"},
        503: {"model": ErrorResponse, "description": "the queue backend is unreachable"},
        **BODY_ERRORS,
    },
)
async def create_generation(
    body: GenerateRequest,
    request: Request,
    queue: QueueDep,
    settings: SettingsDep,
    owner: OwnerDep,
    defaults: DefaultsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=256,
            description=(
                "the same key and body again returns the job it created instead of queueing a new one; the same key "
                "with a different body is a 409"
            ),
        ),
    ] = None,
) -> Response:
    inputs = await asyncio.to_thread(check_input_images, body.images, settings) if body.images else None
    params = build_params(body, body.prompt, body.width, body.height, settings, defaults, inputs, body.task)
    job = new_job(
        params, owner, body.image_b64, _idempotent_id(owner, idempotency_key) if idempotency_key else None, inputs
    )
    if idempotency_key:
        job.options[idempotency.OPTION] = idempotency.fingerprint(body)
    job, position, created = await queue.submit(job)
    if created:
        metrics.SUBMITTED.labels(body.mode).inc()
    elif idempotency_key:
        idempotency.check_same(job.options, body, idempotency_key, job.id)
    if body.stream or "text/event-stream" in request.headers.get("accept", ""):
        return event_response(queue, job.id, None, settings)
    if body.wait and not job.terminal:
        await wait_for_end(queue, job.id, settings.wait_timeout_s)
        job = await queue.get(job.id) or job
        position = await queue.position(job.id)
    return _job_json(job_public(job, position), 200 if job.terminal else 202)


@router.get("/{job_id}", response_model=JobPublic, summary="The job", responses=ERRORS)
async def get_generation(job: JobDep, queue: QueueDep) -> JobPublic:
    position = await queue.position(job.id) if job.status == "queued" else None
    return job_public(job, position)


@router.get(
    "/{job_id}/events",
    summary="The job's event stream (SSE)",
    response_class=Response,
    responses={
        200: {"content": SSE, "description": "events from the start, or after Last-Event-ID"},
        **ERRORS,
        204: {"description": "the job has ended and the client has every event (Last-Event-ID is its last)"},
        422: {"model": ErrorResponse, "description": "Last-Event-ID is not an event id"},
    },
)
async def get_events(
    job: JobDep,
    queue: QueueDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(max_length=64, description="resume after this event")] = None,
) -> Response:
    if last_event_id is not None and not valid_event_id(last_event_id):
        raise ApiError(422, "invalid_request", "Last-Event-ID: not an event id of this server", "Last-Event-ID")
    if job.terminal and last_event_id and not await queue.read_events(job.id, last_event_id, 0):
        return Response(status_code=204)  # the client has it all; 204 tells an EventSource not to reconnect
    return event_response(queue, job.id, last_event_id, settings)


@router.get(
    "/{job_id}/images/{name}",
    summary="An image of the job (PNG)",
    response_class=Response,
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}, **ERRORS},
)
async def get_image(
    job: JobDep,
    queue: QueueDep,
    name: Annotated[str, Path(pattern=IMAGE_NAME_PATTERN, description="draft, final or round-N")],
) -> Response:
    k = image_round(name, job.image_rounds)
    png = await queue.get_image(job.id, k) if k is not None else None
    if png is None:
        raise ApiError(404, "not_found", f"job {job.id} has no image {name!r} (yet)", "name")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-cache"})


@router.delete(
    "/{job_id}",
    response_model=JobPublic,
    summary="Cancel the job",
    responses={202: {"model": JobPublic, "description": "running: it stops at the next step"}, **ERRORS},
)
async def cancel_generation(job: JobDep, queue: QueueDep) -> Response:
    if not job.terminal:
        job = await queue.cancel(job.id) or job
        if job.terminal and job.status == "cancelled":
            metrics.job_ended(job.params["mode"], "cancelled")
    status = 200 if job.terminal else 202
    return JSONResponse(
        job_public(job).model_dump(mode="json"), status_code=status, headers={"Location": job_path(job.id)}
    )
