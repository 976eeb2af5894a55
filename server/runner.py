"""The engine behind a worker: load a model, warm it up, and run many trajectories at once through the
scheduler (the only server module that imports torch and the model code)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from irg_core.engine import Engine
from irg_core.params import EngineEvent, GenerationParams, TrajectoryResult, UnderstandingParams, image_rounds
from irg_core.recipes import prepare_understanding
from irg_core.scheduler import Job, Scheduler
from irg_core.trajectory import prepare_any, run_trajectory
from server import metrics

log = logging.getLogger(__name__)
WARMUP = GenerationParams(
    prompt="warm-up", mode="irg", rounds=2, width=64, height=64, steps=3, seed=0, max_think_tokens=4, previews=1
)  # previews: fits the fast preview map at start


def _observe_forward(kind: str, rows: int) -> None:
    metrics.FORWARD_ROWS.labels(kind).observe(rows)
    if kind == "decode":
        metrics.DECODE_BATCH.observe(rows)


class EngineRunner:
    def __init__(self, engine: Engine, model: str = "", max_active: int = 8):
        self.engine = engine
        self.model = model
        self.device = str(engine.device)
        self.scheduler = Scheduler(engine, max_active=max_active, on_forward=_observe_forward)
        self._waits = 0

    @property
    def max_active(self) -> int:
        return self.scheduler.max_active

    @max_active.setter
    def max_active(self, n: int) -> None:
        self.scheduler.max_active = n

    @classmethod
    def open(cls, args: argparse.Namespace) -> EngineRunner:
        """Load the model the command-line options name (server.cli.common.open_engine) and warm it up."""
        from server.cli.common import open_engine
        from weights.demo import default_demo_dir

        engine = open_engine(args)
        model = Path(args.model_dir).name if args.model_dir else f"demo ({default_demo_dir().name})"
        runner = cls(engine, model)
        runner.warm_up()
        return runner

    def warm_up(self) -> None:
        side = min(WARMUP.width, self.engine.cfg.max_image_side)
        run_trajectory(self.engine, replace(WARMUP, width=side, height=side))
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    # -- the worker's interface ------------------------------------------------------------------------------
    def submit(
        self,
        params: GenerationParams,
        on_event: Callable[[EngineEvent], None],
        should_cancel: Callable[[], bool],
        images: Sequence[Any] = (),
    ) -> Job:
        """A trajectory, or an edit of `images[0]` (params.edit)."""
        program, pages = prepare_any(self.engine, params, images)
        return self.scheduler.submit(program, pages, on_event, should_cancel)

    def submit_understanding(
        self,
        params: UnderstandingParams,
        images: Sequence[Any],
        on_event: Callable[[EngineEvent], None],
        should_cancel: Callable[[], bool],
    ) -> Job:
        """An answer about `images` (irg_core.recipes); the job's result is an UnderstandingResult."""
        program, pages = prepare_understanding(self.engine, params, images)
        return self.scheduler.submit(program, pages, on_event, should_cancel)

    def step(self) -> bool:
        busy = self.scheduler.step()
        pool, s = self.engine.pool, self.scheduler
        metrics.KV_PAGES.labels("used").set(pool.used_pages)
        metrics.KV_PAGES.labels("free").set(pool.free_pages)
        metrics.KV_PAGES.labels("reserved").set(s.reserved)
        if s.admission_waits > self._waits:
            metrics.ADMISSION_WAITS.inc(s.admission_waits - self._waits)
            self._waits = s.admission_waits
        return busy

    def cancel(self, handle: Job) -> None:
        self.scheduler.cancel(handle)

    def run(
        self, params: GenerationParams, on_event: Callable[[EngineEvent], None], should_cancel: Callable[[], bool]
    ) -> TrajectoryResult:
        """One trajectory to the end on its own (the CLI's path)."""
        return run_trajectory(self.engine, params, on_event=on_event, should_cancel=should_cancel)

    def usage(self, params: GenerationParams, result: TrajectoryResult) -> dict[str, int]:
        d = self.engine.cfg.latent_downsample
        return {
            "prompt_tokens": len(self.engine.tok.frame(params.prompt)),
            "text_tokens": sum(s.tokens for s in result.stages),
            "image_tokens": image_rounds(params.mode, params.rounds) * (params.width // d) * (params.height // d),
        }

    def memory(self) -> dict[str, int]:
        if self.engine.device.type != "cuda":
            return {}
        dev = self.engine.device
        return {
            "allocated": torch.cuda.memory_allocated(dev),
            "reserved": torch.cuda.memory_reserved(dev),
            "peak": torch.cuda.max_memory_allocated(dev),
            "total": torch.cuda.get_device_properties(dev).total_memory,
        }
