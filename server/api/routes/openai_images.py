"""`POST /v1/images/generations`: OpenAI's Images API over IRG jobs (the final image is the image; with
`stream`, each draft is an `image_generation.partial_image` and the final one `image_generation.completed`)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image
from sse_starlette import ServerSentEvent

from server import metrics
from server.api.deps import DefaultsDep, OwnerDep, QueueDep, SettingsDep, get_owner, require_json
from server.api.errors import ApiError
from server.api.streams import bounded_response, sse_content, wait_for_end
from server.events import COMPLETED, StoredEvent, follow
from server.jobs import JobRecord, RequestError, build_params, image_url, new_job
from server.live import LiveEvent, merge_items
from server.queue.base import JobQueue, QueueFull
from server.schemas_openai import ImageData, ImageGenerationRequest, ImagesResponse, ImageUsage

router = APIRouter(prefix="/v1/images", tags=["openai"], dependencies=[Depends(get_owner)])
OPENAI_ERROR = {"description": "OpenAI's error shape: {error: {message, type, param, code}}"}


@dataclass(frozen=True)
class Output:
    format: str
    compression: int
    size: str

    def encode(self, png: bytes, always: bool = False) -> str:
        """Base64 of the image in the requested format (PNG bytes pass through unless `always`)."""
        if self.format != "png" or always:
            image = Image.open(io.BytesIO(png)).convert("RGB")
            buf = io.BytesIO()
            image.save(buf, self.format.upper(), **({} if self.format == "png" else {"quality": self.compression}))
            png = buf.getvalue()
        return base64.b64encode(png).decode("ascii")


def _size(value: str | None) -> tuple[int | None, int | None]:
    if value in (None, "auto"):
        return None, None  # the default side
    width, height = (int(x) for x in value.split("x"))
    for side in (width, height):
        if side < 16 or side > 1024 or side % 16:
            raise RequestError("size", f"{value}: each side must be a multiple of 16 within [16, 1024]")
    return width, height


def _usage(usage: dict[str, int] | None) -> dict[str, Any]:
    u = usage or {"prompt_tokens": 0, "text_tokens": 0, "image_tokens": 0}
    out = u["text_tokens"] + u["image_tokens"]
    return ImageUsage(
        input_tokens=u["prompt_tokens"],
        output_tokens=out,
        total_tokens=u["prompt_tokens"] + out,
        input_tokens_details={"text_tokens": u["prompt_tokens"], "image_tokens": 0},
    ).model_dump()


def _revised_prompt(job: JobRecord) -> str | None:
    return job.texts[-1]["text"] if job.texts else None


async def _submit(queue: JobQueue, params: dict[str, Any], owner: str, n: int) -> list[JobRecord]:
    jobs: list[JobRecord] = []
    try:
        for i in range(n):
            job, _, _ = await queue.submit(new_job(dict(params, seed=params["seed"] + i), owner, False))
            jobs.append(job)
            metrics.SUBMITTED.labels(params["mode"]).inc()
    except QueueFull:
        await asyncio.gather(*(queue.cancel(j.id) for j in jobs))  # all n or none
        raise
    return jobs


@router.post(
    "/generations",
    response_model=ImagesResponse,
    summary="Create images (OpenAI-compatible)",
    dependencies=[Depends(require_json)],
    responses={
        200: {
            "content": sse_content(
                ["image_generation.partial_image", "image_generation.completed", "error"], "with `stream`"
            )
        },
        400: OPENAI_ERROR,
        401: OPENAI_ERROR,
        413: OPENAI_ERROR,
        415: OPENAI_ERROR,
        429: OPENAI_ERROR,
        500: OPENAI_ERROR,
        503: OPENAI_ERROR,
        504: OPENAI_ERROR,
    },
)
async def create_images(
    body: ImageGenerationRequest,
    request: Request,
    queue: QueueDep,
    settings: SettingsDep,
    owner: OwnerDep,
    defaults: DefaultsDep,
) -> Response:
    width, height = _size(body.size)
    n = 1 if body.n is None else body.n
    if body.background == "transparent":
        raise RequestError("background", "transparent backgrounds are not supported")
    if not 1 <= n <= settings.max_images:  # one message for every n out of range (the schema leaves n to this)
        raise RequestError("n", f"must be an integer within [1, {settings.max_images}] on this server")
    if body.stream and n != 1:
        raise RequestError("n", "a streamed generation has one image: n must be 1")
    params = build_params(body, body.prompt, width, height, settings, defaults)
    jobs = await _submit(queue, params, owner, n)
    output = Output(
        body.output_format or "png",
        100 if body.output_compression is None else body.output_compression,
        f"{params['width']}x{params['height']}",
    )
    if body.stream:
        limit = 3 if body.partial_images is None else body.partial_images
        # previews fill the slots the drafts leave only when partial_images is asked for explicitly
        drafts = params["rounds"] - 1 if params["mode"] == "irg" else 0
        drafts = drafts if body.partial_images is not None else limit
        return bounded_response(_stream(queue, jobs[0].id, output, limit, drafts), settings)
    return await _collect(queue, jobs, body, output, request, settings.wait_timeout_s)


async def _collect(
    queue: JobQueue,
    jobs: list[JobRecord],
    body: ImageGenerationRequest,
    output: Output,
    request: Request,
    timeout: float,
) -> JSONResponse:
    await asyncio.gather(*(wait_for_end(queue, j.id, timeout) for j in jobs))
    done = [await queue.get(j.id) or j for j in jobs]
    if not all(j.terminal for j in done):
        await asyncio.gather(*(queue.cancel(j.id) for j in done))
        raise ApiError(504, "timeout", f"the images were not ready within {timeout:g} s")
    for job in done:
        if job.status != "succeeded":
            error = job.error or {"code": "cancelled", "message": "the generation was cancelled"}
            status = 400 if error["code"] == "invalid_params" else 500
            raise ApiError(status, error["code"], error["message"])
    data = []
    for job in done:
        if body.response_format == "url":
            data.append(
                ImageData(
                    url=f"{str(request.base_url).rstrip('/')}{image_url(job.id, 'final')}",
                    revised_prompt=_revised_prompt(job),
                )
            )
            continue
        png = await queue.get_image(job.id, job.image_rounds)
        if png is None:
            raise ApiError(500, "image_expired", f"the image of {job.id} is no longer stored")
        data.append(ImageData(b64_json=output.encode(png), revised_prompt=_revised_prompt(job)))
    usage = _usage(done[0].usage) if len(done) == 1 else None
    response = ImagesResponse(
        created=int(done[0].created_at), data=data, output_format=output.format, size=output.size, usage=usage
    )
    return JSONResponse(response.model_dump(mode="json", exclude_none=True))


async def _job_events(queue: JobQueue, job_id: str) -> AsyncIterator[StoredEvent | LiveEvent]:
    """The job's durable events, with its live previews in between when the queue has them."""
    durable = (e async for batch in follow(queue, job_id) for e in batch)
    live = getattr(queue, "live", None)
    if live is None:
        async for event in durable:
            yield event
        return
    async with live(job_id) as watcher:
        async for item in merge_items(durable, watcher):
            yield item


