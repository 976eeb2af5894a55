"""A paged KV pool and the contexts that live in it.

The pool holds, per layer, keys and values as [pages, page_size, kv_heads, head_dim], allocated once per
size and reused by every trajectory. A `Context` is an immutable view: the pages it reads, its token count
(`length`, the official kv_len) and its next RoPE position (`rope`). Extending a context returns a new one
whose pages start with the old context's pages, so guidance contexts that share a prefix share its KV —
nothing is deep-copied. The only copy the pool ever makes is copy-on-write of a partly filled last page
(fewer than `page_size` tokens) when two contexts grow apart from the same parent.

Allocation is a bump pointer with `mark()` / `release(mark)`, used for the transient rows of a denoising
loop or a text decode, whose keys live in the pool only while they are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from irg_core.config import LLMConfig


@dataclass(frozen=True, slots=True)
class Context:
    pages: tuple[int, ...] = ()
    length: int = 0
    rope: int = 0

    def advanced(self, rope_step: int) -> Context:
        return Context(self.pages, self.length, self.rope + rope_step)


EMPTY = Context()


class PoolFull(RuntimeError):
    """The KV pool has no free page left."""


class KVPool:
    def __init__(self, cfg: LLMConfig, num_pages: int, page_size: int, device: torch.device | str,
                 dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, 2, num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim)
        self.data = torch.zeros(shape, device=device, dtype=dtype)
        self.page_size = page_size
        self.num_pages = num_pages
        self._next = 0  # first free page
        self._fill: dict[int, int] = {}  # page -> tokens written into it
        self.copied_tokens = 0  # copy-on-write traffic since the last reset, in tokens

    @property
    def layers(self) -> list[tuple[Tensor, Tensor]]:
        return [(self.data[i, 0], self.data[i, 1]) for i in range(self.data.shape[0])]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def reset(self) -> None:
        self._next, self._fill, self.copied_tokens = 0, {}, 0

    def mark(self) -> tuple[int, dict[int, int]]:
        return self._next, dict(self._fill)

    def release(self, mark: tuple[int, dict[int, int]]) -> None:
        """Forget every page and fill made after `mark` (contexts created since then become invalid)."""
        self._next, self._fill = mark[0], dict(mark[1])

    @property
    def used_pages(self) -> int:
        return self._next

    def _new_page(self) -> int:
        if self._next >= self.num_pages:
            raise PoolFull(f"KV pool is full ({self.num_pages} pages of {self.page_size} tokens)")
        page = self._next
        self._next += 1
        self._fill[page] = 0
        return page

    def extend(self, ctx: Context, n: int) -> tuple[Context, Tensor]:
        """Room for n more tokens after `ctx`: the extended context and the n flat slot indices to write."""
        p = self.page_size
        pages = list(ctx.pages)
        used = ctx.length % p
        if used and self._fill[pages[-1]] != used:  # the tail page's free part belongs to another context
            pages[-1] = self._copy_partial(pages[-1], used)
        slots: list[int] = []
        offset = used
        if not used:
            offset = p  # force a new page
        while len(slots) < n:
            if offset == p:
                pages.append(self._new_page())
                offset = 0
            take = min(p - offset, n - len(slots))
            slots.extend(range(pages[-1] * p + offset, pages[-1] * p + offset + take))
            offset += take
            self._fill[pages[-1]] = offset
        device = self.data.device
        return Context(tuple(pages), ctx.length + n, ctx.rope), torch.tensor(slots, dtype=torch.long, device=device)

    def _copy_partial(self, page: int, used: int) -> int:
        new = self._new_page()
        self.data[:, :, new, :used] = self.data[:, :, page, :used]
        self._fill[new] = used
        self.copied_tokens += used
        return new


def pages_needed(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)
