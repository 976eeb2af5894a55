"""Attention over the paged KV pool: packed query rows of several sequences, and the batched decode step.

A packed call attends several *sequences* at once: sequence i is the query rows [q_start, q_end) and the keys
of pages `pages` (in order) up to `kv_len` tokens, where the query's own keys were already written into the
pool. That one description serves text prefill (causal, bottom-right aligned), image prefill and denoising
(bidirectional). Contexts that share a prefix share its pages, so no key or value is copied to build an input.

The decode step is different: B rows, one per sequence, each over its own context, described by device
buffers (`DecodeBuffers`: key slots per row up to a fixed capacity, and a mask of the valid ones) so that the
step is a pure function of those buffers and the weights, with no Python value that changes per token.

Backends are chosen when the engine is built (`make_backend`), never process-wide:
- `sdpa` (any device): PyTorch `scaled_dot_product_attention` per packed sequence, and one batched masked call
  for the decode rows.
- `varlen` (CUDA, bf16/fp16): `torch.nn.attention.varlen.varlen_attn` with a block table for packed calls
  (paged flash attention, GQA); the decode step stays on the masked SDPA call.
- `flash` / `xformers`: named here so that asking for them fails at start with the extra to install; see
  docs/engine.md for their status.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True, slots=True)
class Seq:
    q_start: int
    q_end: int
    pages: tuple[int, ...]
    kv_len: int


@dataclass(slots=True)
class AttnMeta:
    seqs: list[Seq]
    causal: bool
    _device_cache: dict[object, object] = field(default_factory=dict)

    def varlen_inputs(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """cu_seq_q, block_table, seqused_k, max_q, max_k for the paged varlen kernel (built once)."""
        if "varlen" not in self._device_cache:
            cu = [0] + [s.q_end for s in self.seqs]
            width = max(len(s.pages) for s in self.seqs)
            table = [list(s.pages) + [s.pages[-1]] * (width - len(s.pages)) for s in self.seqs]
            self._device_cache["varlen"] = (
                torch.tensor(cu, dtype=torch.int32, device=device),
                torch.tensor(table, dtype=torch.int32, device=device),
                torch.tensor([s.kv_len for s in self.seqs], dtype=torch.int32, device=device),
                max(s.q_end - s.q_start for s in self.seqs),
                max(s.kv_len for s in self.seqs),
            )
        return self._device_cache["varlen"]  # type: ignore[return-value]


@dataclass(slots=True)
class DecodeBuffers:
    """The device-resident metadata of one batched decode step (B rows, key capacity L).

    `slots` [B]: where each row's new key and value go; `key_slots` [B, L]: the flat pool slots each row
    attends to (its context's slots, padded); `mask` [B, 1, 1, L]: which of them are valid; `positions` [B]:
    each row's RoPE position; `tokens` [B]: the input ids. The scheduler refills them in place every step.
    """

    tokens: Tensor
    positions: Tensor
    slots: Tensor
    key_slots: Tensor
    mask: Tensor

    @classmethod
    def allocate(cls, batch: int, capacity: int, device: torch.device) -> DecodeBuffers:
        long = dict(dtype=torch.long, device=device)
        return cls(
            torch.zeros(batch, **long),
            torch.zeros(batch, **long),
            torch.zeros(batch, **long),
            torch.zeros(batch, capacity, **long),
            torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device),
        )

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.key_slots.shape[1]


def gather_pages(pool: Tensor, pages: tuple[int, ...], length: int, meta: AttnMeta | None = None) -> Tensor:
    """The first `length` tokens of `pages` as [length, Hkv, D]: a view when the pages are consecutive,
    else a gather (its index tensor is kept in `meta`, so a denoising loop uploads it once)."""
    first = pages[0]
    if pages == tuple(range(first, first + len(pages))):
        return pool[first : first + len(pages)].flatten(0, 1)[:length]
    cache = meta._device_cache if meta is not None else {}
    key = ("pages", pages)
    index = cache.get(key)
    if index is None:
        index = cache[key] = torch.tensor(pages, device=pool.device)
    return pool[index].flatten(0, 1)[:length]  # type: ignore[index]


# The shapes of the engine's SDPA calls: (query rows, key rows, masked?) per sequence. A packed guidance
# branch is the same call as an image block (its own sequence, no mask).
CAUSAL = "prefill (causal)"
BIDIRECTIONAL = "image blocks and guidance branches (bidirectional)"
DECODE = "decode (one row per sequence)"
CALL_SHAPES = {CAUSAL: (16, 48, True), BIDIRECTIONAL: (16, 48, False), DECODE: (1, 48, True)}
FUSED_KERNELS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


@dataclass(frozen=True, slots=True)
class KernelChoice:
    kernel: str  # the SDPA backend's name, "MATH" when no fused kernel takes the shape
    expand_kv: bool  # the fused kernel needs the key/value heads repeated to the query heads (no GQA support)


def probe_sdpa_kernels(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> dict[str, KernelChoice]:
    """For each call shape the engine makes, the first fused SDPA kernel that accepts it: with the key heads
    as they are (`enable_gqa`), else with them expanded to the query heads; MATH when none does. Run once when
    an engine is built (a few tiny calls); the backend then expands exactly where a fused kernel needs it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, KernelChoice] = {}
    for shape, (n, length, masked) in CALL_SHAPES.items():
        q = torch.zeros(1, heads, n, head_dim, device=device, dtype=dtype)
        k = torch.zeros(1, kv_heads, length, head_dim, device=device, dtype=dtype)
        mask = torch.ones(n, length, device=device, dtype=torch.bool).tril(length - n) if masked else None
        choice = KernelChoice("MATH", False)
        for name in FUSED_KERNELS:
            kernel = getattr(SDPBackend, name, None)
            if kernel is None:
                continue
            for expand in (False, True):
                kk = k.repeat_interleave(heads // kv_heads, dim=1) if expand else k
                try:
                    with sdpa_kernel([kernel]):
                        F.scaled_dot_product_attention(q, kk, kk, attn_mask=mask, enable_gqa=not expand)
                except RuntimeError:
                    continue
                choice = KernelChoice(name, expand)
                break
            if choice.kernel != "MATH":
                break
        out[shape] = choice
    return out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, expand: bool) -> Tensor:
    """SDPA over grouped key heads: by `enable_gqa`, or with the key/value heads repeated (`expand`)."""
    if expand and k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class SdpaBackend:
    name = "sdpa"

    def __init__(self, expand_kv: frozenset[str] = frozenset()) -> None:
        self.expand_kv = expand_kv  # call shapes (CALL_SHAPES keys) whose fused kernel needs expanded KV heads

    def packed(self, q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: AttnMeta) -> Tensor:
        """q [T, H, D]; pools [pages, page_size, Hkv, D] -> [T, H, D]."""
        out = torch.empty_like(q)
        keys: dict[tuple[tuple[int, ...], int], tuple[Tensor, Tensor]] = {}
        for s in meta.seqs:
            kv = keys.get((s.pages, s.kv_len))
            if kv is None:
                kv = keys[(s.pages, s.kv_len)] = (
                    gather_pages(k_pool, s.pages, s.kv_len, meta),
                    gather_pages(v_pool, s.pages, s.kv_len, meta),
                )
            k, v = (t.transpose(0, 1).unsqueeze(0) for t in kv)  # [1, Hkv, L, D]
            qs = q[s.q_start : s.q_end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            n, length = s.q_end - s.q_start, s.kv_len
            mask = None
            if meta.causal and n > 1:  # query row i sees the past and new rows 0..i (bottom-right aligned)
                rows = torch.arange(n, device=q.device)[:, None] + (length - n)
                mask = torch.arange(length, device=q.device)[None, :] <= rows
            o = _sdpa(qs, k, v, mask, (CAUSAL if mask is not None else BIDIRECTIONAL) in self.expand_kv)
            out[s.q_start : s.q_end] = o[0].transpose(0, 1)
        return out

    def decode(self, q: Tensor, flat_k: Tensor, flat_v: Tensor, buf: DecodeBuffers) -> Tensor:
        """q [B, H, D]; flat pools [slots, Hkv, D] -> [B, H, D], each row over its own valid key slots."""
        k = flat_k[buf.key_slots].transpose(1, 2)  # [B, Hkv, L, D]
        v = flat_v[buf.key_slots].transpose(1, 2)
        o = _sdpa(q.unsqueeze(2), k, v, buf.mask, DECODE in self.expand_kv)
        return o.squeeze(2)


VARLEN_PARAMETERS = frozenset({"block_table", "seqused_k", "enable_gqa", "window_size"})  # what `packed` passes


class VarlenBackend(SdpaBackend):
    name = "varlen"

    def __init__(self) -> None:
        super().__init__()
        from torch.nn.attention.varlen import varlen_attn  # fails at start when this torch lacks it

        missing = VARLEN_PARAMETERS - set(inspect.signature(varlen_attn).parameters)
        if missing:  # earlier releases had varlen_attn without paged keys or grouped heads
            raise ImportError(f"torch {torch.__version__}'s varlen_attn lacks {', '.join(sorted(missing))}")
        self._varlen = varlen_attn

    def packed(self, q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: AttnMeta) -> Tensor:
        if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
            return super().packed(q, k_pool, v_pool, meta)
        cu_q, table, used, max_q, max_k = meta.varlen_inputs(q.device)
        return self._varlen(
            q.contiguous(),
            k_pool,
            v_pool,
            cu_q,
            None,
            max_q,
            max_k,
            enable_gqa=True,
            seqused_k=used,
            block_table=table,
            window_size=(-1, 0) if meta.causal else (-1, -1),
        )


BACKENDS = ("sdpa", "varlen", "flash", "xformers")
_EXTRAS = {"flash": ("flash_attn", "flash-attn 2", ".[flash]"), "xformers": ("xformers", "xformers", ".[xformers]")}


def _kernels_not_loaded(module: str) -> str | None:
    """Why an installed package's compiled kernels did not load, or None. xformers imports without them when
    its wheel was built for another torch (it only logs a warning; every attention call then fails);
    flash-attn fails at import instead, which `make_backend` reports as it is."""
    if module != "xformers":
        return None
    xformers = __import__(module)
    if getattr(xformers, "_has_cpp_library", True):
        return None
    problem = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    return " ".join(str(problem).split()) if problem is not None else "xformers._has_cpp_library is False"


class BackendUnavailable(RuntimeError):
    """An attention backend was asked for that this installation cannot run."""


def make_backend(name: str) -> SdpaBackend:
    """The attention backend `name`, or a `BackendUnavailable` that says what to install."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"attention backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name == "sdpa":
        return SdpaBackend()
    if name == "varlen":
        try:
            return VarlenBackend()
        except ImportError as e:
            raise BackendUnavailable(f"attention backend 'varlen' needs torch.nn.attention.varlen ({e})") from e
    module, what, extra = _EXTRAS[name]
    try:
        __import__(module)
    except Exception as e:  # missing, or built for another torch (an ImportError or an OSError from its .so)
        raise BackendUnavailable(
            f"attention backend {name!r} needs {what}: pip install {extra} (import {module} failed: {e})"
        ) from e
    unloaded = _kernels_not_loaded(module)
    if unloaded is not None:
        raise BackendUnavailable(
            f"attention backend {name!r} needs {what} built for torch {torch.__version__}: pip install {extra} "
            f"(the installed {module} imports, but its kernels do not load: {unloaded})"
        )
    raise BackendUnavailable(
        f"attention backend {name!r}: {what} is installed, but this build has no tested "
        f"kernel path for it yet (see docs/engine.md); use --attention sdpa or varlen"
    )
