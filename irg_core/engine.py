"""The engine's primitives over KV contexts: prefill text and images, decode text, draw an image.

Each primitive takes a `Context` and returns a new one (or tokens / a latent); contexts live in one paged
KV pool (`irg_core.kv_cache`) and share prefixes for free. The recipes that chain these primitives into a
trajectory are in `irg_core.trajectory`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from irg_core.attention import AttnMeta, Seq
from irg_core.errors import Cancelled
from irg_core.kv_cache import Context, KVPool, pages_needed
from irg_core.loader import LoadedModel
from irg_core.model.qwen2_mot import rope_tables
from irg_core.params import RoundGuidance
from irg_core.previews import LatentRGB, downscale, fast_preview, fit_latent_rgb
from irg_core.sampling import cfg_active, cfg_combine, sample_flow, timesteps
from irg_core.step_cache import StepCounter, TaylorSeer
from irg_core.transforms import VAE_TRANSFORM, VIT_TRANSFORM, grid_position_ids, patchify, to_uint8, unpatchify

DEFAULT_PAGE_SIZE = 256
BRANCH_NAMES = ("cond", "no_text", "no_img")


@dataclass(frozen=True, slots=True)
class _Batch:
    """Everything about a forward's rows except their values: RoPE tables, KV slots, attention layout."""

    rope: tuple[Tensor, Tensor]
    slots: Tensor
    meta: AttnMeta
    n_gen: int
    gen_mode: bool


@dataclass(frozen=True, slots=True)
class Branches:
    """The contexts of one image round: conditional, without text, without the image (None: unused)."""

    cond: Context
    no_text: Context | None = None
    no_img: Context | None = None


