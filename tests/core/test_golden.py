"""The official numbers of shared/golden/tiny_bagel_a, reproduced stage by stage.

Tolerances are those of the golden README: text.logits0 <= 3e-3 absolute (we round q/k/v and the KV cache to
bf16 as the official code does), greedy ids identical, feature and cache paths to float32 precision, latents
<= 5 % relative, images <= 8 levels max and <= 1.5 mean. Round 2 is also checked with the golden think texts
and the golden image 1 forced into the context, so its numbers do not inherit round 1's differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from irg_core.engine import Branches, Engine
from irg_core.kv_cache import EMPTY
from irg_core.loader import load_model
from irg_core.params import GenerationParams, RoundGuidance
from irg_core.trajectory import run_trajectory
from irg_core.transforms import VAE_TRANSFORM, VIT_TRANSFORM, patchify, to_uint8


@pytest.fixture(scope="module")
def G(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir / "golden.safetensors"))


@pytest.fixture(scope="module")
def case(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "case.json").read_text())


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.double()
    return float((a - b).norm() / b.norm())


def guidance(r: dict) -> RoundGuidance:
    return RoundGuidance(
        r["cfg_text_scale"],
        r.get("cfg_img_scale", 1.0),
        tuple(r["cfg_interval"]),
        r["cfg_renorm_type"],
        r["cfg_renorm_min"],
        r["timestep_shift"],
    )


def ids(t: torch.Tensor) -> list[int]:
    return [int(i) for i in t]


def test_prompts_are_framed_like_the_official_code(engine: Engine, G, case) -> None:
    assert engine.tok.frame(case["recipe"]["system_prompt"]) == ids(G["text.system_ids"])
    assert engine.tok.frame(case["prompt"]) == ids(G["text.user_ids"])


def test_first_logits_and_greedy_thought(engine: Engine, G) -> None:
    engine.reset_pool(2000, 8)
    ctx = engine.prefill_text(EMPTY, ids(G["text.system_ids"]))
    ctx = engine.prefill_text(ctx, ids(G["text.user_ids"]))
    assert (ctx.length, ctx.rope) == (277, 277)
    logits: list[torch.Tensor] = []
    out = engine.decode(ctx, len(G["text.greedy_ids"]) - 1, on_logits=lambda x: logits.append(x.clone()))
    assert float((logits[0] - G["text.logits0"]).abs().max()) <= 3e-3
    assert out == ids(G["text.greedy_ids"])[1:]
    top5 = torch.stack([x.topk(5).indices for x in logits])
    assert torch.equal(top5[:, 0], G["text.step_top5_ids"][: len(logits), 0])


def test_vit_path(engine: Engine, G, golden_dir: Path) -> None:
    image = Image.open(golden_dir / "input.png").convert("RGB")
    assert np.array_equal(np.asarray(VIT_TRANSFORM.resize(image)), G["vit.image_u8"].numpy())
    x = VIT_TRANSFORM(image)
    patches = patchify(x, 14)
    pos = torch.arange(x.shape[1] // 14)[:, None] * 70 + torch.arange(x.shape[2] // 14)[None, :]
    assert torch.equal(pos.flatten(), G["vit.position_ids"])
    enc = engine.model.vit_model(patches, pos.flatten())
    assert rel(enc, G["vit.encoder_out"]) < 1e-5
    assert rel(engine.vit_rows(image), G["vit.llm_features"]) < 1e-5
    engine.reset_pool(1000, 4)
    ctx = engine.prefill_vit_image(EMPTY, image)
    assert (ctx.length, ctx.rope) == (370, 1)
    keys, values = _cache(engine, ctx.length)
    assert rel(keys, G["vit.kv_keys"]) < 1e-3 and rel(values, G["vit.kv_values"]) < 1e-3


def test_vae_path(engine: Engine, G, golden_dir: Path, case) -> None:
    image = Image.open(golden_dir / "input.png").convert("RGB")
    assert np.array_equal(np.asarray(VAE_TRANSFORM.resize(image)), G["vae.image_u8"].numpy())
    x = VAE_TRANSFORM(image)[None]
    assert rel(engine.vae.moments(x), G["vae.encoder_moments"]) < 1e-5
    rows, latent = engine.vae_rows(image, case["seed"] + 3)  # the golden's posterior eps seed
    assert rel(latent, G["vae.latent"]) < 1e-5
    assert rel(patchify(latent[0], 2), G["vae.packed_latent"]) < 1e-5
    assert rel(rows, G["vae.llm_features"]) < 1e-5
    engine.reset_pool(3000, 4)
    ctx = engine.prefill_vae_image(EMPTY, image, case["seed"] + 3)
    assert (ctx.length, ctx.rope) == (1474, 1)
    keys, values = _cache(engine, ctx.length)
    assert rel(keys, G["vae.kv_keys"]) < 3e-3 and rel(values, G["vae.kv_values"]) < 3e-3  # sporadic bf16 flips
    assert rel(engine.vae.decode(G["vae_decode.latent"]), G["vae_decode.image"]) < 1e-5


def _cache(engine: Engine, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's first `length` cached tokens as [layers, length, kv_heads, head_dim] (one context from 0)."""
    data = engine.pool.data
    return data[:, 0].flatten(1, 2)[:, :length], data[:, 1].flatten(1, 2)[:, :length]


