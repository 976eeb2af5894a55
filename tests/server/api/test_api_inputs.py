"""Input images as the server takes them (server/inputs.py) and through every route that accepts them: formats,
EXIF, alpha, limits checked before decoding, and every bad image a 4xx that names the problem, with the worker
alive after it. The worker is model-free here (FakeRunner): these tests are about inputs, not numbers."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.api.main import create_app
from server.inputs import ImageInputError, ImageLimits, decode_base64, decode_image
from server.queue.memory import MemoryQueue
from server.settings import Settings
from server.worker import WorkerThread
from tests.server.serverkit import FakeRunner, sse_events, wait_until


def encode(image: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int = 40, h: int = 24, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    data = np.random.default_rng(w * h).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(data if channels > 1 else data[..., 0], mode)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of (truncated) data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


# -- server/inputs.py ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(encode(noise(), fmt))
    assert image.mode == "RGB" and image.size == (40, 24)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode_image(encode(noise(40, 24), "JPEG", exif=exif))
    assert image.size == (24, 40)


def test_alpha_is_flattened_over_white_as_the_official_code_does() -> None:
    rgba = np.zeros((24, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :20, 3] = 255  # left half opaque red-ish, right half fully transparent
    image = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"))))
    assert (image[:, :20] == [200, 0, 0]).all() and (image[:, 20:] == 255).all()
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))
    out = np.asarray(decode_image(encode(palette, transparency=0)))
    assert (out[:, :16] == [10, 20, 30]).all() and (out[:, 16:] == 255).all()  # index 0 transparent -> white


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (encode(noise(), "GIF"), 422, "GIF"),
        (b"https://example.com/cat.png", 422, "never fetched"),
        (encode(noise())[:300], 422, "truncated"),
        (encode(noise(1, 1)), 422, "minimum of 16"),
        (png_header(20000, 20000), 413, "400000000 pixels"),
        (png_header(9000, 100), 413, "per side"),
        (b"", 422, "empty"),
        (b"not an image at all", 422, "not a PNG, JPEG or WebP"),
    ],
)
def test_bad_images_are_refused_by_name(data: bytes, status: int, words: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ImageInputError) as e:
        decode_image(data)
    assert e.value.status == status and words in e.value.message
    assert time.perf_counter() - start < 1.0  # the header is enough: nothing big is decoded


def test_byte_limit_and_base64() -> None:
    data = encode(noise())
    with pytest.raises(ImageInputError, match="over the limit of 1000 bytes") as e:
        decode_image(data, ImageLimits(max_bytes=1000))
    assert e.value.status == 413 and e.value.limit == "max_bytes"
    assert decode_base64("data:image/png;base64," + base64.b64encode(data).decode()) == data
    with pytest.raises(ImageInputError, match="base64"):
        decode_base64("@@not base64@@")
    with pytest.raises(ImageInputError, match="never fetched"):
        decode_base64("http://example.com/a.png")


# -- the routes ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    s = Settings(
        redis_url=None,
        wait_timeout_s=30.0,
        heartbeat_s=0.5,
        cancel_poll_s=0.05,
        max_image_bytes=2_000_000,
        max_upload_bytes=4_000_000,
    )
    queue = MemoryQueue(s)
    worker = WorkerThread(queue, s, FakeRunner, name="inputs")
    with TestClient(create_app(s, queue, [worker])) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_an_edit_takes_its_size_from_the_input(client: TestClient) -> None:
    r = client.post(
        "/v1/generations",
        json={
            "prompt": "make it red",
            "mode": "direct",
            "steps": 4,
            "wait": True,
            "images": [b64(encode(noise(160, 96)))],
        },
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert (job["params"]["width"], job["params"]["height"]) == (848, 512) and job["params"]["edit"]
    assert job["params"]["inputs"][0]["width"] == 160 and job["params"]["guidance"][0]["image_scale"] == 2.0
    assert job["images"][0]["width"] == 848 and job["status"] == "succeeded"
    r = client.post("/v1/generations", json={"prompt": "x", "width": 512, "images": [b64(encode(noise()))]})
    assert r.status_code == 422 and "follows the input" in r.json()["error"]["message"]


def test_multipart_upload_to_generations(client: TestClient) -> None:
    request = json.dumps({"prompt": "make it red", "mode": "direct", "steps": 4, "wait": True})
    r = client.post(
        "/v1/generations",
        files={"request": (None, request), "image": ("in.webp", encode(noise(96, 160), "WEBP"), "image/webp")},
    )
    assert r.status_code == 200, r.text
    assert (r.json()["params"]["width"], r.json()["params"]["height"]) == (512, 848)
    r = client.post("/v1/generations", files={"image": ("in.png", encode(noise()), "image/png")})
    assert r.status_code == 422 and "request" in r.json()["error"]["message"]


def test_understanding_streams_the_answer(client: TestClient) -> None:
    body = {
        "prompt": "What is this?",
        "task": "understand",
        "thinking": {"max_tokens": 3},
        "stream": True,
        "images": ["data:image/png;base64," + b64(encode(noise())), b64(encode(noise(30, 30), "JPEG"))],
    }
    with client.stream("POST", "/v1/generations", json=body) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    types = [e["event"] for e in events]
    assert types == ["queued", "started", "answer.delta", "answer.delta", "answer.delta", "answer.done", "completed"]
    done = json.loads(events[-1]["data"])
    assert done["answer"] == {"text": " 2img w1 w2", "done": True, "tokens": 3}
    assert done["params"]["task"] == "understand" and len(done["params"]["inputs"]) == 2
    job_id = done["id"]
    resumed = client.get(f"/v1/generations/{job_id}/events", headers={"Last-Event-ID": events[3]["id"]})
    again = list(sse_events(resumed.text.splitlines()))
    assert again[0]["event"] == "stream.resumed"  # ephemeral (no id), then every durable event after the id
    assert [e["event"] for e in again if e.get("id")] == types[4:]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"task": "understand"}, 422, "at least one input image"),
        ({"task": "understand", "images": ["IMG"], "mode": "irg"}, 422, "mode"),
        ({"images": ["IMG", "IMG"]}, 422, "one input image"),
        ({"images": ["https://example.com/a.png"]}, 422, "never fetched"),
        ({"images": [b64(encode(noise(), "GIF"))]}, 422, "GIF"),
        ({"images": [b64(encode(noise())[:100])]}, 422, "truncated"),
        ({"images": [b64(encode(noise(1, 1)))]}, 422, "minimum"),
        ({"images": [b64(png_header(20000, 20000))]}, 413, "pixels"),
        ({"images": ["%%%"]}, 422, "base64"),
    ],
)
def test_bad_inputs_are_4xx_and_the_worker_lives_on(client: TestClient, body: dict, status: int, words: str) -> None:
    body = {"prompt": "x", **body}
    body["images"] = [b64(encode(noise())) if i == "IMG" else i for i in body.get("images", [])] or None
    if body["images"] is None:
        del body["images"]
    r = client.post("/v1/generations", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["field"]
    r = client.post(
        "/v1/generations",
        json={"prompt": "still alive", "mode": "direct", "width": 32, "height": 32, "steps": 4, "wait": True},
    )
    assert r.json()["status"] == "succeeded"


def test_bodies_past_the_upload_limit_are_413(client: TestClient) -> None:
    big = b64(b"\x89PNG\r\n\x1a\n" + b"x" * 5_000_000)
    r = client.post("/v1/generations", json={"prompt": "x", "images": [big]})
    assert r.status_code == 413 and "IRG_MAX_UPLOAD_BYTES" in r.json()["error"]["message"]
    r = client.post(
        "/v1/images/edits", files={"image": ("a.png", b"\x89PNG" + b"x" * 5_000_000, "image/png")}, data={"prompt": "x"}
    )
    assert r.status_code == 413
    just_over = encode(noise()) + b"\0" * 2_000_000  # under the body limit, over IRG_MAX_IMAGE_BYTES
    r = client.post("/v1/generations", json={"prompt": "x", "images": [b64(just_over)]})
    assert r.status_code == 413 and "2000000 bytes" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("files", "data", "words"),
    [
        ({"image": ("a.gif", encode(noise(), "GIF"), "image/gif")}, {"prompt": "x"}, "GIF"),
        ({"image": ("a.png", encode(noise()), "image/png")}, {"prompt": "x", "size": "512x512"}, "follows the input"),
        ({"image": ("a.png", encode(noise()), "image/png")}, {"prompt": " "}, "prompt"),
        (
            {"image": ("a.png", encode(noise()), "image/png"), "mask": ("m.png", encode(noise()), "image/png")},
            {"prompt": "x"},
            "mask",
        ),
        (None, {"prompt": "x", "image": "https://example.com/a.png"}, "never fetched"),
    ],
)
def test_openai_edit_errors_are_400_in_openai_shape(client: TestClient, files: Any, data: dict, words: str) -> None:
    r = (
        client.post("/v1/images/edits", files=files, data=data)
        if files
        else client.post("/v1/images/edits", files={"x": (None, "")}, data=data)
    )
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ([{"type": "text", "text": "what?"}], "no image"),
        (
            [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}],
            "never fetched",
        ),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "no text"),
        (
            [
                {"type": "text", "text": "what?"},
                {"type": "image_url", "image_url": {"url": "data:image/gif;base64," + b64(encode(noise(), "GIF"))}},
            ],
            "GIF",
        ),
    ],
)
def test_chat_errors_are_400(client: TestClient, content: list, words: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
