"""`POST /v1/images/edits`: OpenAI's image edits over IRG edit jobs (multipart, as the official `openai` client
sends it). The output size follows the input image (the official BAGEL rule); with `stream`, each draft of an
IRG edit is an `image_edit.partial_image` and the final edit `image_edit.completed`."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.datastructures import UploadFile

from server import metrics
from server.api.deps import DefaultsDep, OwnerDep, QueueDep, SettingsDep, get_owner
from server.api.routes.openai_images import OPENAI_ERROR, Output, _collect, _stream
from server.api.streams import sse_content
from server.inputs import ImageInputError
from server.jobs import InputImages, RequestError, build_params, check_input_images, new_job
from server.queue.base import QueueFull
from server.schemas import GenerationOptions, ThinkingOptions

router = APIRouter(prefix="/v1/images", tags=["openai"], dependencies=[Depends(get_owner)])
MAX_PARTS = 32
TEXT_FIELDS = {
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
    "background",
    "quality",
    "input_fidelity",
    "user",
    "safety_identifier",
    "moderation",
    "mode",
    "rounds",
    "steps",
    "seed",
    "max_think_tokens",
    "temperature",
}
FORM_SCHEMA = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "the image to edit (PNG, JPEG or WebP)"},
        "prompt": {"type": "string", "description": "the edit instruction"},
        "model": {"type": "string"},
        "n": {"type": "integer", "minimum": 1, "maximum": 10},
        "size": {"type": "string", "enum": ["auto"], "description": "the output size follows the input image"},
        "response_format": {"type": "string", "enum": ["b64_json", "url"]},
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
        "output_compression": {"type": "integer", "minimum": 0, "maximum": 100},
        "stream": {"type": "boolean"},
        "partial_images": {"type": "integer", "minimum": 0, "maximum": 3},
        "mode": {"type": "string", "enum": ["irg", "think", "direct"]},
        "steps": {"type": "integer"},
        "seed": {"type": "integer"},
    },
}


def _bool(name: str, value: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise RequestError(name, "must be true or false")


def _int(name: str, value: str | None, lo: int, hi: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        out = int(value)
    except ValueError as e:
        raise RequestError(name, f"must be an integer within [{lo}, {hi}]") from e
    if not lo <= out <= hi:
        raise RequestError(name, f"must be an integer within [{lo}, {hi}]")
    return out


async def _read_form(request: Request) -> tuple[dict[str, str], list[bytes]]:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise RequestError("image", "send the image as multipart/form-data (image files are never fetched from URLs)")
    try:
        form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS)
    except Exception as e:  # malformed multipart
        raise RequestError("body", f"the multipart body could not be parsed ({e})") from e
    fields: dict[str, str] = {}
    images: list[bytes] = []
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if name == "image":
            if not isinstance(value, UploadFile):
                raise ImageInputError("image: must be a file part (image URLs are never fetched)", field="image")
            images.append(await value.read())
        elif name == "mask":
            raise RequestError("mask", "masks are not supported: BAGEL edits the whole image from the instruction")
        elif isinstance(value, UploadFile):
            raise RequestError(name, "unexpected file part")
        elif name not in TEXT_FIELDS:
            raise RequestError(name, "unknown field")
        else:
            fields[name] = value
    if not images:
        raise RequestError("image", "is required (one PNG, JPEG or WebP file)")
    if len(images) > 1:
        raise RequestError("image", "BAGEL edits one image at a time: send exactly one")
    if not fields.get("prompt", "").strip():
        raise RequestError("prompt", "is required (the edit instruction)")
    return fields, images


def _options(f: dict[str, str]) -> GenerationOptions:
    try:
        return GenerationOptions(
            mode=f.get("mode") or "irg",
            rounds=_int("rounds", f.get("rounds"), 1, 8),
            steps=_int("steps", f.get("steps"), 2, 200),
            seed=_int("seed", f.get("seed"), 0, 2**63 - 1),
            thinking=ThinkingOptions(
                max_tokens=_int("max_think_tokens", f.get("max_think_tokens"), 1, 4096),
                temperature=_float("temperature", f.get("temperature")),
            ),
        )
    except ValidationError as e:
        error = e.errors()[0]
        name = ".".join(str(p) for p in error.get("loc", ())) or "body"
        raise RequestError(name, error.get("msg", "invalid")) from e


def _float(name: str, value: str | None) -> float:
    try:
        out = float(value or 0.0)
    except ValueError as e:
        raise RequestError(name, "must be a number") from e
    if not 0.0 <= out <= 10.0:  # also refuses nan and inf
        raise RequestError(name, "must be a finite number within [0, 10]")
    return out


async def _submit(queue: Any, params: dict[str, Any], owner: str, n: int, inputs: InputImages) -> list[Any]:
    jobs: list[Any] = []
    try:
        for i in range(n):
            job, _, _ = await queue.submit(new_job(dict(params, seed=params["seed"] + i), owner, False, None, inputs))
            jobs.append(job)
            metrics.SUBMITTED.labels(params["mode"]).inc()
    except QueueFull:
        await asyncio.gather(*(queue.cancel(j.id) for j in jobs))  # all n or none
        raise
    return jobs


@router.post(
    "/edits",
    summary="Edit an image (OpenAI-compatible)",
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": FORM_SCHEMA}}}},
    responses={
        200: {
            "content": sse_content(["image_edit.partial_image", "image_edit.completed", "error"], "with `stream`"),
            "description": "ImagesResponse JSON",
        },
        400: OPENAI_ERROR,
        401: OPENAI_ERROR,
        413: OPENAI_ERROR,
        429: OPENAI_ERROR,
        500: OPENAI_ERROR,
        503: OPENAI_ERROR,
        504: OPENAI_ERROR,
    },
)
async def edit_images(
    request: Request, queue: QueueDep, settings: SettingsDep, owner: OwnerDep, defaults: DefaultsDep
) -> Response:
    f, images = await _read_form(request)
    if f.get("size") not in (None, "", "auto"):
        raise RequestError(
            "size",
            "an edit's output size follows the input image (the official BAGEL rule); send size=auto or leave it out",
        )
    if f.get("background") == "transparent":
        raise RequestError("background", "transparent backgrounds are not supported")
    n = _int("n", f.get("n"), 1, 10) or 1
    if n > settings.max_images:
        raise RequestError("n", f"must be within [1, {settings.max_images}]")
    stream = _bool("stream", f.get("stream", ""))
    if stream and n != 1:
        raise RequestError("n", "a streamed edit has one image: n must be 1")
    partial = _int("partial_images", f.get("partial_images"), 0, 3)
    fmt = f.get("output_format") or "png"
    if fmt not in ("png", "jpeg", "webp"):
        raise RequestError("output_format", "must be png, jpeg or webp")
    response_format = f.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise RequestError("response_format", "must be b64_json or url")
    compression = _int("output_compression", f.get("output_compression"), 0, 100)
    inputs = await asyncio.to_thread(check_input_images, images, settings, "image")
    params = build_params(_options(f), f["prompt"], None, None, settings, defaults, inputs)
    jobs = await _submit(queue, params, owner, n, inputs)
    output = Output(fmt, 100 if compression is None else compression, f"{params['width']}x{params['height']}")
    if stream:
        limit = 3 if partial is None else partial
        return EventSourceResponse(
            _stream(queue, jobs[0].id, output, limit, prefix="image_edit"),
            ping=settings.sse_ping_s,
            send_timeout=settings.sse_send_timeout_s,
        )
    body = SimpleNamespace(response_format=response_format)
    return await _collect(queue, jobs, body, output, request, settings.wait_timeout_s)  # type: ignore[arg-type]
