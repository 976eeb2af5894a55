"""The trajectories: `irg` (plan, draft, reflect, refine, ... R image rounds), `think` (plan, one image) and
`direct` (one image), built from the engine's primitives the way the official recipes build them.

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
(temperature > 0) of round k use a generator on the model's device seeded with `seed + 2R + k - 1`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from irg_core.engine import Branches, Engine
from irg_core.kv_cache import EMPTY, Context
from irg_core.params import (
    EngineEvent,
    GenerationParams,
    ParamError,
    RoundResult,
    StageTiming,
    TrajectoryResult,
    image_rounds,
)
from irg_core.previews import preview_steps, x0_estimate
from irg_core.step_cache import new_step_cache
from irg_core.tokenizer import StreamDecoder
from irg_core.transforms import VAE_TRANSFORM, VIT_TRANSFORM

EventSink = Callable[[EngineEvent], None]
T = TypeVar("T")
PROMPT_FILES = {"irg": "irg_system_prompt.txt", "think": "bagel_think_prompt.txt"}


def default_system_prompt(mode: str) -> str | None:
    """The prompt a mode's model was trained with (irg_core/data, sources in SOURCES.md); none for direct."""
    name = PROMPT_FILES.get(mode)
    return resources.files("irg_core.data").joinpath(name).read_text("utf-8") if name else None


def initial_noise(seed: int, tokens: int, dim: int) -> torch.Tensor:
    return torch.randn((tokens, dim), generator=torch.Generator("cpu").manual_seed(seed))


