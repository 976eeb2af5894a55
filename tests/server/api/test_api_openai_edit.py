"""The official `openai` client, unchanged, edits an image and asks about one, against a real server on the
demo model: the output has the official edit size, the IRG draft streams first, the answer streams."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from irg_core.sizes import edit_output_size

FAST = {"steps": 3, "max_think_tokens": 4}


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


@pytest.fixture
def _client(serve: Any) -> openai.OpenAI:
    server = serve(wait_timeout_s=300.0)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_edit_returns_the_official_output_size(_client: openai.OpenAI) -> None:
    result = _client.images.edit(
        model="bagel-7b-mot",
        image=("in.png", png(30, 18), "image/png"),
        prompt="Make it blue.",
        extra_body={**FAST, "mode": "direct"},
    )
    assert len(result.data) == 1
    assert size_of(result.data[0].b64_json) == edit_output_size(30, 18) == (848, 512)
    assert result.size == "848x512"


def test_irg_edit_streams_the_draft_first(_client: openai.OpenAI) -> None:
    stream = _client.images.edit(
        image=("in.png", png(18, 30), "image/png"),
        prompt="Make it blue.",
        stream=True,
        partial_images=1,
        extra_body={**FAST, "mode": "irg"},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    draft, final = events
    assert draft.partial_image_index == 0
    assert size_of(draft.b64_json) == size_of(final.b64_json) == (512, 848)
    assert draft.b64_json != final.b64_json and final.usage.total_tokens > 0


def test_chat_completion_about_an_image(_client: openai.OpenAI) -> None:
    url = "data:image/png;base64," + base64.b64encode(png(40, 24)).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What does this image show?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    whole = _client.chat.completions.create(model="bagel-7b-mot", messages=messages, max_tokens=5)
    answer = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.usage.completion_tokens <= 5
    assert whole.choices[0].finish_reason in ("stop", "length") and isinstance(answer, str)
    chunks = list(
        _client.chat.completions.create(
            model="bagel-7b-mot", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer  # greedy: the streamed answer is the same answer
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1


def test_openai_errors_reach_the_client(_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="GIF"):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, "GIF")
        _client.images.edit(image=("in.gif", buf.getvalue(), "image/gif"), prompt="x")
    with pytest.raises(openai.BadRequestError, match="never fetched"):
        _client.chat.completions.create(
            model="m",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what?"},
                        {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
                    ],
                }
            ],
        )
