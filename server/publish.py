"""Engine events -> job events: each `EngineEvent` of a trajectory becomes one queue event, with the job's
texts and image list kept current in its record (so `GET /v1/generations/{id}` shows them mid-run)."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from typing import Any

from PIL import Image

from irg_core.params import EngineEvent
from server.jobs import JobRecord, image_name, image_url
from server.queue.base import Claim, WorkerQueue

PNG_COMPRESS_LEVEL = 4  # a 1024x1024 image encodes in a few tens of ms, within ~10% of level 9's size
PREVIEW_FORMAT, PREVIEW_QUALITY = "JPEG", 80  # a 256x256 preview: ~5-15 KB in well under 1 ms (WebP: ~10 ms)


def encode_png(pixels: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def encode_preview(pixels: Any) -> bytes:
    """A preview (small HWC uint8) as a JPEG."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, PREVIEW_FORMAT, quality=PREVIEW_QUALITY)
    return buf.getvalue()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Publisher:
    """The `on_event` callback of one run: publishes events in order, stores images before announcing them."""

    def __init__(self, queue: WorkerQueue, claim: Claim):
        self.q, self.claim = queue, claim
        self.job = claim.job
        self.b64 = bool(self.job.options.get("image_b64"))
        self.texts: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.answer: dict[str, Any] | None = None

    def __call__(self, event: EngineEvent) -> None:
        data: dict[str, Any] = {"job_id": self.job.id, **event.data}
        if event.type == "image.preview":  # ephemeral: live watchers only, never in the event log
            emit_live = getattr(self.q, "emit_live", None)
            if emit_live is not None:
                data.update(format="jpeg", b64=base64.b64encode(encode_preview(event.image)).decode("ascii"))
                emit_live(self.claim, event.type, data)
            return
        fields = None
        if event.type == "image.done":
            fields = self._image(event, data)
        elif event.type.startswith(("thinking.", "reflection.")):
            fields = self._text(event)
        elif event.type.startswith("answer."):
            fields = self._answer(event)
        self.q.emit(self.claim, event.type, data, fields)

    def _text(self, event: EngineEvent) -> dict[str, str]:
        k = event.data["round"]
        if not self.texts or self.texts[-1]["round"] != k:
            kind = "thinking" if event.type.startswith("thinking.") else "reflection"
            self.texts.append({"round": k, "kind": kind, "text": "", "done": False})
        entry = self.texts[-1]
        if event.type.endswith(".done"):
            entry.update(text=event.data["text"], done=True, truncated=bool(event.data.get("truncated")))
        else:
            entry["text"] += event.data["text"]
        return {"texts": _dumps(self.texts)}

    def _answer(self, event: EngineEvent) -> dict[str, str]:
        """Task understand: the answer so far (answer.delta), then whole (answer.done)."""
        if self.answer is None:
            self.answer = {"text": "", "done": False, "tokens": 0}
        if event.type == "answer.done":
            self.answer.update(text=event.data["text"], done=True, tokens=event.data.get("tokens", 0))
        else:
            self.answer["text"] += event.data["text"]
        return {"answer": _dumps(self.answer)}

    def _image(self, event: EngineEvent, data: dict[str, Any]) -> dict[str, str]:
        k = event.data["round"]
        png = encode_png(event.image)
        self.q.put_image(self.claim, k, png)
        data["url"] = image_url(self.job.id, image_name(k, self.job.image_rounds))
        if self.b64:
            data["b64"] = base64.b64encode(png).decode("ascii")
        self.images.append(
            {"round": k, "kind": event.data["kind"], "width": event.data["width"], "height": event.data["height"]}
        )
        return {"images": _dumps(self.images)}

    def record(self, **changes: Any) -> JobRecord:
        """The job as this run has made it so far."""
        answer = dict(self.answer) if self.answer is not None else None
        return replace(self.job, texts=list(self.texts), images=list(self.images), answer=answer, **changes)
