"""`run_trajectory`: one trajectory (text to image, or an edit) through a scheduler of its own, to its end.

The recipes themselves, their contexts and their seed contract are step programs in `irg_core.programs` (and
`irg_core.recipes` for edits and understanding); the worker runs many at once on one `Scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from irg_core.engine import Engine
from irg_core.params import EngineEvent, GenerationParams, ParamError, TrajectoryResult
from irg_core.programs import (  # noqa: F401  (re-exported: the public names of this module)
    PROMPT_FILES,
    check_reencode_fits,
    default_system_prompt,
    initial_noise,
    pool_budget,
    prepare,
)
from irg_core.scheduler import run_alone

EventSink = Callable[[EngineEvent], None]


def prepare_any(
    engine: Engine,
    params: GenerationParams,
    images: Sequence[Image.Image] = (),
    keep_tensors: bool = False,
    fixed_thoughts: bool = False,
) -> tuple[Any, int]:
    """The program (and worst-case KV pages) of a text-to-image trajectory or, with `params.edit` and one input
    image, of an edit (`irg_core.recipes`)."""
    if params.edit or images:
        if not params.edit or len(images) != 1:
            raise ParamError("image", "an edit takes exactly one input image (and params.edit)")
        from irg_core.recipes import prepare_edit

        return prepare_edit(engine, params, images[0], keep_tensors, fixed_thoughts)
    return prepare(engine, params, keep_tensors, fixed_thoughts)


def run_trajectory(
    engine: Engine,
    params: GenerationParams,
    on_event: EventSink | None = None,
    should_cancel: Callable[[], bool] | None = None,
    keep_tensors: bool = False,
    fixed_thoughts: bool = False,
    images: Sequence[Image.Image] = (),
) -> TrajectoryResult:
    """Run one trajectory through the scheduler; raises `irg_core.errors.Cancelled` when `should_cancel()`
    turns true, and the trajectory's own error when it fails.

    `fixed_thoughts` decodes exactly `max_think_tokens` per thought (ignoring `<|im_end|>`), for benchmarks.
    An edit (`params.edit`) takes its input image in `images` (one PIL RGB image).
    """
    program, pages = prepare_any(engine, params, images, keep_tensors, fixed_thoughts)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    result: TrajectoryResult = run_alone(engine, program, pages, on_event, should_cancel)
    if engine.device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(engine.device)
    return result
