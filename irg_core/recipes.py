"""Recipes over an input image: editing (`direct`, `think`, `irg`) and image understanding.

Inputs are already-decoded PIL RGB images (the server converts uploads the way the official `pil_img2rgb`
does; nothing here reads files). Each recipe is a step program (`irg_core.steps`) that the scheduler runs beside
any others; `run_edit` / `run_understanding` drive one alone.

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

from collections.abc import Callable, Generator, Sequence
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
from irg_core.programs import _Run, default_system_prompt, one_image, prefill_image
from irg_core.scheduler import drive, elapsed, run_alone
from irg_core.steps import DecodeStep, Decoding, Emit, EncodeVit, Free, PrefillImage, PrefillText, Stamp
from irg_core.tokenizer import StreamDecoder
from irg_core.transforms import VAE_TRANSFORM, VIT_TRANSFORM

EventSink = Callable[[EngineEvent], None]
Gen = Generator[Any, Any, Any]
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
        raise ParamError(
            "image",
            f"the input is resized to {width}x{height}, more than this model's "
            f"{grid * d}x{grid * d} latent grid; use a less elongated image",
        )
    vit_side = engine.cfg.vit_max_num_patch_per_side
    tw, th = VIT_TRANSFORM.target_size(width, height)
    if max(tw, th) // engine.cfg.vit.patch_size > vit_side:
        raise ParamError(
            "image",
            f"the input is seen by the ViT at {tw}x{th}, more than its {vit_side} patches "
            f"per side; use a less elongated image",
        )


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


def edit_contexts_program(
    system_ids: list[int], instruction_ids: list[int], resized: Image.Image, eps_seed: int
) -> Gen:
    """An edit's three starting contexts: ([S?, X], [S?, X, I], [S?, I]); X = VAE block then ViT block of the
    VAE-resized input (posterior noise from `eps_seed`)."""
    s = (yield PrefillText(EMPTY, system_ids)) if system_ids else EMPTY
    x = yield from prefill_image(s, resized, eps_seed)
    return x, (yield PrefillText(x, instruction_ids)), (yield PrefillText(s, instruction_ids))


def edit_contexts(
    engine: Engine, system_ids: list[int], instruction_ids: list[int], resized: Image.Image, eps_seed: int
) -> tuple[Context, Context, Context]:
    """`edit_contexts_program` run alone (the pool must have room; tests look at one stage at a time)."""
    return drive(engine, edit_contexts_program(system_ids, instruction_ids, resized, eps_seed))


def resolve_edit(engine: Engine, params: GenerationParams, image: Image.Image) -> tuple[GenerationParams, Image.Image]:
    """The edit's parameters with the output size the input gives, validated, and the VAE-resized input."""
    if not params.edit:
        raise ParamError("edit", "an edit needs params with edit=True")
    resized = edit_input(image)
    width, height = resized.size
    params = replace(params, width=width, height=height).resolved()
    params.validate(max_side=engine.cfg.max_image_side)
    _check_image_fits(engine, width, height)
    return params, resized


def edit_program(
    engine: Engine,
    params: GenerationParams,
    resized: Image.Image,
    keep_tensors: bool = False,
    fixed_thoughts: bool = False,
) -> Gen:
    """Edit the VAE-resized input following `params.prompt` (params from `resolve_edit`), as a step program."""
    run = _Run(engine, params, keep_tensors, fixed_thoughts)
    start = yield Stamp()
    system = params.system_prompt if params.system_prompt is not None else default_system_prompt(params.mode)
    tok = engine.tok
    system_ids = tok.frame(system) if system else []
    contexts = edit_contexts_program(system_ids, tok.frame(params.prompt), resized, input_eps_seed(params))
    with_image, main, texts = yield from run.timed("prefill", 0, contexts)
    if params.mode == "irg":
        yield from _irg_edit(run, main, with_image, texts)
    else:
        yield from one_image(run, main, with_image, texts)
    return (yield from run.finish(start))


def prepare_edit(
    engine: Engine,
    params: GenerationParams,
    image: Image.Image,
    keep_tensors: bool = False,
    fixed_thoughts: bool = False,
) -> tuple[Gen, int]:
    """An edit's program and the KV pages it needs at worst."""
    params, resized = resolve_edit(engine, params, image)
    system = params.system_prompt if params.system_prompt is not None else default_system_prompt(params.mode)
    text_tokens = (len(engine.tok.frame(system)) if system else 0) + len(engine.tok.frame(params.prompt))
    pages = engine.pages_for(*edit_pool_budget(engine, params, text_tokens))
    return edit_program(engine, params, resized, keep_tensors, fixed_thoughts), pages


def run_edit(
    engine: Engine,
    params: GenerationParams,
    image: Image.Image,
    on_event: EventSink | None = None,
    should_cancel: Callable[[], bool] | None = None,
    keep_tensors: bool = False,
    fixed_thoughts: bool = False,
) -> TrajectoryResult:
    """Edit `image` (PIL RGB) following `params.prompt`; `params.width/height` are replaced by the edit size."""
    return run_alone(
        engine, *prepare_edit(engine, params, image, keep_tensors, fixed_thoughts), on_event, should_cancel
    )


