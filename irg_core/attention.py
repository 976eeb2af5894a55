"""Attention of packed query rows over a paged KV pool.

A call attends several *sequences* at once: sequence i is the query rows [q_start, q_end) and the keys of
pages `pages` (in order) up to `kv_len` tokens, where the query's own keys were already written into the
pool. That one description serves text prefill (causal, bottom-right aligned), image prefill and denoising
(bidirectional), and text decoding (one row). Contexts that share a prefix share its pages, so no key or
value is ever copied to build an attention input.

Backends:
- `torch.nn.attention.varlen.varlen_attn` with a block table (flash attention over the paged pool, GQA),
  on CUDA when selected with `use_backend("varlen")` (opt-in until validated on a GPU against SDPA);
- PyTorch `scaled_dot_product_attention` per sequence (any device): a sequence whose pages are consecutive
  reads the pool through a view; otherwise its pages are gathered.
"""

from __future__ import annotations

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


_BACKEND = "sdpa"
BACKENDS = ("sdpa", "varlen")


def use_backend(name: str) -> None:
    """Select the CUDA attention backend: "sdpa" (default) or "varlen" (paged flash attention)."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, not {name!r}")
    if name == "varlen":
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (fails early when absent)
    _BACKEND = name


def attend(q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: AttnMeta) -> Tensor:
    """q [T, H, D]; pools [pages, page_size, Hkv, D] -> [T, H, D]."""
    if q.is_cuda and _BACKEND == "varlen" and q.dtype in (torch.bfloat16, torch.float16):
        return _attend_varlen(q, k_pool, v_pool, meta)
    return _attend_sdpa(q, k_pool, v_pool, meta)


def _attend_varlen(q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: AttnMeta) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu_q, table, used, max_q, max_k = meta.varlen_inputs(q.device)
    return varlen_attn(q.contiguous(), k_pool, v_pool, cu_q, None, max_q, max_k, enable_gqa=True,
                       seqused_k=used, block_table=table, window_size=(-1, 0) if meta.causal else (-1, -1))


def gather_pages(pool: Tensor, pages: tuple[int, ...], length: int, meta: AttnMeta | None = None) -> Tensor:
    """The first `length` tokens of `pages` as [length, Hkv, D]: a view when the pages are consecutive,
    else a gather (its index tensor is kept in `meta`, so a denoising loop uploads it once)."""
    first = pages[0]
    if pages == tuple(range(first, first + len(pages))):
        return pool[first:first + len(pages)].flatten(0, 1)[:length]
    cache = meta._device_cache if meta is not None else {}
    key = ("pages", pages)
    index = cache.get(key)
    if index is None:
        index = cache[key] = torch.tensor(pages, device=pool.device)
    return pool[index].flatten(0, 1)[:length]  # type: ignore[index]


def _attend_sdpa(q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: AttnMeta) -> Tensor:
    out = torch.empty_like(q)
    keys: dict[tuple[tuple[int, ...], int], tuple[Tensor, Tensor]] = {}
    for s in meta.seqs:
        kv = keys.get((s.pages, s.kv_len))
        if kv is None:
            kv = keys[(s.pages, s.kv_len)] = (gather_pages(k_pool, s.pages, s.kv_len, meta),
                                              gather_pages(v_pool, s.pages, s.kv_len, meta))
        k, v = (t.transpose(0, 1).unsqueeze(0) for t in kv)  # [1, Hkv, L, D]
        qs = q[s.q_start:s.q_end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        n, length = s.q_end - s.q_start, s.kv_len
        mask = None
        if meta.causal and n > 1:  # query row i sees the past and new rows 0..i (bottom-right aligned)
            rows = torch.arange(n, device=q.device)[:, None] + (length - n)
            mask = torch.arange(length, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
        out[s.q_start:s.q_end] = o[0].transpose(0, 1)
    return out
