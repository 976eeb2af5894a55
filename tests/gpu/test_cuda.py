"""Checks that need a CUDA device: `benchmarks/gpu_check.sh` runs them (`pytest -m gpu tests/gpu`) on a lent GPU;
elsewhere they are skipped, and the skip says so.

- Every attention call shape reaches a fused SDPA kernel, at the golden's head layout and at BAGEL-7B-MoT's.
- Each other attention backend agrees with `sdpa` on the golden model in bfloat16: the logits of a prefilled
  prompt's next token, and a whole direct-mode image (no sampled thought whose token could flip). A backend
  this installation cannot run (flash-attn or xformers missing, or built for another torch) is skipped with
  the reason `make_backend` gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from irg_core.attention import BackendUnavailable, probe_sdpa_kernels
from irg_core.engine import Engine
from irg_core.kv_cache import EMPTY
from irg_core.loader import LoadedModel, load_model
from irg_core.params import GenerationParams
from irg_core.trajectory import run_trajectory
from tests.conftest import GOLDEN, REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODEL = Path(os.environ.get("IRG_GOLDEN_MODEL", str(GOLDEN / "model")))  # gpu_check.sh: .carry/golden/model
KV_BYTES = 2**28
PROMPT = "A red lighthouse on a cliff at dusk, waves below."


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(MODEL, "cuda", torch.bfloat16)


def test_every_call_shape_reaches_a_fused_kernel(loaded: LoadedModel) -> None:
    llm = json.loads((REPO / "irg_core" / "data" / "bagel_7b_mot.json").read_text())["llm"]
    full = probe_sdpa_kernels(
        torch.device("cuda"),
        torch.bfloat16,
        llm["num_attention_heads"],
        llm["num_key_value_heads"],
        llm["hidden_size"] // llm["num_attention_heads"],
    )
    golden = Engine(loaded, kv_cache_bytes=KV_BYTES).attention_kernels
    for name, kernels in (("golden", golden), ("BAGEL-7B-MoT", full)):
        for shape, choice in kernels.items():
            print(f"{name:<13} {shape:<40} {choice.kernel}{' (expanded key heads)' if choice.expand_kv else ''}")
        assert all(c.kernel != "MATH" for c in kernels.values()), (name, kernels)


def _next_token_logits(engine: Engine) -> torch.Tensor:
    ctx = engine.prefill_text(EMPTY, engine.tok.frame(PROMPT))
    seen: list[torch.Tensor] = []
    engine.decode(ctx, 1, on_logits=lambda t: seen.append(t.float().cpu()), ignore_eos=True)
    engine.pool.free(ctx)
    return seen[0]


@pytest.mark.parametrize("backend", ["varlen", "flash", "xformers"])
def test_backend_agrees_with_sdpa(loaded: LoadedModel, backend: str) -> None:
    try:
        other = Engine(loaded, attention=backend, kv_cache_bytes=KV_BYTES)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    sdpa = Engine(loaded, attention="sdpa", kv_cache_bytes=KV_BYTES)
    a, b = _next_token_logits(sdpa), _next_token_logits(other)
    assert float((a - b).abs().max()) <= 0.05 * float(a.abs().max()), "next-token logits differ"
    p = GenerationParams(prompt=PROMPT, mode="direct", width=128, height=96, steps=12, seed=5)
    x = run_trajectory(sdpa, p, keep_tensors=True).tensors["round1.final_latent"].float()
    y = run_trajectory(other, p, keep_tensors=True).tensors["round1.final_latent"].float()
    rel = float((x - y).norm() / x.norm())
    print(f"{backend}: next-token logits max diff {float((a - b).abs().max()):.4f}, direct latent rel. diff {rel:.4f}")
    assert rel < 0.03, rel