def _check_image_round(engine: Engine, G, k: int, branches: Branches, g: RoundGuidance, case) -> torch.Tensor:
    seen: dict[tuple[str, int], torch.Tensor] = {}
    latent = engine.generate_image(
        branches,
        case["width"],
        case["height"],
        case["num_timesteps"],
        g,
        G[f"traj.round{k}.init_noise"],
        observe=lambda name, i, v: seen.__setitem__((name, i), v.clone()),
    )
    pre = f"traj.round{k}."
    assert rel(seen[("cond", 0)], G[pre + "step0_v_cond"]) < 1e-3
    assert rel(seen[("no_text", 0)], G[pre + "step0_v_cfg_text"]) < 1e-3
    if k == 2:
        assert rel(seen[("no_img", 0)], G[pre + "step0_v_cfg_img"]) < 1e-3
    # Guidance amplifies the branches' differences (text x4 in round 1, text x image x8 in round 2): the
    # goldens' README puts a valid float32 implementation at ~1 % of max|v| in round 1 and 1.5-3.6 % in round
    # 2; other CPUs' kernels sum in another order (1.8e-3 seen on an AVX2-only EPYC in round 1).
    assert rel(seen[("v_t", 0)], G[pre + "v_t_first"]) < 1e-2
    steps = case["num_timesteps"] - 1
    for i in range(steps):
        assert rel(seen[("x_t", i)], G[pre + "x_t"][i]) < 0.02, f"x_t step {i}"
        assert rel(seen[("v_t", i)], G[pre + "v_t"][i]) < 0.05, f"v_t step {i}"
    assert rel(latent, G[pre + "final_latent"]) < 0.02
    image, pixels = engine.decode_latent(latent, case["width"], case["height"])
    assert rel(image, G[pre + "image"]) < 0.02
    diff = np.abs(pixels.astype(int) - G[pre + "image_u8"].numpy().astype(int))
    assert diff.max() <= 8 and diff.mean() <= 1.5
    # and with the golden latent, the decode alone is float32-exact
    exact, _ = engine.decode_latent(G[pre + "final_latent"], case["width"], case["height"])
    assert rel(exact, G[pre + "image"]) < 1e-5
    return latent


def test_round_one_teacher_forced(engine: Engine, G, case) -> None:
    engine.reset_pool(3000, 16)
    system = engine.prefill_text(EMPTY, ids(G["text.system_ids"]))
    main = engine.prefill_text(system, ids(G["text.user_ids"]))
    main = engine.prefill_text(main, ids(G["traj.round1.think_fed_ids"]))
    assert (main.length, main.rope) == (290, 290)
    _check_image_round(engine, G, 1, Branches(main, system, None), guidance(case["round1"]), case)


def test_round_two_teacher_forced(engine: Engine, G, case) -> None:
    """Round 2 from the golden thoughts and the golden image 1 (VAE eps from seed + 2)."""
    engine.reset_pool(6000, 24)
    system = engine.prefill_text(EMPTY, ids(G["text.system_ids"]))
    main = engine.prefill_text(system, ids(G["text.user_ids"]))
    main = engine.prefill_text(main, ids(G["traj.round1.think_fed_ids"]))
    texts = main
    image1 = Image.fromarray(G["traj.round1.image_u8"].numpy())
    assert np.array_equal(np.asarray(VAE_TRANSFORM.resize(image1)), G["traj.round2.ctx_vae_image_u8"].numpy())
    assert np.array_equal(np.asarray(VIT_TRANSFORM.resize(image1)), G["traj.round2.ctx_vit_image_u8"].numpy())
    rows, latent = engine.vae_rows(image1, case["seed"] + 2)
    assert rel(latent, G["traj.round2.ctx_vae_latent"]) < 1e-5
    assert rel(rows, G["traj.round2.ctx_vae_llm_features"]) < 1e-5
    assert rel(engine.vit_rows(image1), G["traj.round2.ctx_vit_llm_features"]) < 1e-5
    main = engine.prefill_vit_image(engine.prefill_vae_image(main, image1, case["seed"] + 2), image1)
    no_text = main
    assert (no_text.length, no_text.rope) == (1574, 292)
    thought = engine.decode(main, 11)
    assert thought == ids(G["traj.round2.think_ids"])[1:]
    fed = engine.tok.frame(engine.tok.thought(thought))
    assert fed == ids(G["traj.round2.think_fed_ids"])
    main = engine.prefill_text(main, fed)
    texts = engine.prefill_text(texts, fed)
    assert (main.length, main.rope) == (1587, 305)
    assert (texts.length, texts.rope) == (303, 303)
    _check_image_round(engine, G, 2, Branches(main, no_text, texts), guidance(case["round2"]), case)


def test_whole_trajectory(engine: Engine, G, case) -> None:
    """End to end through run_trajectory (no teacher forcing): ids identical, latents and images close."""
    p = GenerationParams(
        case["prompt"],
        "irg",
        2,
        case["width"],
        case["height"],
        case["num_timesteps"],
        case["seed"],
        case["max_length"] - 1,
        0.0,
        (guidance(case["round1"]), guidance(case["round2"])),
        case["recipe"]["system_prompt"],
    )
    result = run_trajectory(engine, p, keep_tensors=True)
    for k in (1, 2):
        r = result.rounds[k - 1]
        assert r.token_ids == ids(G[f"traj.round{k}.think_ids"])[1:]
        assert torch.equal(result.tensors[f"round{k}.init_noise"], G[f"traj.round{k}.init_noise"])
        assert rel(result.tensors[f"round{k}.final_latent"], G[f"traj.round{k}.final_latent"]) < 0.05
        diff = np.abs(r.image.astype(int) - G[f"traj.round{k}.image_u8"].numpy().astype(int))
        assert diff.max() <= 8 and diff.mean() <= 1.5
    assert [r.kind for r in result.rounds] == ["draft", "final"]


def test_uint8_conversion_truncates(G) -> None:
    assert np.array_equal(to_uint8(G["traj.round1.image"]), G["traj.round1.image_u8"].numpy())
