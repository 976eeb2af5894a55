"""The engine behind a worker: load a model, warm it up, run trajectories (the only server module that
imports torch and the model code)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from irg_core.engine import Engine
from irg_core.params import EngineEvent, GenerationParams, TrajectoryResult, image_rounds
from irg_core.trajectory import run_trajectory

log = logging.getLogger(__name__)
WARMUP = GenerationParams(prompt="warm-up", mode="irg", rounds=2, width=64, height=64, steps=3, seed=0,
                          max_think_tokens=4, previews=1)  # previews: fits the fast preview map at start


class EngineRunner:
    def __init__(self, engine: Engine, model: str = ""):
        self.engine = engine
        self.model = model
        self.device = str(engine.device)

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

    def run(self, params: GenerationParams, on_event: Callable[[EngineEvent], None],
            should_cancel: Callable[[], bool]) -> TrajectoryResult:
        try:
            return run_trajectory(self.engine, params, on_event=on_event, should_cancel=should_cancel)
        except torch.OutOfMemoryError:
            if self.engine.device.type == "cuda":
                torch.cuda.empty_cache()
            raise

    def usage(self, params: GenerationParams, result: TrajectoryResult) -> dict[str, int]:
        d = self.engine.cfg.latent_downsample
        return {"prompt_tokens": len(self.engine.tok.frame(params.prompt)),
                "text_tokens": sum(s.tokens for s in result.stages),
                "image_tokens": image_rounds(params.mode, params.rounds) * (params.width // d) * (params.height // d)}

    def memory(self) -> dict[str, int]:
        if self.engine.device.type != "cuda":
            return {}
        dev = self.engine.device
        return {"allocated": torch.cuda.memory_allocated(dev), "reserved": torch.cuda.memory_reserved(dev),
                "peak": torch.cuda.max_memory_allocated(dev)}
