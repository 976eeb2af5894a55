"""A paged KV pool shared by many trajectories, and the contexts that live in it.

The pool holds, per layer, keys and values as [pages, page_size, kv_heads, head_dim], allocated once when the
engine is built. A `Context` is an immutable view: the pages it reads, its token count (`length`, the official
kv_len) and its next RoPE position (`rope`). Extending a context returns a new one whose pages start with the
old context's pages, so guidance contexts that share a prefix share its KV — nothing is deep-copied. The only
copy the pool ever makes is copy-on-write of a partly filled last page (fewer than `page_size` tokens) when two
contexts grow apart from the same parent.

Pages sit on a free list and carry reference counts: every context made by `extend` holds one reference to
each of its pages, `free(ctx)` drops them, and a page goes back to the free list when its last holder lets go.
So a prefix shared by a trajectory's guidance contexts stays until the last of them is freed, and a cancelled
trajectory gives its pages back at once without touching anyone else's.
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
    def __init__(self, cfg: LLMConfig, num_pages: int, page_size: int, device: torch.device | str, dtype: torch.dtype):
        if num_pages < 1:
            raise ValueError("a KV pool needs at least one page")
        shape = (cfg.num_hidden_layers, 2, num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim)
        # Zeroed, not empty: a masked attention reads whole pages, and 0 * NaN garbage would be NaN.
        self.data = torch.zeros(shape, device=device, dtype=dtype)
        self.page_size = page_size
        self.num_pages = num_pages
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(self.data.shape[0])]
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: low page numbers first
        self._refs = [0] * num_pages
        self._fill = [0] * num_pages  # tokens written into each page since it was taken
        self.copied_tokens = 0  # copy-on-write traffic, in tokens

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def reset(self) -> None:
        """Every page back on the free list (for tests that drive single units)."""
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._refs = [0] * self.num_pages
        self._fill = [0] * self.num_pages
        self.copied_tokens = 0

    def reserve_scratch(self) -> int:
        """Take the highest free page for good: a place to write rows whose keys nobody reads."""
        page = max(self._free)
        self._free.remove(page)
        self._refs[page] = 1
        return page

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def _new_page(self) -> int:
        if not self._free:
            raise PoolFull(f"KV pool is full ({self.num_pages} pages of {self.page_size} tokens)")
        page = self._free.pop()
        self._refs[page] = 1
        self._fill[page] = 0
        return page

    def extend(self, ctx: Context, n: int) -> tuple[Context, Tensor]:
        """Room for n more tokens after `ctx`: the extended context (holding its own references to every page)
        and the n flat slot indices to write."""
        new, slots = self.extend_slots(ctx, n)
        return new, torch.tensor(slots, dtype=torch.long, device=self.data.device)

    def extend_slots(self, ctx: Context, n: int) -> tuple[Context, list[int]]:
        """`extend` with the slots as a Python list (for callers that fill their own device buffers)."""
        p = self.page_size
        pages = list(ctx.pages)
        used = ctx.length % p
        taken: list[int] = []
        try:
            if used and self._fill[pages[-1]] != used:  # the tail page's free part belongs to another context
                pages[-1] = self._copy_partial(pages[-1], used)
                taken.append(pages[-1])
            slots: list[int] = []
            offset = used if used else p  # a full (or no) tail page: start a new one
            while len(slots) < n:
                if offset == p:
                    pages.append(self._new_page())
                    taken.append(pages[-1])
                    offset = 0
                take = min(p - offset, n - len(slots))
                slots.extend(range(pages[-1] * p + offset, pages[-1] * p + offset + take))
                offset += take
                self._fill[pages[-1]] = offset
        except PoolFull:
            for page in taken:
                self._unref(page)
            raise
        fresh = set(taken)
        for page in pages:
            if page not in fresh:
                self._refs[page] += 1
        return Context(tuple(pages), ctx.length + n, ctx.rope), slots

    def free(self, ctx: Context) -> None:
        """Drop `ctx`'s reference to each of its pages; pages nobody holds go back to the free list."""
        for page in ctx.pages:
            self._unref(page)

    def _unref(self, page: int) -> None:
        refs = self._refs[page] - 1
        if refs < 0:
            raise RuntimeError(f"KV page {page} freed more often than it was taken")
        self._refs[page] = refs
        if refs == 0:
            self._free.append(page)

    def _copy_partial(self, page: int, used: int) -> int:
        new = self._new_page()
        self.data[:, :, new, :used] = self.data[:, :, page, :used]
        self._fill[new] = used
        self.copied_tokens += used
        return new


def pages_needed(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)