class Engine:
    def __init__(self, loaded: LoadedModel, page_size: int = DEFAULT_PAGE_SIZE):
        self.model, self.vae, self.tok = loaded.model, loaded.vae, loaded.tokenizer
        self.cfg = loaded.cfg
        self.device, self.dtype = loaded.device, loaded.dtype
        self.page_size = page_size
        self.pool: KVPool | None = None
        # KV is bfloat16 as in the official code; with float32 weights it is kept in float32 holding bf16 values.
        self.kv_dtype = torch.float32 if self.dtype == torch.float32 else torch.bfloat16
        self._latent_rgb: LatentRGB | None = None  # the fast preview map, fitted on first use

    # -- pool ---------------------------------------------------------------------------------------
    def reset_pool(self, tokens: int, segments: int) -> KVPool:
        """An empty pool with room for `tokens` in `segments` separately grown pieces (reused when big enough)."""
        pages = pages_needed(tokens, self.page_size) + segments + 2
        if self.pool is None or self.pool.num_pages < pages:
            self.pool = None  # free the old buffers first
            self.pool = KVPool(self.cfg.llm, pages, self.page_size, self.device, self.kv_dtype)
        self.pool.reset()
        return self.pool

    def _forward(self, x: Tensor, batch: _Batch) -> Tensor:
        assert self.pool is not None
        return self.model.language_model(x, batch.rope, batch.n_gen, batch.gen_mode, self.pool.layers,
                                         batch.slots, batch.meta)

    def _batch(self, positions: Tensor, slots: Tensor, seqs: list[Seq], causal: bool, n_gen: int = 0,
               gen_mode: bool = False) -> _Batch:
        rope = rope_tables(self.cfg.llm, positions.to(self.device), self.dtype)
        return _Batch(rope, slots, AttnMeta(seqs, causal), n_gen, gen_mode)

    def _markers(self) -> Tensor:
        ids = torch.tensor([self.tok.special.start_of_image, self.tok.special.end_of_image], device=self.device)
        return self.model.embed_tokens(ids)  # [2, hidden]

    # -- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_text(self, ctx: Context, ids: list[int]) -> Context:
        """A [bos ... eos] text segment, causal, positions rope .. rope + n - 1."""
        assert self.pool is not None
        n = len(ids)
        new, slots = self.pool.extend(ctx, n)
        x = self.model.embed_tokens(torch.tensor(ids, device=self.device))
        positions = torch.arange(ctx.rope, ctx.rope + n)
        self._forward(x, self._batch(positions, slots, [Seq(0, n, new.pages, new.length)], causal=True))
        return new.advanced(n)

    def _prefill_image_block(self, ctx: Context, rows: Tensor, gen: bool) -> Context:
        """[start, rows, end] as one bidirectional block at a single RoPE position; rope advances by 1."""
        assert self.pool is not None
        n = rows.shape[0]
        new, slots = self.pool.extend(ctx, n + 2)
        markers = self._markers()
        if gen:  # latent rows first (generation expert), then the two markers; cache order stays official
            x = torch.cat([rows.to(markers.dtype), markers])
            order = torch.cat([slots[1:n + 1], slots[[0, n + 1]]])
        else:
            x = torch.cat([markers[:1], rows.to(markers.dtype), markers[1:]])
            order = slots
        seqs = [Seq(0, n + 2, new.pages, new.length)]
        batch = self._batch(torch.full((n + 2,), ctx.rope), order, seqs, False, n if gen else 0, gen)
        self._forward(x, batch)
        return new.advanced(1)

    @torch.inference_mode()
    def vae_rows(self, image: Image.Image, eps_seed: int) -> tuple[Tensor, Tensor]:
        """An image through the VAE transform and encoder (posterior noise from `eps_seed`): LLM rows at t=0."""
        x = VAE_TRANSFORM(image)[None].to(self.device, self.vae.encoder.conv_in.weight.dtype)
        _, _, hh, ww = x.shape
        z = self.cfg.vae.z_channels
        eps = torch.randn((1, z, hh // 8, ww // 8), generator=torch.Generator("cpu").manual_seed(eps_seed))
        latent = self.vae.encode(x, eps.to(self.device))
        p, d = self.cfg.latent_patch_size, self.cfg.latent_downsample
        h, w = hh // d, ww // d
        tokens = patchify(latent[0, :, :h * p, :w * p], p)  # [h*w, 64]
        pos = grid_position_ids(h, w, self.cfg.max_latent_size).to(self.device)
        t0 = torch.zeros((), device=self.device)
        return self.model.latent_rows(tokens, t0, pos), latent

    @torch.inference_mode()
    def prefill_vae_image(self, ctx: Context, image: Image.Image, eps_seed: int) -> Context:
        rows, _ = self.vae_rows(image, eps_seed)
        return self._prefill_image_block(ctx, rows, gen=True)

    @torch.inference_mode()
    def vit_rows(self, image: Image.Image) -> Tensor:
        x = VIT_TRANSFORM(image)
        p = self.cfg.vit.patch_size
        patches = patchify(x, p).to(self.device)
        pos = grid_position_ids(x.shape[1] // p, x.shape[2] // p, self.cfg.vit_max_num_patch_per_side)
        return self.model.vit_rows(patches, pos.to(self.device))

    @torch.inference_mode()
    def prefill_vit_image(self, ctx: Context, image: Image.Image) -> Context:
        return self._prefill_image_block(ctx, self.vit_rows(image), gen=False)

    # -- text ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, ctx: Context, max_tokens: int, temperature: float = 0.0, seed: int = 0,
               on_token: Callable[[int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None,
               on_logits: Callable[[Tensor], None] | None = None, ignore_eos: bool = False) -> list[int]:
        """Generate up to `max_tokens` after `<|im_start|>`, stopping before `<|im_end|>` (unless
        `ignore_eos`, which benchmarks use to decode a fixed number of tokens).

        The decode rows live in the pool only during the call: the caller prefills the decoded text again
        as its own segment, as the official recipe does.
        """
        assert self.pool is not None
        mark = self.pool.mark()
        try:
            room, slots = self.pool.extend(ctx, max_tokens)
            gen = torch.Generator(self.device).manual_seed(seed) if temperature > 0 else None
            token = torch.tensor([self.tok.special.bos], device=self.device)
            out: list[int] = []
            for i in range(max_tokens):
                if should_cancel is not None and should_cancel():
                    raise Cancelled()
                batch = self._batch(torch.tensor([ctx.rope + i]), slots[i:i + 1],
                                    [Seq(0, 1, room.pages, ctx.length + i + 1)], causal=True)
                h = self._forward(self.model.embed_tokens(token), batch)
                logits = self.model.logits(h)  # [1, vocab]
                if on_logits is not None:
                    on_logits(logits[0])
                if gen is None:
                    token = logits.argmax(dim=-1)
                else:
                    probs = (logits / temperature).float().softmax(dim=-1)
                    token = torch.multinomial(probs, 1, generator=gen)[:, 0]
                value = int(token.item())
                if value == self.tok.special.eos and not ignore_eos:
                    break
                out.append(value)
                if on_token is not None:
                    on_token(value)
            return out
        finally:
            self.pool.release(mark)

    # -- images -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_image(self, branches: Branches, width: int, height: int, steps: int, guidance: RoundGuidance,
                       noise: Tensor, on_step: Callable[[int, int], None] | None = None,
                       should_cancel: Callable[[], bool] | None = None,
                       observe: Callable[[str, int, Tensor], None] | None = None,
                       cache: StepCounter | None = None,
                       on_velocity: Callable[[int, Tensor, Tensor, Tensor], None] | None = None) -> Tensor:
        """Denoise `noise` [N, 64] into a packed latent [N, 64]; all guidance branches of a step run as one
        batched forward over the packed contexts.

        `cache` (irg_core.step_cache, one per round) counts the evaluations and, for a TaylorSeer, decides per
        step and branch whether the model runs or the branch's pre-norm hidden states are forecast.
        `on_velocity(i, t_i, x_t, v_t)` sees each step's guided velocity before the Euler step (previews)."""
        assert self.pool is not None
        d = self.cfg.latent_downsample
        h, w = height // d, width // d
        n = h * w
        ts = timesteps(steps, guidance.timestep_shift, self.device)
        on = cfg_active(ts.cpu(), guidance.interval)
        use_text = guidance.text_scale > 1.0 and branches.no_text is not None
        use_img = use_text and guidance.image_scale > 1.0 and branches.no_img is not None
        ctxs = [branches.cond] + ([branches.no_text] if use_text else []) + ([branches.no_img] if use_img else [])
        pos = grid_position_ids(h, w, self.cfg.max_latent_size).to(self.device)
        markers = self._markers()
        mark = self.pool.mark()
        try:
            rooms = [self.pool.extend(c, n + 2) for c in ctxs]
            batches = {k: self._image_batch(ctxs[:k], rooms[:k], n) for k in {1, len(ctxs)}}
            subsets: dict[tuple[int, ...], _Batch] = {}

            def velocity(i: int, x: Tensor) -> Tensor:
                if should_cancel is not None and should_cancel():
                    raise Cancelled()
                k = len(ctxs) if on[i] else 1
                rows = self.model.latent_rows(x, ts[i], pos)
                full = cache.plan(list(BRANCH_NAMES[:k])) if cache is not None else [True] * k
                if cache is not None and cache.forecasts:
                    vs = self._cached_velocities(cache, full, rows, markers, ctxs, rooms, subsets)
                else:
                    q = torch.cat([rows.repeat(k, 1), markers.repeat(k, 1)])
                    hidden = self._forward(q, batches[k])
                    vs = self.model.velocity(hidden[:k * n]).view(k, n, -1)
                v_no_text = vs[1] if k > 1 else None
                v_no_img = vs[2] if k > 2 else None
                if observe is not None:
                    for name, vb in zip(("cond", "no_text", "no_img"), vs):
                        observe(name, i, vb)
                v = cfg_combine(vs[0], v_no_text, v_no_img, guidance.text_scale if on[i] else 1.0,
                                guidance.image_scale if on[i] else 1.0, guidance.renorm, guidance.renorm_min)
                if observe is not None:
                    observe("x_t", i, x)
                    observe("v_t", i, v)
                if on_step is not None:
                    on_step(i + 1, steps - 1)
                if on_velocity is not None:
                    on_velocity(i, ts[i], x, v)
                return v

            return sample_flow(velocity, noise.to(self.device, self.dtype), ts)
        finally:
            self.pool.release(mark)

    def _cached_velocities(self, cache: StepCounter, full: list[bool], rows: Tensor, markers: Tensor,
                           ctxs: list[Context], rooms: list[tuple[Context, Tensor]],
                           subsets: dict[tuple[int, ...], _Batch]) -> Tensor:
        """Velocities [k, N, 64] of the first k = len(full) branches: the full ones run the model (one batched
        forward over just them), the others are forecast by the step cache (pre-final-norm hidden states)."""
        assert self.pool is not None and isinstance(cache, TaylorSeer)
        n, k = rows.shape[0], len(full)
        run = tuple(b for b in range(k) if full[b])
        hs: list[Tensor] = []
        if run:
            if run not in subsets:
                subsets[run] = self._image_batch([ctxs[b] for b in run], [rooms[b] for b in run], n)
            bt = subsets[run]
            q = torch.cat([rows.repeat(len(run), 1), markers.repeat(len(run), 1)])
            hidden = self.model.language_model.hidden_states(q, bt.rope, bt.n_gen, bt.gen_mode, self.pool.layers,
                                                             bt.slots, bt.meta)
        for b in range(k):
            state = cache.branch(BRANCH_NAMES[b])
            if full[b]:
                j = run.index(b)
                hs.append(hidden[j * n:(j + 1) * n])
                state.update(hs[-1])
            else:
                hs.append(state.forecast())
        return self.model.velocity(self.model.language_model.final_norm(torch.cat(hs), k * n)).view(k, n, -1)

    def _image_batch(self, ctxs: list[Context], rooms: list[tuple[Context, Tensor]], n: int) -> _Batch:
        """k packed branches: the latent rows of every branch first (generation expert), then the markers."""
        k = len(ctxs)
        lat_slots = [slots[1:n + 1] for _, slots in rooms]
        mark_slots = [slots[[0, n + 1]] for _, slots in rooms]
        positions = torch.cat([torch.full((n,), c.rope) for c in ctxs] + [torch.full((2,), c.rope) for c in ctxs])
        seqs = [Seq(b * n, (b + 1) * n, room.pages, room.length) for b, (room, _) in enumerate(rooms)]
        seqs += [Seq(k * n + 2 * b, k * n + 2 * b + 2, room.pages, room.length) for b, (room, _) in enumerate(rooms)]
        return self._batch(positions, torch.cat(lat_slots + mark_slots), seqs, False, k * n, True)

    @torch.inference_mode()
    def decode_latent(self, latent: Tensor, width: int, height: int) -> tuple[Tensor, np.ndarray]:
        """Packed latent [N, 64] -> (decoder output [1, 3, H, W], HWC uint8 image)."""
        d, p = self.cfg.latent_downsample, self.cfg.latent_patch_size
        z = unpatchify(latent, height // d, width // d, p, self.cfg.vae.z_channels)
        image = self.vae.decode(z.to(self.vae.decoder.conv_in.weight.dtype))
        return image, to_uint8(image)

    # -- previews (irg_core.previews) ------------------------------------------------------------------
    def latent_rgb(self) -> LatentRGB:
        """The fast preview decoder of this checkpoint (least squares against its VAE, fitted once)."""
        if self._latent_rgb is None:
            self._latent_rgb = fit_latent_rgb(self.vae)
        return self._latent_rgb

    @torch.inference_mode()
    def preview(self, x0: Tensor, width: int, height: int, decoder: str = "fast") -> np.ndarray:
        """A small HWC uint8 picture of a packed latent estimate [N, 64] (`fast` linear map or full `vae`)."""
        if decoder == "vae":
            return downscale(self.decode_latent(x0, width, height)[0], width, height)
        return fast_preview(x0, width, height, self.latent_rgb(), self.cfg.latent_downsample,
                            self.cfg.latent_patch_size, self.cfg.vae.z_channels)
