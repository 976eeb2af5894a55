"""The official `openai` client, pointed at a real server on the demo model, generates images unchanged."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

FAST = {"steps": 4, "thinking": {"max_tokens": 8}}


def png_size(b64: str, fmt: str = "PNG") -> tuple[int, int]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == fmt
    return image.size


@pytest.fixture
def client(serve: Any) -> openai.OpenAI:
    server = serve()
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_generate_plain(client: openai.OpenAI) -> None:
    result = client.images.generate(model="bagel-7b-mot", prompt="a lighthouse at dusk", size="64x48", extra_body=FAST)
    assert result.created > 0 and len(result.data) == 1
    assert png_size(result.data[0].b64_json) == (64, 48)
    assert result.data[0].revised_prompt  # the final reflection
    assert result.usage is not None and result.usage.output_tokens > 0


def test_generate_stream_sends_the_draft_as_a_partial_image(client: openai.OpenAI) -> None:
    stream = client.images.generate(prompt="a lighthouse at dusk", size="64x64", stream=True, extra_body=FAST)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    partial, completed = events
    assert partial.partial_image_index == 0 and png_size(partial.b64_json) == (64, 64)
    assert png_size(completed.b64_json) == (64, 64) and completed.usage.total_tokens > 0
    assert partial.b64_json != completed.b64_json


def test_n_images_jpeg_and_urls(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="a fox",
        size="32x32",
        n=2,
        output_format="jpeg",
        output_compression=80,
        extra_body={**FAST, "mode": "direct"},
    )
    assert [png_size(d.b64_json, "JPEG") for d in result.data] == [(32, 32), (32, 32)]
    result = client.images.generate(
        prompt="a fox", size="32x32", response_format="url", extra_body={**FAST, "mode": "direct"}
    )
    r = httpx.get(result.data[0].url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "100x100"}, "size"),
        ({"size": "huge"}, "size"),
        ({"n": 0}, "n"),
        ({"extra_body": {"steps": 0}}, "steps"),
        ({"extra_body": {"flux_capacitor": 1}}, "flux_capacitor"),
        ({"background": "transparent"}, "background"),
        ({"n": 2, "stream": True}, "n"),
    ],
)
def test_bad_requests_are_openai_400s(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        result = client.images.generate(prompt="a fox", **kwargs)
        list(result) if kwargs.get("stream") else None
    error = info.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
