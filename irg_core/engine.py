"""The model runner: executes the units of work step programs yield (`irg_core.steps`), alone or packed.

The engine owns the loaded model, one paged KV pool sized once at construction (`kv_cache_bytes`), a RoPE
table, the attention backend and the decode step's device buffers; an `Engine` is complete after `__init__`.
What it runs:
- text prefill (causal, chunked by the scheduler) and image blocks (bidirectional, one RoPE position);
- the VAE encoder and the ViT (an image into LLM rows), the VAE decoder;
- a batched decode step: one row per sequence, each over its own context, as a pure function of device buffers
  (`LanguageModel.decode_step`), captured as a CUDA graph per batch-size bucket where enabled;
- a packed denoising step: the latent rows of several trajectories × their guidance branches in one forward.

The synchronous helpers at the end (`prefill_text`, `decode`, `generate_image`, ...) drive a single unit or
program to completion; tests and the golden checks use them to look at one stage at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from irg_core.attention import (
    AttnMeta,
    DecodeBuffers,
    KernelChoice,
    SdpaBackend,
    Seq,
    make_backend,
    probe_sdpa_kernels,
)
from irg_core.kv_cache import EMPTY, Context, KVPool, pages_needed
from irg_core.loader import LoadedModel
from irg_core.model.qwen2_mot import RopeTable, RowGroups, fuse_projections
from irg_core.numerics import precision
from irg_core.params import RoundGuidance
from irg_core.previews import LatentRGB, downscale, fast_preview, fit_latent_rgb
from irg_core.sampling import cfg_active, cfg_combine, sample_tokens, timesteps
from irg_core.steps import DecodeLatent, DecodeStep, Decoding, DenoiseLoop, DenoiseStep, EncodeVae
from irg_core.transforms import VAE_TRANSFORM, VIT_TRANSFORM, grid_position_ids, patchify, to_uint8, unpatchify

DEFAULT_PAGE_SIZE = 256
CPU_KV_CACHE_BYTES = 256 * 2**20  # a fixed pool on the CPU
CUDA_KV_CACHE_FRACTION = 0.3  # of the free accelerator memory after the weights
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True, slots=True)
class Branches:
    """The contexts of one image round: conditional, without text, without the image (None: unused)."""

    cond: Context
    no_text: Context | None = None
    no_img: Context | None = None


def exhaust(stages: Generator[None, None, Any]) -> Any:
    """Run a generator of stages to its end and return its value."""
    while True:
        try:
            next(stages)
        except StopIteration as stop:
            return stop.value


def kv_bytes_per_token(loaded: LoadedModel, kv_dtype: torch.dtype) -> int:
    llm = loaded.cfg.llm
    itemsize = torch.tensor([], dtype=kv_dtype).element_size()
    return llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * itemsize


def default_kv_cache_bytes(device: torch.device) -> int:
    """`IRG_KV_CACHE_GB` when set; else a fraction of the free accelerator memory, or a fixed size on the CPU."""
    env = os.environ.get("IRG_KV_CACHE_GB")
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"IRG_KV_CACHE_GB must be a number of GiB, not {env!r}") from None
        if not value > 0:
            raise ValueError(f"IRG_KV_CACHE_GB must be positive, not {env!r}")
        return int(value * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_KV_CACHE_FRACTION)
    return CPU_KV_CACHE_BYTES


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        page_size: int = DEFAULT_PAGE_SIZE,
        kv_cache_bytes: int | None = None,
        attention: str = "sdpa",
        cuda_graphs: bool = True,
        compile_decode: bool = False,
    ):
        self.model, self.vae, self.tok = loaded.model, loaded.vae, loaded.tokenizer
        self.cfg = loaded.cfg
        self.device, self.dtype = loaded.device, loaded.dtype
        self.page_size = page_size
        # KV is bfloat16 as in the official code; with float32 weights it is kept in float32 holding bf16 values.
        self.kv_dtype = torch.float32 if self.dtype == torch.float32 else torch.bfloat16
        self.backend: SdpaBackend = make_backend(attention)
        # Which SDPA kernel each call shape reaches (probed on CUDA, where it matters; the driver logs it),
        # and the shapes whose fused kernel needs the key/value heads expanded.
        self.attention_kernels: dict[str, KernelChoice] = {}
        if self.device.type == "cuda":
            llm = self.cfg.llm
            head_dim = llm.hidden_size // llm.num_attention_heads
            self.attention_kernels = probe_sdpa_kernels(
                self.device, self.kv_dtype, llm.num_attention_heads, llm.num_key_value_heads, head_dim
            )
            self.backend.expand_kv = frozenset(k for k, c in self.attention_kernels.items() if c.expand_kv)
        fuse_projections(self.model.language_model)
        budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_cache_bytes(self.device)
        pages = max(4, budget // (kv_bytes_per_token(loaded, self.kv_dtype) * page_size))
        self.pool = KVPool(self.cfg.llm, pages + 1, page_size, self.device, self.kv_dtype)
        self.scratch_slot = self.pool.reserve_scratch() * page_size  # where padded decode rows write
        self._flat_kv = [(k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])) for k, v in self.pool.layers]
        self.rope = RopeTable(self.cfg.llm, self.device, self.dtype)
        self._markers_ids = (
            torch.tensor([self.tok.special.start_of_image, self.tok.special.end_of_image], device=self.device)
            if self.tok is not None
            else None
        )
        graphs = cuda_graphs and self.device.type == "cuda"
        self.decoder = DecodeRunner(self, cuda_graphs=graphs, compiled=compile_decode)
        self._denoise_cache: tuple[tuple, _Packed] | None = None
        self._latent_rgb: LatentRGB | None = None  # the fast preview map, fitted on first use

    # -- pool ---------------------------------------------------------------------------------------
    def pages_for(self, tokens: int, segments: int) -> int:
        """Pages a trajectory can occupy: its tokens plus one partly filled page per separately grown piece."""
        return pages_needed(tokens, self.page_size) + segments + 2

    def reset_pool(self, tokens: int = 0, segments: int = 0) -> KVPool:
        """Give every page back (for tests that drive single units; never while a scheduler runs)."""
        if self.pages_for(tokens, segments) > self.pool.num_pages - 1:
            raise ValueError(f"the KV pool holds {self.pool.num_pages} pages, {tokens} tokens need more")
        self.pool.reset()
        self.scratch_slot = self.pool.reserve_scratch() * self.page_size
        self._flat_kv = [(k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])) for k, v in self.pool.layers]
        self._denoise_cache = None
        return self.pool

    def free_decoding(self, seq: Decoding) -> None:
        if seq.room is not None:
            self.pool.free(seq.room)
            seq.room = None

    def free_loop(self, loop: DenoiseLoop) -> None:
        state = loop.state
        if state is not None:
            for room in state.rooms:
                self.pool.free(room)
            loop.state = None
            self._denoise_cache = None

    # -- forward plumbing ---------------------------------------------------------------------------
    def _forward(
        self,
        x: Tensor,
        positions: Tensor,
        rows: RowGroups,
        gen_mode: bool,
        slots: Tensor,
        meta: AttnMeta,
        final_norm: bool = True,
    ) -> Tensor:
        return self.model.language_model(
            x, self.rope(positions), rows, gen_mode, self.pool.layers, slots, meta, self.backend, final_norm
        )

    def _markers(self) -> Tensor:
        assert self._markers_ids is not None
        return self.model.embed_tokens(self._markers_ids)  # [2, hidden]

    # -- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_prefill_text(self, ctx: Context, ids: Sequence[int]) -> Context:
        """A causal text segment after `ctx`, positions rope .. rope + n - 1."""
        n = len(ids)
        new, slots = self.pool.extend(ctx, n)
        x = self.model.embed_tokens(torch.tensor(list(ids), device=self.device))
        positions = torch.arange(ctx.rope, ctx.rope + n, device=self.device)
        self._forward(
            x, positions, RowGroups.split(n, 0), False, slots, AttnMeta([Seq(0, n, new.pages, new.length)], True)
        )
        return new.advanced(n)

    @torch.inference_mode()
    def run_prefill_image(self, ctx: Context, rows: Tensor, gen: bool) -> Context:
        """[start, rows, end] as one bidirectional block at a single RoPE position; rope advances by 1."""
        n = rows.shape[0]
        new, slots = self.pool.extend(ctx, n + 2)
        markers = self._markers()
        if gen:  # latent rows first (generation expert), then the two markers; cache order stays official
            x = torch.cat([rows.to(markers.dtype), markers])
            order = torch.cat([slots[1 : n + 1], slots[[0, n + 1]]])
        else:
            x = torch.cat([markers[:1], rows.to(markers.dtype), markers[1:]])
            order = slots
        positions = torch.full((n + 2,), ctx.rope, device=self.device)
        self._forward(
            x,
            positions,
            RowGroups.split(n + 2, n if gen else 0),
            gen,
            order,
            AttnMeta([Seq(0, n + 2, new.pages, new.length)], False),
        )
        return new.advanced(1)

    def vae_rows(self, image: Image.Image, eps_seed: int) -> tuple[Tensor, Tensor]:
        """An image through the VAE transform and encoder (posterior noise from `eps_seed`): LLM rows at t=0."""
        return exhaust(self.vae_rows_stages(image, eps_seed))

    def vae_rows_stages(self, image: Image.Image, eps_seed: int) -> Generator[None, None, tuple[Tensor, Tensor]]:
        """`vae_rows` one encoder stage per `next()` (so a scheduler can stop a job between two of them)."""
        with torch.inference_mode():
            x = VAE_TRANSFORM(image)[None].to(self.device, self.vae.encoder.conv_in.weight.dtype)
        _, _, hh, ww = x.shape
        mixed = precision("irg", self.dtype).encode_mixed  # every mode encodes under autocast (irg_core.numerics)
        for stage in self.vae.encoder.stages(mixed):
            yield
            with torch.inference_mode():
                x = stage(x)
        with torch.inference_mode():
            z = self.cfg.vae.z_channels
            eps = torch.randn((1, z, hh // 8, ww // 8), generator=torch.Generator("cpu").manual_seed(eps_seed))
            latent = self.vae.sample(x, eps.to(self.device), mixed)
            p, d = self.cfg.latent_patch_size, self.cfg.latent_downsample
            h, w = hh // d, ww // d
            tokens = patchify(latent[0, :, : h * p, : w * p], p)  # [h*w, 64]
            pos = grid_position_ids(h, w, self.cfg.max_latent_size).to(self.device)
            t0 = torch.zeros((), device=self.device)
            return self.model.latent_rows(tokens, t0, pos), latent

    @torch.inference_mode()
    def vit_rows(self, image: Image.Image) -> Tensor:
        x = VIT_TRANSFORM(image)
        p = self.cfg.vit.patch_size
        patches = patchify(x, p).to(self.device)
        pos = grid_position_ids(x.shape[1] // p, x.shape[2] // p, self.cfg.vit_max_num_patch_per_side)
        return self.model.vit_rows(patches, pos.to(self.device))

    # -- decode -------------------------------------------------------------------------------------
    def start_decoding(self, seq: Decoding) -> None:
        """Room in the pool for all of `seq`'s decode rows (its worst case was reserved at admission)."""
        if seq.room is None:
            seq.room, seq.slots = self.pool.extend_slots(seq.ctx, seq.max_tokens)

    @torch.inference_mode()
    def run_decode(self, steps: Sequence[DecodeStep]) -> list[tuple[int, Tensor | None]]:
        """One token for each sequence, all in one forward."""
        for s in steps:
            self.start_decoding(s.seq)
        return self.decoder.step(steps)

    # -- denoising ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_denoise(self, steps: Sequence[DenoiseStep]) -> list[tuple[Tensor, Tensor | None]]:
        """One denoising step of each item, packed: latent rows of every item × branch first (generation
        expert), then the image markers; each item's products run as their own row group, so an item gets
        bit for bit what it would get alone."""
        key = tuple((s.loop.uid, s.evaluated) for s in steps)
        if self._denoise_cache is None or self._denoise_cache[0] != key:
            self._denoise_cache = (key, self._pack(steps))
        packed = self._denoise_cache[1]
        markers = self._markers()
        lat = [self.model.latent_rows(s.x, s.t, s.loop.state.pos).repeat(len(s.evaluated), 1) for s in steps]
        marks = [markers.repeat(len(s.evaluated), 1) for s in steps]
        x = torch.cat(lat + marks)
        hidden = self._forward(x, packed.positions, packed.rows, True, packed.slots, packed.meta, final_norm=False)
        lm = self.model.language_model
        out = []
        start = 0
        for s in steps:
            b = len(s.evaluated)
            n = b * s.loop.tokens
            h = hidden[start : start + n]
            v = self.model.velocity(lm.model.norm_moe_gen(h)).view(b, s.loop.tokens, -1)
            out.append((v, h.view(b, s.loop.tokens, -1) if s.hidden else None))
            start += n
        return out

    def velocity_from_hidden(self, hidden: Tensor) -> Tensor:
        """Pre-final-norm hidden states of latent rows [..., hidden] -> velocities [..., 64]."""
        return self.model.velocity(self.model.language_model.model.norm_moe_gen(hidden))

    def prepare_loop(self, loop: DenoiseLoop) -> None:
        if loop.state is not None:
            return
        n = loop.tokens
        rooms, slots = [], []
        for ctx in loop.contexts:
            room, s = self.pool.extend(ctx, n + 2)
            rooms.append(room)
            slots.append(s)
        pos = grid_position_ids(loop.grid_h, loop.grid_w, self.cfg.max_latent_size).to(self.device)
        loop.state = _LoopState(rooms, slots, pos)

    def _pack(self, steps: Sequence[DenoiseStep]) -> _Packed:
        for s in steps:
            self.prepare_loop(s.loop)
        lat_slots, mark_slots, lat_pos, mark_pos, lat_seqs, mark_seqs, groups = [], [], [], [], [], [], []
        row = 0
        for s in steps:
            n, st = s.loop.tokens, s.loop.state
            groups.append((row, row + len(s.evaluated) * n, True))
            for b in s.evaluated:
                room, ctx = st.rooms[b], s.loop.contexts[b]
                lat_slots.append(st.slots[b][1 : n + 1])
                lat_pos.append(torch.full((n,), ctx.rope))
                lat_seqs.append(Seq(row, row + n, room.pages, room.length))
                row += n
        for s in steps:
            st = s.loop.state
            groups.append((row, row + 2 * len(s.evaluated), False))
            for b in s.evaluated:
                room, ctx = st.rooms[b], s.loop.contexts[b]
                mark_slots.append(st.slots[b][[0, s.loop.tokens + 1]])
                mark_pos.append(torch.full((2,), ctx.rope))
                mark_seqs.append(Seq(row, row + 2, room.pages, room.length))
                row += 2
        positions = torch.cat(lat_pos + mark_pos).to(self.device)
        return _Packed(
            positions,
            torch.cat(lat_slots + mark_slots),
            RowGroups(tuple(groups)),
            AttnMeta(lat_seqs + mark_seqs, False),
        )

    def decode_latent(self, latent: Tensor, width: int, height: int, mode: str = "irg") -> tuple[Tensor, np.ndarray]:
        """Packed latent [N, 64] -> (decoder output [1, 3, H, W], HWC uint8 image); `mode`: irg_core.numerics."""
        return exhaust(self.decode_latent_stages(latent, width, height, mode))

    def decode_latent_stages(
        self, latent: Tensor, width: int, height: int, mode: str = "irg"
    ) -> Generator[None, None, tuple[Tensor, np.ndarray]]:
        """`decode_latent` one decoder stage per `next()`."""
        d, p = self.cfg.latent_downsample, self.cfg.latent_patch_size
        mixed = precision(mode, self.vae.dtype).decode_mixed
        with torch.inference_mode():
            z = unpatchify(latent, height // d, width // d, p, self.cfg.vae.z_channels)
            h = self.vae.decoder_input(z, mixed)
        for stage in self.vae.decoder.stages(mixed):
            yield
            with torch.inference_mode():
                h = stage(h)
        return h, to_uint8(h)

    def run_decode_latent(self, unit: DecodeLatent) -> tuple[Tensor, np.ndarray]:
        return self.decode_latent(unit.latent, unit.width, unit.height, unit.mode)

    def stages_of(self, unit: EncodeVae | DecodeLatent) -> Generator[None, None, Any]:
        """A VAE unit as a generator of stages (the scheduler runs one per tick and can stop in between)."""
        if isinstance(unit, EncodeVae):
            return self.vae_rows_stages(unit.image, unit.eps_seed)
        return self.decode_latent_stages(unit.latent, unit.width, unit.height, unit.mode)

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
        return fast_preview(
            x0,
            width,
            height,
            self.latent_rgb(),
            self.cfg.latent_downsample,
            self.cfg.latent_patch_size,
            self.cfg.vae.z_channels,
        )

    # -- synchronous helpers (one unit or loop at a time, outside a scheduler) --------------------------
    def prefill_text(self, ctx: Context, ids: list[int]) -> Context:
        return self.run_prefill_text(ctx, ids)

    def prefill_vae_image(self, ctx: Context, image: Image.Image, eps_seed: int) -> Context:
        return self.run_prefill_image(ctx, self.vae_rows(image, eps_seed)[0], gen=True)

    def prefill_vit_image(self, ctx: Context, image: Image.Image) -> Context:
        return self.run_prefill_image(ctx, self.vit_rows(image), gen=False)

    def decode(
        self,
        ctx: Context,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        on_token: Callable[[int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_logits: Callable[[Tensor], None] | None = None,
        ignore_eos: bool = False,
    ) -> list[int]:
        """Generate up to `max_tokens` after `<|im_start|>`, stopping before `<|im_end|>` (unless `ignore_eos`).
        The decode rows live in the pool only during the call."""
        from irg_core.errors import Cancelled

        seq = Decoding(ctx, max_tokens, temperature, seed)
        out: list[int] = []
        try:
            for _ in range(max_tokens):
                if should_cancel is not None and should_cancel():
                    raise Cancelled()
                token, logits = self.run_decode([DecodeStep(seq, logits=on_logits is not None)])[0]
                if on_logits is not None and logits is not None:
                    on_logits(logits)
                if token == self.tok.special.eos and not ignore_eos:
                    break
                out.append(token)
                if on_token is not None:
                    on_token(token)
            return out
        finally:
            self.free_decoding(seq)

    def generate_image(
        self,
        branches: Branches,
        width: int,
        height: int,
        steps: int,
        guidance: RoundGuidance,
        noise: Tensor,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        observe: Callable[[str, int, Tensor], None] | None = None,
        mode: str = "irg",
        cache: Any = None,
    ) -> Tensor:
        """Denoise `noise` [N, 64] into a packed latent [N, 64] (the image program, run alone); `mode` picks
        the state's dtype (irg_core.numerics); `cache`: an irg_core.step_cache counter or TaylorSeer."""
        from irg_core.errors import Cancelled
        from irg_core.programs import denoise_program

        program = denoise_program(
            self, branches, width, height, steps, guidance, noise, probes=observe is not None, mode=mode, cache=cache
        )
        result = None
        try:
            while True:
                unit = program.send(result)
                if should_cancel is not None and should_cancel():
                    raise Cancelled()
                result = self.run_one(unit, on_event=lambda e: _observe(e, observe, on_step))
        except StopIteration as stop:
            return stop.value
        finally:
            program.close()

    def run_one(self, unit: object, on_event: Callable[[object], None] | None = None) -> object:
        """Execute a single unit outside the scheduler (tests and the helpers above)."""
        from irg_core.scheduler import execute_alone

        return execute_alone(self, unit, on_event)


def _observe(event, observe, on_step) -> None:
    if event.type == "probe" and observe is not None:
        observe(event.data["name"], event.data["step"], event.data["value"])
    elif event.type == "image.progress" and on_step is not None:
        on_step(event.data["step"], event.data["steps"])


@dataclass(slots=True)
class _LoopState:
    rooms: list[Context]
    slots: list[Tensor]
    pos: Tensor


@dataclass(slots=True)
class _Packed:
    positions: Tensor
    slots: Tensor
    rows: RowGroups
    meta: AttnMeta


class DecodeRunner:
    """The batched decode step over persistent device buffers, one set per batch-size bucket.

    Per step the host writes each row's token, position, new-key slot and context length into the bucket's
    buffers (one small copy), then runs `LanguageModel.decode_step` — eagerly, or as a replayed CUDA graph
    captured on the bucket's first use. Key slots are rebuilt only when the rows change or outgrow the
    bucket's capacity (a multiple of the page size), not per token.

    `compiled` (opt-in): the step goes through `torch.compile` (whole graph, Inductor) first, and the CUDA
    graph, where there is one, captures the compiled step. The first step of a new shape compiles (tens of
    seconds); after a shape changes once, the compiled step is re-traced with dynamic sizes.
    """

    def __init__(self, engine: Engine, cuda_graphs: bool, compiled: bool = False):
        self.e = engine
        self.cuda_graphs = cuda_graphs
        self.compiled = compiled
        step = engine.model.language_model.decode_step
        self._step = torch.compile(step, fullgraph=True) if compiled else step
        self._buffers: dict[tuple[int, int], DecodeBuffers] = {}
        self._graphs: dict[tuple[int, int], tuple[object, Tensor]] = {}
        self._rows: tuple[int, ...] = ()
        self._key: tuple[int, int] | None = None
        self.captured = 0

    def bucket(self, n: int) -> int:
        for b in DECODE_BUCKETS:
            if b >= n:
                return b
        return n

    def _capacity(self, steps: Sequence[DecodeStep]) -> int:
        """Key capacity in tokens: the longest row's pages, rounded up to a power of two pages (so a captured
        graph per bucket serves many lengths)."""
        longest = max(s.seq.ctx.length + s.seq.step + 1 for s in steps)
        pages = pages_needed(longest, self.e.page_size)
        return (1 << (pages - 1).bit_length()) * self.e.page_size

    def step(self, steps: Sequence[DecodeStep]) -> list[tuple[int, Tensor | None]]:
        e = self.e
        n = len(steps)
        batch = self.bucket(n) if self.cuda_graphs else n
        rows = tuple(s.seq.uid for s in steps)
        need = self._capacity(steps)
        key = self._key
        if rows != self._rows or key is None or key[0] != batch or key[1] < need:
            key = (batch, need)
            if key not in self._buffers:
                self._buffers[key] = DecodeBuffers.allocate(batch, need, e.device)
            self._fill_keys(self._buffers[key], steps)
            self._rows, self._key = rows, key
        buf = self._buffers[key]
        bos, scratch = e.tok.special.bos, e.scratch_slot
        pad = batch - n
        tokens = [s.seq.last if s.seq.last is not None else bos for s in steps] + [bos] * pad
        positions = [s.seq.ctx.rope + s.seq.step for s in steps] + [0] * pad
        slots = [s.seq.slots[s.seq.step] for s in steps] + [scratch] * pad
        lengths = [s.seq.ctx.length + s.seq.step + 1 for s in steps] + [1] * pad
        host = torch.tensor([tokens, positions, slots, lengths], dtype=torch.long).to(e.device, non_blocking=True)
        buf.tokens.copy_(host[0])
        buf.positions.copy_(host[1])
        buf.slots.copy_(host[2])
        torch.lt(torch.arange(buf.capacity, device=e.device)[None, :], host[3][:, None], out=buf.mask.view(batch, -1))
        logits = self._logits(key, buf)[:n]
        sampled = sample_tokens(
            logits, [s.seq.temperature for s in steps], [s.seq.seed for s in steps], [s.seq.step for s in steps]
        ).tolist()
        out = []
        for i, (s, token) in enumerate(zip(steps, sampled)):
            s.seq.last, s.seq.step = token, s.seq.step + 1
            out.append((token, logits[i].clone() if s.logits else None))
        return out

    def _fill_keys(self, buf: DecodeBuffers, steps: Sequence[DecodeStep]) -> None:
        ps = self.e.page_size
        table = torch.full((buf.batch, buf.capacity), self.e.scratch_slot, dtype=torch.long)
        offsets = torch.arange(ps)
        for i, s in enumerate(steps):
            pages = torch.tensor(s.seq.room.pages, dtype=torch.long)
            flat = (pages[:, None] * ps + offsets[None, :]).flatten()[: buf.capacity]
            table[i, : flat.shape[0]] = flat
        buf.key_slots.copy_(table.to(self.e.device))

    def _logits(self, key: tuple[int, int], buf: DecodeBuffers) -> Tensor:
        if not self.cuda_graphs:
            return self._step(buf, self.e.rope, self.e._flat_kv, self.e.backend)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(buf)
        g, out = graph
        g.replay()  # type: ignore[attr-defined]
        return out

    def _capture(self, buf: DecodeBuffers) -> tuple[object, Tensor]:
        """Capture the decode step on the bucket's buffers (after a warm-up run on a side stream)."""
        e = self.e
        stream = torch.cuda.Stream(e.device)
        stream.wait_stream(torch.cuda.current_stream(e.device))
        with torch.cuda.stream(stream):
            self._step(buf, e.rope, e._flat_kv, e.backend)  # compiles here when compiled
        torch.cuda.current_stream(e.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step(buf, e.rope, e._flat_kv, e.backend)
        self.captured += 1
        return graph, out


def guidance_branches(branches: Branches, g: RoundGuidance) -> list[Context]:
    """The contexts a round evaluates, cond first: no_text when text guidance is on, no_img when image
    guidance is on too (image guidance alone does nothing, as upstream)."""
    use_text = g.text_scale > 1.0 and branches.no_text is not None
    use_img = use_text and g.image_scale > 1.0 and branches.no_img is not None
    return [branches.cond] + ([branches.no_text] if use_text else []) + ([branches.no_img] if use_img else [])


__all__ = ["Branches", "Engine", "EMPTY", "cfg_active", "cfg_combine", "guidance_branches", "timesteps"]
