"""Recipes over an input image: editing (`direct`, `think`, `irg`) and image understanding.

Inputs are already-decoded PIL RGB images (the server converts uploads the way the official `pil_img2rgb`
does; nothing here reads files). Each recipe is a plain function over the engine's primitives, so a scheduler
can replay it step for step.

Official editing (ByteDance-Seed/Bagel `InterleaveInferencer.interleave_inference([image, instruction])`),
with S the think system prompt, X the input image (VAE block, then ViT block), I the instruction, T the thought:
- the input is resized once by the VAE transform (`edit_input`); that image is both what the VAE encodes and
  what the ViT transform re-resizes, and its size is the output size (`edit_size`);
- `direct`: cond = [X, I]; without text = [X]; without image = [I];
- `think`: the thought is decoded from [S, X, I] and added to cond only: cond = [S, X, I, T];
  without text = [S, X]; without image = [S, I];
- seeds: initial noise from `seed`, the input's VAE posterior noise from `seed + 1`.

IRG editing (ours; the IRG recipe of `irg_core.trajectory` with the input image where the draft is):
- round 1 as the official think edit: cond = [S, X, I, T1]; without text = [S, X]; without image = [S, I];
- round k >= 2 as IRG's later rounds: cond = [S, X, I, T1, D1, ..., D_{k-1}, T_k] (D: draft, VAE then ViT);
  without text = cond minus T_k; without image = [S, I, T1, ..., T_k] (texts only);
  S is the IRG system prompt; thought k is decoded from cond minus T_k;
- seeds with R image rounds: round k's noise from `seed + k - 1`, draft k's posterior noise from
  `seed + R + k - 1`, sampled thought k from `seed + 2R + k - 1` (as text-to-image IRG) and the input's
  posterior noise from `seed + 3R` (the first seed no other draw uses).

Understanding (`understanding_output=True`): each image VAE-resized, then through the ViT only (no VAE, no
noise); context [V?, X_vit..., Q] with V = `VLM_THINK_SYSTEM_PROMPT` when thinking; one text decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import torch
from PIL import Image

from irg_core.engine import Branches, Engine
from irg_core.kv_cache import EMPTY, Context
from irg_core.params import (
    EngineEvent,
    GenerationParams,
    ParamError,
    StageTiming,
    TrajectoryResult,
    UnderstandingParams,
    image_rounds,
)
from irg_core.tokenizer import StreamDecoder
from irg_core.transforms import VAE_TRANSFORM, VIT_TRANSFORM

EventSink = Callable[[EngineEvent], None]
_RunLike = Any  # irg_core.trajectory._Run (imported lazily: trajectory dispatches edits here)
VLM_THINK_PROMPT_FILE = "bagel_vlm_think_prompt.txt"


# -- pure helpers -------------------------------------------------------------------------------------
def vlm_think_system_prompt() -> str:
    """BAGEL's `VLM_THINK_SYSTEM_PROMPT` (irg_core/data, source in SOURCES.md)."""
    return resources.files("irg_core.data").joinpath(VLM_THINK_PROMPT_FILE).read_text("utf-8")


def edit_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of an edit of a `width` x `height` input: the VAE transform's resize of the input."""
    return VAE_TRANSFORM.target_size(width, height)


def edit_input(image: Image.Image) -> Image.Image:
    """The input as the official code puts it into a context: resized once by the VAE transform."""
    if image.mode != "RGB":
        raise ParamError("image", f"must be an RGB image, not mode {image.mode}")
    return VAE_TRANSFORM.resize(image)


def input_eps_seed(params: GenerationParams) -> int:
    """The seed of the input image's VAE posterior noise (see the module docstring)."""
    rounds = image_rounds(params.mode, params.rounds)
    return params.seed + 1 if params.mode != "irg" else params.seed + 3 * rounds


