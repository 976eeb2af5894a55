"""Helpers of the server tests: free ports, waiting, SSE parsing, live uvicorn servers on a thread, worker
threads, and a model-free runner for the tests that are about the API alone."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from irg_core.errors import Cancelled
from irg_core.params import EngineEvent, GenerationParams, StageTiming, TrajectoryResult, image_rounds
from server.settings import Settings
from server.worker import WorkerThread

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("IRG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SMALL = {"width": 64, "height": 64, "steps": 4, "thinking": {"max_tokens": 8}}  # a job of well under a second


# The events of an IRG job (two rounds), runs of the same type collapsed (see `collapse`).
IRG_ORDER = [
    "queued",
    "started",
    "thinking.delta",
    "thinking.done",
    "image.progress",
    "image.done",
    "reflection.delta",
    "reflection.done",
    "image.progress",
    "image.done",
    "completed",
]


def collapse(types: list[str]) -> list[str]:
    """Runs of the same event type as one (deltas and progress come many at a time)."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Parse an SSE stream into {id, event, data} dicts (comments skipped)."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = value[1:] if value.startswith(" ") else value


def read_stream(client: httpx.Client, method: str, url: str, live: bool = False, **kw: Any) -> list[dict[str, Any]]:
    """A whole SSE response as events with their JSON data parsed (asserts it is a 200 event stream). Only the
    durable events (those with an id) unless `live`: ephemeral ones (image.preview, stream.resumed) too."""
    with client.stream(method, url, **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [dict(e, data=json.loads(e["data"])) for e in sse_events(r.iter_lines()) if live or "id" in e]


class FakeHandle:
    def __init__(self) -> None:
        self.status, self.result, self.error = "running", None, None

    @property
    def over(self) -> bool:
        return self.status != "running"


class FakeRunner:
    """A model-free runner: the event sequence of a trajectory with flat images, in milliseconds. Used where
    the tests are about the API (fuzzing) and the real model would only add minutes."""

    device, model = "cpu", "fake"

    def __init__(self, fail: BaseException | None = None, step_s: float = 0.0):
        self.fail, self.step_s = fail, step_s

    def run(self, params: GenerationParams, on_event: Any, should_cancel: Any, images: Any = ()) -> TrajectoryResult:
        assert bool(images) == params.edit  # an edit comes with its input image, nothing else does
        params = params.resolved()
        params.validate(max_side=1024)
        if self.fail is not None:
            raise self.fail
        n = image_rounds(params.mode, params.rounds)
        for k in range(1, n + 1):
            kind = "thinking" if k == 1 else "reflection"
            if params.mode != "direct":
                on_event(EngineEvent(f"{kind}.delta", {"round": k, "text": "plan "}))
                on_event(EngineEvent(f"{kind}.done", {"round": k, "text": "plan "}))
            for step in range(1, 3):
                if should_cancel():
                    raise Cancelled()
                time.sleep(self.step_s)
                on_event(EngineEvent("image.progress", {"round": k, "step": step, "steps": 2}))
            image = np.full((params.height, params.width, 3), 30 * k, dtype=np.uint8)
            on_event(
                EngineEvent(
                    "image.done",
                    {
                        "round": k,
                        "kind": "final" if k == n else "draft",
                        "width": params.width,
                        "height": params.height,
                    },
                    image=image,
                )
            )
        return TrajectoryResult(params, stages=[StageTiming("image", 1, 0.001, steps=2)], total_seconds=0.002)

    def submit(self, params: GenerationParams, on_event: Any, should_cancel: Any, images: Any = ()) -> FakeHandle:
        """The worker's interface: each job runs `run` on a thread of its own (the real runner ticks a scheduler)."""
        return self._thread(lambda: self.run(params, on_event, should_cancel, images=images))

    def submit_understanding(self, params: Any, images: Any, on_event: Any, should_cancel: Any) -> FakeHandle:
        return self._thread(lambda: self.understand(params, images, on_event, should_cancel))

    def _thread(self, work: Callable[[], Any]) -> FakeHandle:
        handle = FakeHandle()

        def go() -> None:
            try:
                handle.result, handle.status = work(), "done"
            except Cancelled as e:
                handle.error, handle.status = e, "cancelled"
            except Exception as e:
                handle.error, handle.status = e, "failed"

        threading.Thread(target=go, daemon=True).start()
        return handle

    def step(self) -> bool:
        time.sleep(0.002)
        return True

    def cancel(self, handle: FakeHandle) -> None:
        handle.error, handle.status = Cancelled(), "cancelled"

    def usage(self, params: GenerationParams, result: TrajectoryResult) -> dict[str, int]:
        return {"prompt_tokens": 1, "text_tokens": 2, "image_tokens": 3}

    def understand(self, params: Any, images: Any, on_event: Any, should_cancel: Any) -> Any:
        """An answer of `max_tokens` words, one answer.delta each, naming how many images it saw."""
        from irg_core.recipes import UnderstandingResult

        params.validate()
        if self.fail is not None:
            raise self.fail
        words = [f" w{i}" for i in range(params.max_tokens)]
        words[0] = f" {len(images)}img"
        for w in words:
            if should_cancel():
                raise Cancelled()
            time.sleep(self.step_s)
            on_event(EngineEvent("answer.delta", {"text": w}))
        on_event(EngineEvent("answer.done", {"text": "".join(words), "tokens": len(words)}))
        return UnderstandingResult(
            params,
            token_ids=list(range(len(words))),
            text="".join(words),
            stages=[StageTiming("answer", 0, 0.001, tokens=len(words))],
            total_seconds=0.002,
            context_length=10,
        )

    def memory(self) -> dict[str, int]:
        return {}


def start_worker(queue: Any, settings: Settings, runner: Any, name: str = "test-worker") -> WorkerThread:
    thread = WorkerThread(queue, settings, lambda: runner, name=name)
    thread.start()
    wait_until(lambda: thread.worker.info.ready, timeout=10)
    return thread


class LiveServer:
    """A real uvicorn server on a free loopback port, on a thread of the test process."""

    def __init__(self, app: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


def replace_settings(settings: Settings, **overrides: Any) -> Settings:
    return settings.model_copy(update=overrides) if overrides else settings


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", *args]