async def _stream(
    queue: JobQueue,
    job_id: str,
    output: Output,
    limit: int,
    drafts: int | None = None,
    prefix: str = "image_generation",
) -> AsyncIterator[ServerSentEvent]:
    """OpenAI's image stream: `{prefix}.partial_image` per draft (at most `limit`), then `{prefix}.completed`.
    Slots the drafts leave free (`drafts`: how many the job draws; None: all `limit`) go to live previews of the
    image being drawn (x0 estimates, at preview size, as they come), never taking a slot a draft needs."""
    common = {"background": "opaque", "output_format": output.format, "quality": "auto", "size": output.size}
    index = 0
    drafts_left = limit if drafts is None else drafts

    def partial(b64: str, **extra: Any) -> ServerSentEvent:
        nonlocal index
        kind = f"{prefix}.partial_image"
        payload = {
            "type": kind,
            "b64_json": b64,
            "created_at": int(time.time()),
            "partial_image_index": index,
            **common,
            **extra,
        }
        index += 1
        return ServerSentEvent(data=json.dumps(payload), event=kind)

    async for event in _job_events(queue, job_id):
        if isinstance(event, LiveEvent):
            if event.type == "image.preview" and index + drafts_left < limit:
                d = json.loads(event.data)
                yield partial(
                    output.encode(base64.b64decode(d["b64"]), always=True),
                    irg_preview={
                        "round": d["round"],
                        "step": d["step"],
                        "steps": d["steps"],
                        "width": d["width"],
                        "height": d["height"],
                    },
                )
            continue
        data = json.loads(event.data)
        if event.type == "image.done" and data["kind"] == "draft":
            drafts_left -= 1
        if event.type == "image.done" and data["kind"] == "draft" and index < limit:
            png = await queue.get_image(job_id, data["round"])
            if png is not None:
                yield partial(output.encode(png))
        elif event.type == COMPLETED:
            png = await queue.get_image(job_id, data["params"]["rounds"])
            kind = f"{prefix}.completed"
            payload = {
                "type": kind,
                "b64_json": output.encode(png or b""),
                "created_at": int(time.time()),
                "usage": _usage(data.get("usage")),
                **common,
            }
            yield ServerSentEvent(data=json.dumps(payload), event=kind)
        elif event.terminal:
            error = data.get("error") or {"code": "cancelled", "message": "the generation was cancelled"}
            payload = {
                "type": "error",
                "error": {"type": "server_error", "code": error["code"], "message": error["message"]},
            }
            yield ServerSentEvent(data=json.dumps(payload), event="error")
