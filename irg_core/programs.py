"""The recipes as step programs: `irg` (plan, draft, reflect, refine, ... R image rounds), `think` (plan, one
image) and `direct` (one image), built from units of model work (`irg_core.steps`) the way the official
recipes build them. Each is a generator that yields a unit, receives its result and returns a
`TrajectoryResult`; which forward a unit rides in is the scheduler's business.

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
`seed + 2R + k - 1` (`irg_core.sampling.gumbel_noise`: a hash of that seed, the token's index and the
vocabulary id), so a seed gives the same thought alone or batched, on any device.
"""

from __future__ import annotations

from collections.abc import Generator
from importlib import resources
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from irg_core.engine import Branches, Engine, guidance_branches
from irg_core.kv_cache import EMPTY, Context
from irg_core.numerics import precision
from irg_core.params import (
    EngineEvent,
    GenerationParams,
    ParamError,
    RoundGuidance,
    RoundResult,
    StageTiming,
    TrajectoryResult,
    image_rounds,
)
from irg_core.previews import downscale, preview_steps, x0_estimate
from irg_core.sampling import cfg_active, cfg_combine, timesteps
from irg_core.scheduler import Mark, elapsed
from irg_core.step_cache import StepCounter, TaylorSeer, new_step_cache
from irg_core.steps import (
    DecodeLatent,
    DecodeStep,
    Decoding,
    DenoiseLoop,
    DenoiseStep,
    Emit,
    EncodeVae,
    EncodeVit,
    Free,
    PrefillImage,
    PrefillText,
    Stamp,
)
from irg_core.tokenizer import StreamDecoder
from irg_core.transforms import VAE_TRANSFORM, VIT_TRANSFORM

PROMPT_FILES = {"irg": "irg_system_prompt.txt", "think": "bagel_think_prompt.txt"}
BRANCH_NAMES = ("cond", "no_text", "no_img")
Gen = Generator[Any, Any, Any]


def default_system_prompt(mode: str) -> str | None:
    """The prompt a mode's model was trained with (irg_core/data, sources in SOURCES.md); none for direct."""
    name = PROMPT_FILES.get(mode)
    return resources.files("irg_core.data").joinpath(name).read_text("utf-8") if name else None


def initial_noise(seed: int, tokens: int, dim: int) -> Tensor:
    return torch.randn((tokens, dim), generator=torch.Generator("cpu").manual_seed(seed))


# -- building blocks -------------------------------------------------------------------------------------------
def decode_text(
    e: Engine, ctx: Context, max_tokens: int, temperature: float, seed: int, kind: str, k: int, fixed: bool = False
) -> Gen:
    """Decode a text after `<|im_start|>` from `ctx`, streaming `{kind}.delta` events; returns (ids, text)."""
    stream = StreamDecoder(e.tok)
    seq = Decoding(ctx, max_tokens, temperature, seed)
    ids: list[int] = []
    for _ in range(max_tokens):
        token, _ = yield DecodeStep(seq)
        if token == e.tok.special.eos and not fixed:
            break
        ids.append(token)
        piece = stream.push(token)
        if piece:  # each delta says how many tokens so far (a piece of text may span several tokens)
            yield Emit(EngineEvent(f"{kind}.delta", {"round": k, "text": piece, "tokens": len(ids)}))
    yield Free(seq)
    tail = stream.flush()
    if tail:
        yield Emit(EngineEvent(f"{kind}.delta", {"round": k, "text": tail, "tokens": len(ids)}))
    return ids, e.tok.thought(ids)


