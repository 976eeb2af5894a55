"""The paged KV pool: contexts share their prefix pages; only a partly filled tail page is ever copied."""

from __future__ import annotations

import torch

from irg_core.config import LLMConfig
from irg_core.kv_cache import EMPTY, KVPool, PoolFull

CFG = LLMConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=100,
)


def pool(pages: int = 16, page_size: int = 4) -> KVPool:
    return KVPool(CFG, pages, page_size, "cpu", torch.float32)


def test_extend_fills_the_tail_page_before_taking_a_new_one() -> None:
    p = pool()
    a, slots = p.extend(EMPTY, 6)
    assert a.pages == (0, 1) and a.length == 6 and slots.tolist() == [0, 1, 2, 3, 4, 5]
    b, slots = p.extend(a, 3)
    assert b.pages == (0, 1, 2) and slots.tolist() == [6, 7, 8]
    assert p.copied_tokens == 0


def test_siblings_share_full_pages_and_copy_only_the_partial_tail() -> None:
    p = pool()
    parent, _ = p.extend(EMPTY, 10)  # pages 0, 1 full; page 2 holds 2 tokens
    p.data[:, :, 2, :2] = 7.0
    first, _ = p.extend(parent, 3)  # writes into page 2's free part
    second, slots = p.extend(parent, 3)  # page 2's free part is taken: copy its 2 tokens to a new page
    assert first.pages[:2] == second.pages[:2] == parent.pages[:2]  # the prefix is shared, not copied
    assert first.pages[2] == 2 and second.pages[2] != 2
    assert p.copied_tokens == 2 < p.page_size
    assert torch.equal(p.data[:, :, second.pages[2], :2], p.data[:, :, 2, :2])
    assert slots.tolist() == [second.pages[2] * 4 + i for i in (2, 3)] + [second.pages[3] * 4]


def test_freed_rows_give_their_pages_back() -> None:
    p = pool()
    ctx, _ = p.extend(EMPTY, 5)
    room, _ = p.extend(ctx, 9)  # transient rows after ctx (a decode or a denoising room)
    assert p.used_pages == 4
    p.free(room)
    assert p.used_pages == 2 and p.refcount(0) == 1 and p.refcount(1) == 1
    p.free(ctx)
    assert p.used_pages == 0 and p.free_pages == 16


def test_shared_prefix_pages_live_until_their_last_holder_goes() -> None:
    p = pool()
    prefix, _ = p.extend(EMPTY, 8)  # two full pages
    a, _ = p.extend(prefix, 4)
    b, _ = p.extend(prefix, 4)
    assert p.refcount(0) == p.refcount(1) == 3
    p.free(prefix)
    p.free(a)
    assert p.refcount(0) == 1 and p.used_pages == 3  # b still holds the prefix and its own page
    p.free(b)
    assert p.used_pages == 0


def test_a_failed_extend_takes_nothing() -> None:
    p = pool(pages=3)
    ctx, _ = p.extend(EMPTY, 6)
    try:
        p.extend(ctx, 10)
    except PoolFull:
        pass
    else:
        raise AssertionError("expected PoolFull")
    assert p.used_pages == 2 and p.refcount(1) == 1


def test_pool_full_is_an_error_not_an_overwrite() -> None:
    p = pool(pages=2)
    ctx, _ = p.extend(EMPTY, 8)
    try:
        p.extend(ctx, 1)
    except PoolFull as e:
        assert "full" in str(e)
    else:
        raise AssertionError("expected PoolFull")
