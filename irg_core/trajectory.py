"""The trajectories: `irg` (plan, draft, reflect, refine, ... R image rounds), `think` (plan, one image) and
`direct` (one image): `run_trajectory` drives one trajectory through the scheduler to the end. The recipes
themselves are step programs in `irg_core.programs`; the worker runs many at once on one `Scheduler`.

IRG (Osilly/Interleaving-Reasoning-Generation `tiif_multi_turn_gen.py`, BAGEL_SPEC §10), with S the system
prompt, P the prompt, T_k the k-th thought and I_k the k-th image (VAE block then ViT block):
- round 1: cond = [S, P, T_1]; without text = [S].
- round k >= 2: cond = [S, P, T_1, I_1, ..., T_{k-1}, I_{k-1}, T_k]; without text = cond minus T_k;
  without image = [S, P, T_1, ..., T_k] (texts only, so its RoPE positions differ from cond's).
All contexts are views of one KV pool; the text-only context extends [S, P, T_1] in place instead of
re-prefilling it.

Seeds (the reproducibility contract): round k's initial noise is
`randn((tokens, 64), generator=Generator('cpu').manual_seed(seed + k - 1))`; the VAE posterior noise when
image k is put back into the context comes from `manual_seed(seed + R + k - 1)`; sampled thoughts
(temperature > 0) of round k draw their Gumbel-max noise from the counter-based stream keyed by
`seed + 2R + k - 1` (`irg_core.sampling`), so the same seed gives the same thought alone or batched.
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
from irg_core.scheduler import CANCELLED, FAILED, Scheduler

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
    scheduler = Scheduler(engine, max_active=1)
    job = scheduler.submit(program, pages, on_event, should_cancel)
    scheduler.run([job])
    if job.status in (CANCELLED, FAILED):
        assert job.error is not None
        raise job.error
    result: TrajectoryResult = job.result
    if engine.device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(engine.device)
    return result