def image_block_tokens(engine: Engine, width: int, height: int, vae: bool = True) -> int:
    """KV tokens of an image of this (already VAE-resized) size: VAE block (if `vae`) + ViT block."""
    d, patch = engine.cfg.latent_downsample, engine.cfg.vit.patch_size
    tw, th = VIT_TRANSFORM.target_size(width, height)
    return ((width // d) * (height // d) + 2 if vae else 0) + (tw // patch) * (th // patch) + 2


def _check_image_fits(engine: Engine, width: int, height: int) -> None:
    grid, d = engine.cfg.max_latent_size, engine.cfg.latent_downsample
    if max(width, height) // d > grid:
        raise ParamError("image", f"the input is resized to {width}x{height}, more than this model's "
                                  f"{grid * d}x{grid * d} latent grid; use a less elongated image")
    vit_side = engine.cfg.vit_max_num_patch_per_side
    tw, th = VIT_TRANSFORM.target_size(width, height)
    if max(tw, th) // engine.cfg.vit.patch_size > vit_side:
        raise ParamError("image", f"the input is seen by the ViT at {tw}x{th}, more than its {vit_side} patches "
                                  f"per side; use a less elongated image")


# -- editing ------------------------------------------------------------------------------------------
def edit_pool_budget(engine: Engine, params: GenerationParams, text_tokens: int) -> tuple[int, int]:
    """Tokens and segments an edit can occupy in the pool (`text_tokens`: system prompt + instruction)."""
    d = engine.cfg.latent_downsample
    n_query = (params.width // d) * (params.height // d) + 2
    rounds = image_rounds(params.mode, params.rounds)
    per_image = image_block_tokens(engine, params.width, params.height)
    thought = params.max_think_tokens + 2
    tokens = 2 * text_tokens + rounds * per_image + (2 * rounds + 1) * thought + 3 * n_query
    return tokens, 6 * rounds + 10


def edit_contexts(engine: Engine, system_ids: list[int], instruction_ids: list[int], resized: Image.Image,
                  eps_seed: int) -> tuple[Context, Context, Context]:
    """Prefill an edit's three starting contexts: ([S?, X], [S?, X, I], [S?, I]); X = VAE block then ViT block of
    the VAE-resized input (posterior noise from `eps_seed`). The pool must have been reset."""
    s = engine.prefill_text(EMPTY, system_ids) if system_ids else EMPTY
    x = engine.prefill_vit_image(engine.prefill_vae_image(s, resized, eps_seed), resized)
    return x, engine.prefill_text(x, instruction_ids), engine.prefill_text(s, instruction_ids)


def run_edit(engine: Engine, params: GenerationParams, image: Image.Image, on_event: EventSink | None = None,
             should_cancel: Callable[[], bool] | None = None, keep_tensors: bool = False,
             fixed_thoughts: bool = False) -> TrajectoryResult:
    """Edit `image` (PIL RGB) following `params.prompt`; `params.width/height` are replaced by the edit size."""
    from irg_core.trajectory import _Run, default_system_prompt  # the shared round machinery (no cycle at import)

    if not params.edit:
        raise ParamError("edit", "run_edit needs params with edit=True")
    resized = edit_input(image)
    width, height = resized.size
    params = replace(params, width=width, height=height).resolved()
    params.validate(max_side=engine.cfg.max_image_side)
    _check_image_fits(engine, width, height)
    run = _Run(engine, params, on_event, should_cancel, keep_tensors, fixed_thoughts)
    start = time.perf_counter()
    system = params.system_prompt if params.system_prompt is not None else default_system_prompt(params.mode)
    tok = engine.tok
    system_ids = tok.frame(system) if system else []
    instruction_ids = tok.frame(params.prompt)
    engine.reset_pool(*edit_pool_budget(engine, params, len(system_ids) + len(instruction_ids)))

    def prefill() -> tuple[Context, Context, Context]:
        return edit_contexts(engine, system_ids, instruction_ids, resized, input_eps_seed(params))

    with_image, main, texts = run.timed("prefill", 0, prefill)
    if params.mode == "direct":
        out = run.image(1, Branches(main, with_image, texts))
        run.record(1, None, [], out)
    elif params.mode == "think":
        ids, text = run.think(main, 1)
        cond = engine.prefill_text(main, tok.frame(text))
        out = run.image(1, Branches(cond, with_image, texts))
        run.record(1, text, ids, out)
    else:
        _irg_edit(run, main, with_image, texts)
    run.result.total_seconds = time.perf_counter() - start
    return run.result


def _irg_edit(run: _RunLike, main: Context, no_text: Context, texts: Context) -> None:
    """Think -> draft edit -> reflect -> ... -> final edit; the input image stays in cond and no_text."""
    e = run.e
    instruction_only = texts  # [S, I]
    for k in range(1, run.n_images + 1):
        ids, text = run.think(main, k)
        fed = e.tok.frame(text)
        main = e.prefill_text(main, fed)
        texts = e.prefill_text(texts, fed)
        # round 1's image-free branch is [S, I] as in the official think edit (the thought goes to cond only)
        out = run.image(k, Branches(main, no_text, texts if k > 1 else instruction_only))
        run.record(k, text, ids, out)
        if k < run.n_images:
            main = no_text = run.reencode(k, main, out)


# -- understanding ------------------------------------------------------------------------------------
@dataclass(slots=True)
class UnderstandingResult:
    params: UnderstandingParams
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logits0: torch.Tensor | None = None  # the first step's full-vocabulary logits (float32), when asked
    stages: list[StageTiming] = field(default_factory=list)
    total_seconds: float = 0.0
    context_length: int = 0  # kv tokens before the answer (the official kv_len at gen_text)
    context_rope: int = 0  # RoPE position of the start token


def understanding_pool_budget(engine: Engine, sizes: Sequence[tuple[int, int]], text_tokens: int,
                              max_tokens: int) -> tuple[int, int]:
    tokens = text_tokens + sum(image_block_tokens(engine, w, h, vae=False) for w, h in sizes) + max_tokens + 2
    return tokens, 2 * len(sizes) + 8


def understanding_context(engine: Engine, params: UnderstandingParams,
                          images: Sequence[Image.Image]) -> Context:
    """Prefill [V?, X_1 (ViT), ..., X_n (ViT), Q] into a fresh pool; returns the context the answer follows."""
    resized = [edit_input(im) for im in images]
    for im in resized:
        _check_image_fits(engine, *im.size)
    system = params.system_prompt if params.system_prompt is not None else (
        vlm_think_system_prompt() if params.think else None)
    tok = engine.tok
    system_ids = tok.frame(system) if system else []
    question_ids = tok.frame(params.question)
    engine.reset_pool(*understanding_pool_budget(engine, [im.size for im in resized],
                                                 len(system_ids) + len(question_ids), params.max_tokens))
    ctx = engine.prefill_text(EMPTY, system_ids) if system_ids else EMPTY
    for im in resized:
        ctx = engine.prefill_vit_image(ctx, im)
    return engine.prefill_text(ctx, question_ids)


def run_understanding(engine: Engine, params: UnderstandingParams, images: Sequence[Image.Image],
                      on_event: EventSink | None = None, should_cancel: Callable[[], bool] | None = None,
                      keep_logits: bool = False) -> UnderstandingResult:
    """Answer `params.question` about `images` (PIL RGB, in order), streaming `answer.delta` / `answer.done`."""
    params.validate()
    if not images:
        raise ParamError("images", "understanding needs at least one image")
    emit = on_event or (lambda event: None)
    result = UnderstandingResult(params)
    start = time.perf_counter()
    ctx = understanding_context(engine, params, images)
    result.stages.append(StageTiming("prefill", 0, time.perf_counter() - start))
    result.context_length, result.context_rope = ctx.length, ctx.rope
    stream = StreamDecoder(engine.tok)

    def on_token(token: int) -> None:
        piece = stream.push(token)
        if piece:
            emit(EngineEvent("answer.delta", {"text": piece}))

    def on_logits(logits: torch.Tensor) -> None:
        if result.logits0 is None:
            result.logits0 = logits.detach().float().cpu().clone()

    t0 = time.perf_counter()
    ids = engine.decode(ctx, params.max_tokens, params.temperature, params.seed, on_token, should_cancel,
                        on_logits=on_logits if keep_logits else None)
    result.stages.append(StageTiming("answer", 0, time.perf_counter() - t0, tokens=len(ids)))
    tail = stream.flush()
    if tail:
        emit(EngineEvent("answer.delta", {"text": tail}))
    result.token_ids = ids
    result.text = engine.tok.thought(ids)
    emit(EngineEvent("answer.done", {"text": result.text, "tokens": len(ids)}))
    result.total_seconds = time.perf_counter() - start
    return result
