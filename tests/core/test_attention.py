"""Attention over the paged pool equals plain attention over the same keys."""

from __future__ import annotations

import math

import torch

from irg_core.attention import AttnMeta, Seq, attend


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [n, H, D], k/v [L, Hkv, D] -> [n, H, D]; causal rows are the last n keys (bottom-right)."""
    n, h, d = q.shape
    group = h // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) / math.sqrt(d)
    if causal:
        length = k.shape[0]
        allowed = torch.arange(length)[None, :] <= torch.arange(n)[:, None] + (length - n)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def test_paged_attention_matches_dense_for_scattered_pages() -> None:
    torch.manual_seed(0)
    page, pages, hkv, d = 4, 12, 2, 8
    kp, vp = torch.randn(pages, page, hkv, d), torch.randn(pages, page, hkv, d)
    q = torch.randn(9, 6, d)
    layouts = [(3, 4, 5), (7, 2, 10), (0,)]  # consecutive, scattered, single page
    lengths = [11, 10, 3]
    rows = [(0, 4), (4, 7), (7, 9)]
    seqs = [Seq(a, b, p, n) for (a, b), p, n in zip(rows, layouts, lengths)]
    for causal in (False, True):
        out = attend(q, kp, vp, AttnMeta(seqs, causal))
        for (a, b), p, n in zip(rows, layouts, lengths):
            k = kp[list(p)].flatten(0, 1)[:n]
            v = vp[list(p)].flatten(0, 1)[:n]
            torch.testing.assert_close(out[a:b], reference(q[a:b], k, v, causal), atol=1e-5, rtol=1e-5)