class _Run:
    """One trajectory's state: the events it sends, the stages it times."""

    def __init__(self, engine: Engine, params: GenerationParams, on_event: EventSink | None,
                 should_cancel: Callable[[], bool] | None, keep_tensors: bool, fixed_thoughts: bool = False):
        self.e, self.p = engine, params
        self.emit = on_event or (lambda event: None)
        self.should_cancel = should_cancel
        self.keep_tensors = keep_tensors
        self.fixed_thoughts = fixed_thoughts
        self.result = TrajectoryResult(params)
        self.n_images = image_rounds(params.mode, params.rounds)

    def _sync(self) -> None:
        if self.e.device.type == "cuda":
            torch.cuda.synchronize(self.e.device)

    def kind(self, k: int) -> str:
        return "final" if k == self.n_images else "draft"

    def timed(self, stage: str, round_index: int, fn: Callable[[], T], **counts: int) -> T:
        self._sync()
        start = time.perf_counter()
        out = fn()
        self._sync()
        self.result.stages.append(StageTiming(stage, round_index, time.perf_counter() - start, **counts))
        return out

    def think(self, ctx: Context, k: int) -> tuple[list[int], str]:
        """Decode a thought from `ctx`, streaming `thinking.*` (round 1) or `reflection.*` (later) events."""
        kind = "thinking" if k == 1 else "reflection"
        stream = StreamDecoder(self.e.tok)

        def on_token(token: int) -> None:
            piece = stream.push(token)
            if piece:
                self.emit(EngineEvent(f"{kind}.delta", {"round": k, "text": piece}))

        seed = self.p.seed + 2 * self.n_images + k - 1
        start = time.perf_counter()
        ids = self.e.decode(ctx, self.p.max_think_tokens, self.p.temperature, seed, on_token, self.should_cancel,
                            ignore_eos=self.fixed_thoughts)
        self.result.stages.append(StageTiming(kind, k, time.perf_counter() - start, tokens=len(ids)))
        tail = stream.flush()
        if tail:
            self.emit(EngineEvent(f"{kind}.delta", {"round": k, "text": tail}))
        text = self.e.tok.thought(ids)
        self.emit(EngineEvent(f"{kind}.done", {"round": k, "text": text}))
        return ids, text

    def image(self, k: int, branches: Branches) -> Image.Image:
        p, e = self.p, self.e
        g = p.guidance[k - 1]
        n = (p.width // e.cfg.latent_downsample) * (p.height // e.cfg.latent_downsample)
        noise = initial_noise(p.seed + k - 1, n, e.cfg.patch_latent_dim)

        def on_step(step: int, steps: int) -> None:
            self.emit(EngineEvent("image.progress", {"round": k, "step": step, "steps": steps}))

        cache = new_step_cache(p.cache)  # per round, never shared (the official state leaks across calls)

        def draw() -> torch.Tensor:
            return e.generate_image(branches, p.width, p.height, p.steps, g, noise, on_step, self.should_cancel,
                                    cache=cache, on_velocity=self.previewer(k))

        latent = self.timed("image", k, draw, steps=p.steps - 1)
        for key, value in cache.counts().items():  # model evaluations and forecasts of this round
            setattr(self.result.stages[-1], key, value)
        pixels = self.timed("decode", k, lambda: e.decode_latent(latent, p.width, p.height)[1])
        if self.keep_tensors:
            self.result.tensors[f"round{k}.init_noise"] = noise
            self.result.tensors[f"round{k}.final_latent"] = latent.float().cpu()
        self.emit(EngineEvent("image.done", {"round": k, "kind": self.kind(k), "width": p.width, "height": p.height},
                              image=pixels))
        return Image.fromarray(pixels)

    def previewer(self, k: int) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
        """The `on_velocity` hook of round k: at the chosen steps, x0 = x_t - t v_t drawn as `image.preview`."""
        p, e = self.p, self.e
        evaluations = p.steps - 1
        wanted = set(preview_steps(evaluations, p.previews))
        if not wanted:
            return None

        def on_velocity(i: int, t: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> None:
            if i not in wanted:
                return
            pixels = e.preview(x0_estimate(x, v, t), p.width, p.height, p.preview_decoder)
            self.emit(EngineEvent("image.preview", {"round": k, "step": i + 1, "steps": evaluations,
                                                    "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
                                                    "decoder": p.preview_decoder}, image=pixels))

        return on_velocity

    def reencode(self, k: int, ctx: Context, image: Image.Image) -> Context:
        """Put image k back into the context: its VAE block (posterior noise from seed + R + k - 1), then ViT."""
        eps_seed = self.p.seed + self.n_images + k - 1

        def run() -> Context:
            return self.e.prefill_vit_image(self.e.prefill_vae_image(ctx, image, eps_seed), image)

        return self.timed("reencode", k, run)

    def record(self, k: int, text: str | None, ids: list[int], image: Image.Image) -> None:
        self.result.rounds.append(RoundResult(k, self.kind(k), text, ids, self.p.guidance[k - 1], np.asarray(image)))


def pool_budget(engine: Engine, params: GenerationParams, prompt_tokens: int) -> tuple[int, int]:
    """Tokens and separately grown segments a trajectory can occupy in the KV pool."""
    d = engine.cfg.latent_downsample
    n_query = (params.width // d) * (params.height // d) + 2
    rounds = image_rounds(params.mode, params.rounds)
    vw, vh = VAE_TRANSFORM.target_size(params.width, params.height)
    tw, th = VIT_TRANSFORM.target_size(params.width, params.height)
    patch = engine.cfg.vit.patch_size
    per_image = (vw // d) * (vh // d) + (tw // patch) * (th // patch) + 4
    thought = params.max_think_tokens + 2
    tokens = prompt_tokens + 2 * rounds * thought + (rounds - 1) * per_image + thought + 3 * n_query
    return tokens, 6 * rounds + 8


def _check_reencode_fits(engine: Engine, params: GenerationParams) -> None:
    """A draft goes back through the VAE transform (short side >= 512): its latent grid must fit the model's."""
    if image_rounds(params.mode, params.rounds) < 2:
        return
    w, h = VAE_TRANSFORM.target_size(params.width, params.height)
    d, grid = engine.cfg.latent_downsample, engine.cfg.max_latent_size
    if max(w, h) // d > grid:
        side = "width" if w >= h else "height"
        raise ParamError(side, f"a {params.width}x{params.height} draft is re-encoded at {w}x{h}, more than this "
                               f"model's {grid}x{grid} latent grid; use a less elongated size")


def run_trajectory(engine: Engine, params: GenerationParams, on_event: EventSink | None = None,
                   should_cancel: Callable[[], bool] | None = None, keep_tensors: bool = False,
                   fixed_thoughts: bool = False) -> TrajectoryResult:
    """Run one trajectory; raises `irg_core.errors.Cancelled` when `should_cancel()` turns true.

    `fixed_thoughts` decodes exactly `max_think_tokens` per thought (ignoring `<|im_end|>`), for benchmarks.
    """
    params = params.resolved()
    params.validate(max_side=engine.cfg.max_image_side)
    _check_reencode_fits(engine, params)
    run = _Run(engine, params, on_event, should_cancel, keep_tensors, fixed_thoughts)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    start = time.perf_counter()
    system = params.system_prompt if params.system_prompt is not None else default_system_prompt(params.mode)
    tok = engine.tok
    system_ids = tok.frame(system) if system else []
    prompt_ids = tok.frame(params.prompt)
    engine.reset_pool(*pool_budget(engine, params, len(system_ids) + len(prompt_ids)))

    def prefill() -> tuple[Context, Context]:
        with_system = engine.prefill_text(EMPTY, system_ids) if system_ids else EMPTY
        return with_system, engine.prefill_text(with_system, prompt_ids)

    with_system, main = run.timed("prefill", 0, prefill)
    if params.mode == "direct":
        image = run.image(1, Branches(main, with_system, main))
        run.record(1, None, [], image)
    elif params.mode == "think":
        ids, text = run.think(main, 1)
        cond = engine.prefill_text(main, tok.frame(text))
        image = run.image(1, Branches(cond, with_system, main))
        run.record(1, text, ids, image)
    else:
        _irg(run, main, with_system)
    run.result.total_seconds = time.perf_counter() - start
    if engine.device.type == "cuda":
        run.result.peak_memory_bytes = torch.cuda.max_memory_allocated(engine.device)
    return run.result


def _irg(run: _Run, main: Context, no_text: Context) -> None:
    e = run.e
    texts = main  # the image-free context: [S, P, T_1, ...]
    for k in range(1, run.n_images + 1):
        ids, text = run.think(main, k)
        fed = e.tok.frame(text)
        main = e.prefill_text(main, fed)
        texts = main if k == 1 else e.prefill_text(texts, fed)
        image = run.image(k, Branches(main, no_text, texts if k > 1 else None))
        run.record(k, text, ids, image)
        if k < run.n_images:
            main = no_text = run.reencode(k, main, image)
