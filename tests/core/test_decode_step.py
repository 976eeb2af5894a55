"""The static decode step: the same logits as the packed (prefill) path, few ops, batch rows independent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from irg_core.config import BagelConfig
from irg_core.engine import Engine
from irg_core.kv_cache import EMPTY
from irg_core.loader import build_dummy, load_model
from irg_core.steps import DecodeStep, Decoding
from irg_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=16)


def _packed_logits(e: Engine, ctx, ids: list[int]) -> torch.Tensor:
    """Logits of each id fed one at a time through the general packed forward (what decoding used to run)."""
    from irg_core.attention import AttnMeta, Seq
    from irg_core.model.qwen2_mot import RowGroups

    out = []
    for token in ids:
        new, slots = e.pool.extend(ctx, 1)
        x = e.model.embed_tokens(torch.tensor([token]))
        h = e._forward(
            x,
            torch.tensor([ctx.rope]),
            RowGroups.split(1, 0),
            False,
            slots,
            AttnMeta([Seq(0, 1, new.pages, new.length)], True),
        )
        out.append(e.model.logits(h)[0])
        ctx = new.advanced(1)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_step_agrees_with_the_packed_path(golden_dir: Path, dtype: torch.dtype) -> None:
    e = Engine(load_model(golden_dir / "model", device="cpu", dtype=dtype), page_size=16, kv_cache_bytes=2**22)
    ctx = e.prefill_text(EMPTY, e.tok.frame("A lighthouse on a cliff at dusk."))
    seq = Decoding(ctx, 6)
    logits, ids = [], []
    for _ in range(6):
        token, row = e.run_decode([DecodeStep(seq, logits=True)])[0]
        logits.append(row)
        ids.append(token)
    e.free_decoding(seq)
    reference = _packed_logits(e, ctx, [e.tok.special.bos] + ids[:-1])
    tol = 2e-3 if dtype == torch.float32 else 0.25
    assert float((torch.stack(logits).float() - reference.float()).abs().max()) <= tol
    assert [int(i) for i in reference.argmax(-1)] == ids


def test_batched_rows_decode_what_they_decode_alone(engine: Engine) -> None:
    engine.reset_pool()
    prompts = ["A red fox.", "Ein Leuchtturm in der Dämmerung, 灯塔", "A teapot on a sunny windowsill"]
    ctxs = [engine.prefill_text(EMPTY, engine.tok.frame(p)) for p in prompts]
    alone = [engine.decode(c, 8, temperature=t, seed=s) for c, t, s in zip(ctxs, (0.0, 0.7, 1.3), (1, 2, 3))]
    seqs = [Decoding(c, 8, t, s) for c, t, s in zip(ctxs, (0.0, 0.7, 1.3), (1, 2, 3))]
    together: list[list[int]] = [[], [], []]
    for _ in range(8):
        for i, (token, _) in enumerate(engine.run_decode([DecodeStep(s) for s in seqs])):
            together[i].append(token)
    for seq in seqs:
        engine.free_decoding(seq)
    eos = engine.tok.special.eos
    assert [t[: t.index(eos)] if eos in t else t for t in together] == alone


def test_a_28_layer_decode_token_costs_at_most_1300_aten_ops(golden_dir: Path) -> None:
    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    cfg = BagelConfig.from_dict(
        {
            "llm": {
                "hidden_size": 64,
                "num_hidden_layers": 28,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
                "vocab_size": 152064,
                "rope_theta": 1e6,
            },
            "vit": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2},
            "vae": {"ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1},
        }
    )
    tok = Tokenizer.from_dir(golden_dir / "model")
    e = Engine(build_dummy(cfg, "cpu", torch.bfloat16, tokenizer=tok), page_size=16, kv_cache_bytes=2**22)
    seq = Decoding(e.prefill_text(EMPTY, tok.frame("hello")), 4)
    e.run_decode([DecodeStep(seq)])
    with Count():
        e.run_decode([DecodeStep(seq)])
    assert Count.n <= 1300, Count.n


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_rows_linear_is_the_linear_layer(rows: int) -> None:
    """The decode step's projection (weight @ x^T) computes F.linear."""
    from torch.nn import functional as F

    from irg_core.model.qwen2_mot import rows_linear

    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 64, generator=g), torch.randn(96, 64, generator=g)
    torch.testing.assert_close(rows_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert rows_linear(x, w).shape == (rows, 96)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own imports
def test_the_compiled_step_gives_the_eager_tokens(golden_dir: Path) -> None:
    """`compile_decode` (opt-in, `irg ... --compile`): the decode step through torch.compile (whole graph,
    Inductor) gives the eager step's greedy tokens, alone and with a second sequence beside it."""
    loaded = load_model(golden_dir / "model", device="cpu")
    eager, compiled = Engine(loaded, page_size=16), Engine(loaded, page_size=16, compile_decode=True)
    assert compiled.decoder.compiled and not eager.decoder.compiled

    def run(e: Engine) -> list[list[int]]:
        ctxs = [e.prefill_text(EMPTY, e.tok.frame(p)) for p in ("A red fox.", "A lighthouse at dusk, waves below.")]
        alone = e.decode(ctxs[0], 6, ignore_eos=True)
        seqs = [Decoding(c, 6) for c in ctxs]
        together = [[t for (t, _) in e.run_decode([DecodeStep(s) for s in seqs])] for _ in range(6)]
        for s in seqs:
            e.free_decoding(s)
        return [alone, *map(list, zip(*together))]

    assert run(compiled) == run(eager)
