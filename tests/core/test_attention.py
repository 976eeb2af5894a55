"""Attention over the paged pool (packed sequences and the batched decode step) equals plain attention."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from irg_core.attention import (
    CALL_SHAPES,
    AttnMeta,
    BackendUnavailable,
    DecodeBuffers,
    SdpaBackend,
    Seq,
    make_backend,
    probe_sdpa_kernels,
)

# Grouped key heads as they are, and expanded to the query heads (where a fused CUDA kernel needs it).
BACKENDS = [SdpaBackend(), SdpaBackend(frozenset(CALL_SHAPES))]


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


@pytest.mark.parametrize("backend", BACKENDS, ids=["gqa", "expanded"])
def test_paged_attention_matches_dense_for_scattered_pages(backend: SdpaBackend) -> None:
    torch.manual_seed(0)
    page, pages, hkv, d = 4, 12, 2, 8
    kp, vp = torch.randn(pages, page, hkv, d), torch.randn(pages, page, hkv, d)
    q = torch.randn(9, 6, d)
    layouts = [(3, 4, 5), (7, 2, 10), (0,)]  # consecutive, scattered, single page
    lengths = [11, 10, 3]
    rows = [(0, 4), (4, 7), (7, 9)]
    seqs = [Seq(a, b, p, n) for (a, b), p, n in zip(rows, layouts, lengths)]
    for causal in (False, True):
        out = backend.packed(q, kp, vp, AttnMeta(seqs, causal))
        for (a, b), p, n in zip(rows, layouts, lengths):
            k = kp[list(p)].flatten(0, 1)[:n]
            v = vp[list(p)].flatten(0, 1)[:n]
            torch.testing.assert_close(out[a:b], reference(q[a:b], k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=["gqa", "expanded"])
def test_decode_rows_each_attend_their_own_context(backend: SdpaBackend) -> None:
    """B decode rows over one pool, each with its own scattered pages and length, via device buffers."""
    torch.manual_seed(1)
    page, pages, hkv, d = 4, 12, 2, 8
    kp, vp = torch.randn(pages, page, hkv, d), torch.randn(pages, page, hkv, d)
    flat_k, flat_v = kp.view(-1, hkv, d), vp.view(-1, hkv, d)
    layouts, lengths = [(3, 4, 5), (7, 2, 10), (0,)], [11, 6, 1]
    buf = DecodeBuffers.allocate(3, 16, torch.device("cpu"))
    for i, (p, n) in enumerate(zip(layouts, lengths)):
        slots = (torch.tensor(p)[:, None] * page + torch.arange(page)).flatten()
        buf.key_slots[i, : slots.shape[0]] = slots
        buf.mask[i, 0, 0, :n] = True
    q = torch.randn(3, 6, d)
    out = backend.decode(q, flat_k, flat_v, buf)
    for i, (p, n) in enumerate(zip(layouts, lengths)):
        k = kp[list(p)].flatten(0, 1)[:n]
        v = vp[list(p)].flatten(0, 1)[:n]
        torch.testing.assert_close(out[i : i + 1], reference(q[i : i + 1], k, v, False), atol=1e-5, rtol=1e-5)


def test_backends_are_chosen_by_name_and_missing_extras_are_named() -> None:
    assert make_backend("sdpa").name == "sdpa"
    for name, extra in (("flash", ".[flash]"), ("xformers", ".[xformers]")):
        try:
            make_backend(name)
        except BackendUnavailable as e:
            assert extra in str(e) or "no tested kernel" in str(e)
        else:
            raise AssertionError(f"{name} should not be usable on this build")
    try:
        make_backend("magic")
    except BackendUnavailable as e:
        assert "sdpa" in str(e)


def test_an_xformers_built_for_another_torch_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """xformers imports without its kernels when its wheel was built for another torch (the registry's 0.0.35
    is built for torch 2.10 + CUDA 12.8): it only logs a warning, so the backend checks and says so."""
    fake = types.ModuleType("xformers")
    fake._has_cpp_library = False
    fake._cpp_lib = types.ModuleType("xformers._cpp_lib")
    fake._cpp_lib._cpp_library_load_exception = RuntimeError("xFormers was built for:\n    PyTorch 2.10.0+cu128")
    monkeypatch.setitem(sys.modules, "xformers", fake)
    with pytest.raises(BackendUnavailable) as e:
        make_backend("xformers")
    assert str(e.value) == (
        f"attention backend 'xformers' needs xformers built for torch {torch.__version__}: pip install "
        ".[xformers] (the installed xformers imports, but its kernels do not load: xFormers was built for: "
        "PyTorch 2.10.0+cu128)"
    )


def test_the_kernel_probe_names_a_kernel_for_every_call_shape() -> None:
    """The start-up probe (run on CUDA by the engine) answers for each call shape; on this CPU PyTorch's CPU
    flash kernel takes every shape with grouped key heads."""
    kernels = probe_sdpa_kernels(torch.device("cpu"), torch.float32, heads=6, kv_heads=2, head_dim=8)
    assert set(kernels) == set(CALL_SHAPES)
    for choice in kernels.values():
        assert choice.kernel in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    assert all(c.kernel == "FLASH_ATTENTION" and not c.expand_kv for c in kernels.values())


def test_varlen_needs_a_torch_whose_varlen_attn_takes_paged_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.13's varlen_attn takes a block table and grouped heads; an earlier one (the GPU machines here
    carry torch 2.11) may not: the backend is refused at start instead of failing in the first forward."""
    import torch.nn.attention.varlen as varlen

    assert make_backend("varlen").name == "varlen"

    def older(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):  # noqa: ANN001
        raise AssertionError("never called")

    monkeypatch.setattr(varlen, "varlen_attn", older)
    with pytest.raises(BackendUnavailable, match="varlen_attn lacks block_table, enable_gqa, seqused_k, window_size"):
        make_backend("varlen")
