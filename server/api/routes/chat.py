"""`POST /v1/chat/completions`: OpenAI's chat completions over BAGEL image understanding. The user message's
`image_url` parts (data URLs only; nothing is fetched) are the images, its text parts the question; the answer
streams as `chat.completion.chunk`s (`stream`) or comes whole as a `chat.completion`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from irg_core.params import MAX_THINK_TOKENS
from server import metrics
from server.api.deps import DefaultsDep, OwnerDep, QueueDep, SettingsDep, get_owner
from server.api.errors import ApiError
from server.api.routes.openai_images import OPENAI_ERROR
from server.api.streams import sse_content, wait_for_end
from server.events import COMPLETED, follow
from server.jobs import RequestError, build_params, check_input_images, new_job
from server.queue.base import JobQueue
from server.schemas import MAX_IMAGE_B64, GenerationOptions, ThinkingOptions

router = APIRouter(prefix="/v1/chat", tags=["openai"], dependencies=[Depends(get_owner)])
MODEL = "bagel-7b-mot"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImageURL(_Lenient):
    url: Annotated[str, Field(max_length=MAX_IMAGE_B64)] = Field(description="data:image/...;base64,... only")
    detail: str | None = None


class ContentPart(_Lenient):
    type: Literal["text", "image_url"]
    text: str | None = Field(None, max_length=100_000)
    image_url: ImageURL | None = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, max_length=64)


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class ChatRequest(_Lenient):
    model: str | None = Field(None, max_length=256, description="accepted and ignored: this server runs one model")
    messages: list[Message] = Field(min_length=1, max_length=64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_THINK_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_THINK_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 (default): greedy, as the official code")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = Field(None, ge=1, le=1)
    think: bool = Field(False, description="IRG extension: BAGEL's VLM thinking prompt first (official think=True)")


def _question_and_images(messages: list[Message]) -> tuple[str, list[str]]:
    """The last user message's text (the question) and every image of the user messages, in order."""
    texts: list[str] = []
    images: list[str] = []
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise RequestError("messages", "needs a user message with the question and the image(s)")
    for i, m in enumerate(messages):
        if m.role != "user":
            raise RequestError(
                f"messages[{i}].role",
                "only user messages are supported: BAGEL's understanding "
                "recipe has no system prompt of its own, nor chat history",
            )
    for m in users:
        parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        for part in parts:
            if part.type == "image_url":
                url = part.image_url.url if part.image_url else ""
                if not url.startswith("data:"):
                    raise RequestError("image_url", "image URLs are never fetched; send a data:image/...;base64 URL")
                images.append(url)
            elif part.text and m is users[-1]:
                texts.append(part.text)
    question = "\n".join(t for t in texts if t.strip())
    if not question:
        raise RequestError("messages", "the last user message has no text (the question)")
    if not images:
        raise RequestError("messages", "no image: add an image_url part (a data URL) to a user message")
    return question, images


def _usage(job_data: dict[str, Any]) -> dict[str, int]:
    u = job_data.get("usage") or {"prompt_tokens": 0, "text_tokens": 0}
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["text_tokens"],
        "total_tokens": u["prompt_tokens"] + u["text_tokens"],
    }


def _finish(answer: dict[str, Any] | None, max_tokens: int) -> str:
    return "length" if answer and answer.get("tokens", 0) >= max_tokens else "stop"


@router.post(
    "/completions",
    summary="Answer about images (OpenAI-compatible chat completions)",
    responses={
        200: {"content": sse_content(["message"], "with `stream`: chat.completion.chunk JSON, then [DONE]")},
        400: OPENAI_ERROR,
        401: OPENAI_ERROR,
        413: OPENAI_ERROR,
        429: OPENAI_ERROR,
        500: OPENAI_ERROR,
        503: OPENAI_ERROR,
        504: OPENAI_ERROR,
    },
)
async def chat_completions(
    body: ChatRequest, queue: QueueDep, settings: SettingsDep, owner: OwnerDep, defaults: DefaultsDep
) -> Response:
    question, images = _question_and_images(body.messages)
    inputs = await asyncio.to_thread(check_input_images, images, settings, "image_url")
    max_tokens = body.max_completion_tokens or body.max_tokens
    opts = GenerationOptions(
        mode="think" if body.think else "direct",
        seed=body.seed,
        thinking=ThinkingOptions(max_tokens=max_tokens, temperature=body.temperature or 0.0),
    )
    params = build_params(opts, question, None, None, settings, defaults, inputs, "understand")
    job, _, _ = await queue.submit(new_job(params, owner, False, None, inputs))
    metrics.SUBMITTED.labels(params["mode"]).inc()
    cid, created, limit = f"chatcmpl-{job.id[4:]}", int(time.time()), params["thinking"]["max_tokens"]
    model = body.model or MODEL
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(
            _stream(queue, job.id, cid, created, model, limit, usage),
            ping=settings.sse_ping_s,
            send_timeout=settings.sse_send_timeout_s,
        )
    await wait_for_end(queue, job.id, settings.wait_timeout_s)
    done = await queue.get(job.id)
    if done is None or not done.terminal:
        await queue.cancel(job.id)
        raise ApiError(504, "timeout", f"the answer was not ready within {settings.wait_timeout_s:g} s")
    if done.status != "succeeded":
        error = done.error or {"code": "cancelled", "message": "the request was cancelled"}
        raise ApiError(400 if error["code"] == "invalid_params" else 500, error["code"], error["message"])
    answer = done.answer or {"text": "", "tokens": 0}
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer["text"], "refusal": None},
                    "finish_reason": _finish(answer, limit),
                    "logprobs": None,
                }
            ],
            "usage": _usage({"usage": done.usage}),
        }
    )


async def _stream(
    queue: JobQueue, job_id: str, cid: str, created: int, model: str, limit: int, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> ServerSentEvent:
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if usage is not None:
            body = dict(body, choices=[], usage=usage)
        return ServerSentEvent(data=json.dumps(body, ensure_ascii=False))

    yield chunk({"role": "assistant", "content": ""})
    async for event in (e async for batch in follow(queue, job_id) for e in batch):
        data = json.loads(event.data)
        if event.type == "answer.delta":
            yield chunk({"content": data["text"]})
        elif event.type == COMPLETED:
            yield chunk({}, _finish(data.get("answer"), limit))
            if include_usage:
                yield chunk({}, usage=_usage(data))
        elif event.terminal:
            error = data.get("error") or {"code": "cancelled", "message": "the request was cancelled"}
            yield ServerSentEvent(
                data=json.dumps(
                    {
                        "error": {
                            "message": error["message"],
                            "type": "server_error",
                            "code": error["code"],
                            "param": None,
                        }
                    }
                )
            )
    yield ServerSentEvent(data="[DONE]")