def _irg_edit(run: _Run, main: Context, no_text: Context, texts: Context) -> Gen:
    """Think -> draft edit -> reflect -> ... -> final edit; the input image stays in cond and no_text."""
    tok = run.e.tok
    instruction_only = texts  # [S, I]
    for k in range(1, run.n_images + 1):
        ids, text, truncated = yield from run.think(main, k)
        fed = tok.frame(text)
        main = yield PrefillText(main, fed)
        texts = yield PrefillText(texts, fed)
        # round 1's image-free branch is [S, I] as in the official think edit (the thought goes to cond only)
        out = yield from run.image(k, Branches(main, no_text, texts if k > 1 else instruction_only))
        run.record(k, text, ids, out, truncated)
        if k < run.n_images:
            main = no_text = yield from run.reencode(k, main, out)


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


def understanding_pool_budget(
    engine: Engine, sizes: Sequence[tuple[int, int]], text_tokens: int, max_tokens: int
) -> tuple[int, int]:
    tokens = text_tokens + sum(image_block_tokens(engine, w, h, vae=False) for w, h in sizes) + max_tokens + 2
    return tokens, 2 * len(sizes) + 8


def understanding_context_program(engine: Engine, params: UnderstandingParams, resized: Sequence[Image.Image]) -> Gen:
    """Prefill [V?, X_1 (ViT), ..., X_n (ViT), Q]; returns the context the answer follows."""
    system = (
        params.system_prompt
        if params.system_prompt is not None
        else (vlm_think_system_prompt() if params.think else None)
    )
    tok = engine.tok
    ctx = (yield PrefillText(EMPTY, tok.frame(system))) if system else EMPTY
    for im in resized:
        rows = yield EncodeVit(im)
        ctx = yield PrefillImage(ctx, rows, False)
    return (yield PrefillText(ctx, tok.frame(params.question)))


def understanding_context(engine: Engine, params: UnderstandingParams, images: Sequence[Image.Image]) -> Context:
    """`understanding_context_program` run alone on a reset pool (tests look at the context)."""
    resized = _understanding_inputs(engine, images)
    engine.reset_pool()
    return drive(engine, understanding_context_program(engine, params, resized))


def _understanding_inputs(engine: Engine, images: Sequence[Image.Image]) -> list[Image.Image]:
    if not images:
        raise ParamError("images", "understanding needs at least one image")
    resized = [edit_input(im) for im in images]
    for im in resized:
        _check_image_fits(engine, *im.size)
    return resized


def understanding_program(
    engine: Engine, params: UnderstandingParams, resized: Sequence[Image.Image], keep_logits: bool = False
) -> Gen:
    """Answer `params.question` about the VAE-resized images, streaming `answer.delta` / `answer.done`."""
    result = UnderstandingResult(params)
    t0 = yield Stamp()
    ctx = yield from understanding_context_program(engine, params, resized)
    t1 = yield Stamp()
    result.context_length, result.context_rope = ctx.length, ctx.rope
    stream = StreamDecoder(engine.tok)
    seq = Decoding(ctx, params.max_tokens, params.temperature, params.seed)
    ids: list[int] = []
    for _ in range(params.max_tokens):
        token, logits = yield DecodeStep(seq, logits=keep_logits and not ids)
        if logits is not None:
            result.logits0 = logits.detach().float().cpu().clone()
        if token == engine.tok.special.eos:
            break
        ids.append(token)
        piece = stream.push(token)
        if piece:
            yield Emit(EngineEvent("answer.delta", {"text": piece, "tokens": len(ids)}))
    yield Free(seq)
    tail = stream.flush()
    if tail:
        yield Emit(EngineEvent("answer.delta", {"text": tail, "tokens": len(ids)}))
    t2 = yield Stamp()
    result.token_ids = ids
    result.text = engine.tok.thought(ids)
    yield Emit(EngineEvent("answer.done", {"text": result.text, "tokens": len(ids)}))
    result.stages = [
        StageTiming("prefill", 0, elapsed(t0, t1)),
        StageTiming("answer", 0, elapsed(t1, t2), tokens=len(ids)),
    ]
    result.total_seconds = elapsed(t0, t2)
    return result


def prepare_understanding(
    engine: Engine, params: UnderstandingParams, images: Sequence[Image.Image], keep_logits: bool = False
) -> tuple[Gen, int]:
    """An understanding job's program and the KV pages it needs at worst."""
    params.validate()
    resized = _understanding_inputs(engine, images)
    system = (
        params.system_prompt
        if params.system_prompt is not None
        else (vlm_think_system_prompt() if params.think else None)
    )
    text_tokens = (len(engine.tok.frame(system)) if system else 0) + len(engine.tok.frame(params.question))
    budget = understanding_pool_budget(engine, [im.size for im in resized], text_tokens, params.max_tokens)
    return understanding_program(engine, params, resized, keep_logits), engine.pages_for(*budget)


def run_understanding(
    engine: Engine,
    params: UnderstandingParams,
    images: Sequence[Image.Image],
    on_event: EventSink | None = None,
    should_cancel: Callable[[], bool] | None = None,
    keep_logits: bool = False,
) -> UnderstandingResult:
    """Answer `params.question` about `images` (PIL RGB, in order), streaming `answer.delta` / `answer.done`."""
    return run_alone(engine, *prepare_understanding(engine, params, images, keep_logits), on_event, should_cancel)