def denoise_program(
    e: Engine,
    branches: Branches,
    width: int,
    height: int,
    steps: int,
    g: RoundGuidance,
    noise: Tensor,
    probes: bool = False,
    round_index: int = 1,
    mode: str = "irg",
    cache: StepCounter | None = None,
    previews: int = 0,
    preview_decoder: str = "fast",
) -> Gen:
    """Denoise `noise` [N, 64] into a packed latent [N, 64]: one `DenoiseStep` per evaluated timestep, all
    guidance branches of a step in it; CFG and the Euler update here (BAGEL `generate_image`). `mode` picks
    the state's dtype, as each official script keeps it (irg_core.numerics).

    `cache` (irg_core.step_cache, one per round) counts the model evaluations and, for a TaylorSeer, decides per
    step and branch whether the model runs or the branch's pre-final-norm hidden states are forecast: only the
    branches that run go into the `DenoiseStep`, so a cached step never makes other jobs compute. `previews`
    x0 estimates (x_t - t v_t) are drawn as `image.preview` events after their step's progress event."""
    d = e.cfg.latent_downsample
    ts = timesteps(steps, g.timestep_shift, e.device)
    on = cfg_active(ts.cpu(), g.interval)
    dts = ts[:-1] - ts[1:]
    loop = DenoiseLoop(guidance_branches(branches, g), height // d, width // d)
    cache = cache if cache is not None else StepCounter()
    wanted = set(preview_steps(steps - 1, previews))
    x = noise.to(e.device, precision(mode, e.dtype).state_dtype)
    for i in range(steps - 1):
        k = len(loop.contexts) if on[i] else 1
        vs = yield from _velocities(e, loop, x, ts[i], k, cache)
        v = cfg_combine(
            vs[0],
            vs[1] if k > 1 else None,
            vs[2] if k > 2 else None,
            g.text_scale if on[i] else 1.0,
            g.image_scale if on[i] else 1.0,
            g.renorm,
            g.renorm_min,
        )
        if probes:
            for name, vb in zip(BRANCH_NAMES, vs):
                yield Emit(EngineEvent("probe", {"name": name, "step": i, "value": vb}))
            yield Emit(EngineEvent("probe", {"name": "x_t", "step": i, "value": x}))
            yield Emit(EngineEvent("probe", {"name": "v_t", "step": i, "value": v}))
        yield Emit(EngineEvent("image.progress", {"round": round_index, "step": i + 1, "steps": steps - 1}))
        if i in wanted:
            pixels = yield from _preview(e, x0_estimate(x, v, ts[i]), width, height, preview_decoder, mode)
            yield Emit(
                EngineEvent(
                    "image.preview",
                    {
                        "round": round_index,
                        "step": i + 1,
                        "steps": steps - 1,
                        "width": int(pixels.shape[1]),
                        "height": int(pixels.shape[0]),
                        "decoder": preview_decoder,
                    },
                    image=pixels,
                )
            )
        x = x - v * dts[i]
    yield Free(loop)
    return x


def _velocities(e: Engine, loop: DenoiseLoop, x: Tensor, t: Tensor, k: int, cache: StepCounter) -> Gen:
    """The first k branches' velocities [k, N, 64] at this step: run by the model, or forecast by the cache."""
    names = list(BRANCH_NAMES[:k])
    full = cache.plan(names)
    if not cache.forecasts:
        vs, _ = yield DenoiseStep(loop, x, t, k)
        return vs
    assert isinstance(cache, TaylorSeer)
    run = tuple(b for b in range(k) if full[b])
    hs = None
    if run:
        vs, hs = yield DenoiseStep(loop, x, t, k, hidden=True, which=run)
        if len(run) == k:  # every branch ran: keep its velocities, remember its hidden states
            for b in range(k):
                cache.branch(names[b]).update(hs[b])
            return vs
    parts = []
    for b in range(k):
        state = cache.branch(names[b])
        if full[b]:
            assert hs is not None
            parts.append(hs[run.index(b)])
            state.update(parts[-1])
        else:
            parts.append(state.forecast())
    return e.velocity_from_hidden(torch.stack(parts))


def _preview(e: Engine, x0: Tensor, width: int, height: int, decoder: str, mode: str) -> Gen:
    """A small HWC uint8 picture of an x0 estimate: the fast linear map inline, or the VAE as a unit of work."""
    if decoder == "vae":
        image, _ = yield DecodeLatent(x0, width, height, mode)
        return downscale(image, width, height)
    return e.preview(x0, width, height, "fast")


def prefill_image(ctx: Context, image: Image.Image, eps_seed: int) -> Gen:
    """Put an image into a context: its VAE block (posterior noise from `eps_seed`), then its ViT block."""
    rows, _ = yield EncodeVae(image, eps_seed)
    ctx = yield PrefillImage(ctx, rows, True)
    rows = yield EncodeVit(image)
    return (yield PrefillImage(ctx, rows, False))


# -- the trajectory -------------------------------------------------------------------------------------------
class _Run:
    """One trajectory's bookkeeping inside its program: the stages it times (as marks), what it records."""

    def __init__(self, e: Engine, p: GenerationParams, keep_tensors: bool, fixed_thoughts: bool):
        self.e, self.p = e, p
        self.keep_tensors, self.fixed = keep_tensors, fixed_thoughts
        self.result = TrajectoryResult(p)
        self.n_images = image_rounds(p.mode, p.rounds)
        self.marks: list[tuple[str, int, Mark, Mark, dict[str, int]]] = []

    def kind(self, k: int) -> str:
        return "final" if k == self.n_images else "draft"

    def timed(self, stage: str, k: int, program: Gen, **counts: int) -> Gen:
        start = yield Stamp()
        out = yield from program
        end = yield Stamp()
        self.marks.append((stage, k, start, end, counts))
        return out

    def think(self, ctx: Context, k: int) -> Gen:
        """A thought from `ctx`: `thinking.*` (round 1) or `reflection.*` (later) events; returns (ids, text,
        truncated)."""
        kind = "thinking" if k == 1 else "reflection"
        seed = self.p.seed + 2 * self.n_images + k - 1
        start = yield Stamp()
        ids, text = yield from decode_text(
            self.e, ctx, self.p.max_think_tokens, self.p.temperature, seed, kind, k, self.fixed
        )
        end = yield Stamp()
        self.marks.append((kind, k, start, end, {"tokens": len(ids)}))
        # decoding stops before <|im_end|>: a thought as long as the limit never ended (cut, then fed back as is)
        truncated = len(ids) >= self.p.max_think_tokens and not self.fixed
        yield Emit(EngineEvent(f"{kind}.done", {"round": k, "text": text, "tokens": len(ids), "truncated": truncated}))
        return ids, text, truncated

    def image(self, k: int, branches: Branches) -> Gen:
        p, e = self.p, self.e
        n = (p.width // e.cfg.latent_downsample) * (p.height // e.cfg.latent_downsample)
        noise = initial_noise(p.seed + k - 1, n, e.cfg.patch_latent_dim)
        cache = new_step_cache(p.cache)  # per round, never shared (the official state leaks across calls)
        draw = denoise_program(
            e,
            branches,
            p.width,
            p.height,
            p.steps,
            p.guidance[k - 1],
            noise,
            round_index=k,
            mode=p.mode,
            cache=cache,
            previews=p.previews,
            preview_decoder=p.preview_decoder,
        )
        latent = yield from self.timed("image", k, draw, steps=p.steps - 1)
        self.marks[-1][4].update(cache.counts())  # model evaluations and forecasts of this round
        _, pixels = yield from self.timed("decode", k, _unit(DecodeLatent(latent, p.width, p.height, p.mode)))
        if self.keep_tensors:
            self.result.tensors[f"round{k}.init_noise"] = noise
            self.result.tensors[f"round{k}.final_latent"] = latent.float().cpu()
        yield Emit(
            EngineEvent(
                "image.done", {"round": k, "kind": self.kind(k), "width": p.width, "height": p.height}, image=pixels
            )
        )
        return Image.fromarray(pixels)

    def reencode(self, k: int, ctx: Context, image: Image.Image) -> Gen:
        """Put image k back into the context: its VAE block (posterior noise from seed + R + k - 1), then ViT."""
        return (yield from self.timed("reencode", k, prefill_image(ctx, image, self.p.seed + self.n_images + k - 1)))

    def record(self, k: int, text: str | None, ids: list[int], image: Image.Image, truncated: bool = False) -> None:
        self.result.rounds.append(
            RoundResult(k, self.kind(k), text, ids, self.p.guidance[k - 1], np.asarray(image), truncated)
        )

    def finish(self, start: Mark) -> Gen:
        """The result, its stage timings resolved and its total measured from `start`."""
        end = yield Stamp()
        self.result.stages = [StageTiming(stage, k, elapsed(a, b), **counts) for stage, k, a, b, counts in self.marks]
        self.result.total_seconds = elapsed(start, end)
        return self.result


def _unit(unit: Any) -> Gen:
    return (yield unit)


def trajectory_program(
    e: Engine, params: GenerationParams, keep_tensors: bool = False, fixed_thoughts: bool = False
) -> Gen:
    """The whole trajectory of `params` (already resolved and validated) as one step program."""
    run = _Run(e, params, keep_tensors, fixed_thoughts)
    start = yield Stamp()
    system = params.system_prompt if params.system_prompt is not None else default_system_prompt(params.mode)
    tok = e.tok
    system_ids = tok.frame(system) if system else []

    def prefill() -> Gen:
        with_system = (yield PrefillText(EMPTY, system_ids)) if system_ids else EMPTY
        return with_system, (yield PrefillText(with_system, tok.frame(params.prompt)))

    with_system, main = yield from run.timed("prefill", 0, prefill())
    if params.mode == "irg":
        yield from _irg(run, main, with_system)
    else:
        yield from one_image(run, main, with_system, main)
    return (yield from run.finish(start))


def one_image(run: _Run, main: Context, no_text: Context, no_img: Context) -> Gen:
    """BAGEL's single-image modes after the prefill: `direct` draws from `main`; `think` first decodes a
    thought from it and adds it to the conditional context only."""
    if run.p.mode == "direct":
        image = yield from run.image(1, Branches(main, no_text, no_img))
        run.record(1, None, [], image)
        return
    ids, text, truncated = yield from run.think(main, 1)
    cond = yield PrefillText(main, run.e.tok.frame(text))
    image = yield from run.image(1, Branches(cond, no_text, no_img))
    run.record(1, text, ids, image, truncated)


def _irg(run: _Run, main: Context, no_text: Context) -> Gen:
    tok = run.e.tok
    texts = main  # the image-free context: [S, P, T_1, ...]
    for k in range(1, run.n_images + 1):
        ids, text, truncated = yield from run.think(main, k)
        fed = tok.frame(text)
        main = yield PrefillText(main, fed)
        texts = main if k == 1 else (yield PrefillText(texts, fed))
        image = yield from run.image(k, Branches(main, no_text, texts if k > 1 else None))
        run.record(k, text, ids, image, truncated)
        if k < run.n_images:
            main = no_text = yield from run.reencode(k, main, image)


# -- what a trajectory needs up front ----------------------------------------------------------------------------
def pool_budget(engine: Engine, params: GenerationParams, prompt_tokens: int) -> tuple[int, int]:
    """Tokens and separately grown segments a trajectory can occupy in the KV pool (its worst case)."""
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


def check_reencode_fits(engine: Engine, params: GenerationParams) -> None:
    """A draft goes back through the VAE transform (short side >= 512): its latent grid must fit the model's."""
    if image_rounds(params.mode, params.rounds) < 2:
        return
    w, h = VAE_TRANSFORM.target_size(params.width, params.height)
    d, grid = engine.cfg.latent_downsample, engine.cfg.max_latent_size
    if max(w, h) // d > grid:
        side = "width" if w >= h else "height"
        raise ParamError(
            side,
            f"a {params.width}x{params.height} draft is re-encoded at {w}x{h}, more than this "
            f"model's {grid}x{grid} latent grid; use a less elongated size",
        )


def prepare(
    engine: Engine, params: GenerationParams, keep_tensors: bool = False, fixed_thoughts: bool = False
) -> tuple[Gen, int]:
    """Resolve and validate `params`; the trajectory's program and the KV pages it needs at worst."""
    params = params.resolved()
    params.validate(max_side=engine.cfg.max_image_side)
    check_reencode_fits(engine, params)
    system = params.system_prompt if params.system_prompt is not None else default_system_prompt(params.mode)
    prompt_tokens = len(engine.tok.frame(system)) if system else 0
    prompt_tokens += len(engine.tok.frame(params.prompt))
    pages = engine.pages_for(*pool_budget(engine, params, prompt_tokens))
    return trajectory_program(engine, params, keep_tensors, fixed_thoughts), pages
