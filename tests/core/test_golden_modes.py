"""The official numbers of shared/golden/tiny_bagel_modes (edit, edit + think, understanding), stage by stage.

Tolerances are the golden README's: output size, kv lengths and rope positions exact; the input's VAE latent
~1e-6 and ViT features ~1e-3; first-step branch velocities a few %; final latents <= 5 % relative; images
<= 8 levels max and <= 1.5 mean; understanding ids identical and logits0 within 2e-2. The edits are
teacher-forced (golden noise, golden thought ids) so each stage is judged on its own.
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
from irg_core.loader import load_model
from irg_core.params import GenerationParams, RoundGuidance, UnderstandingParams
from irg_core.recipes import (
    edit_contexts,
    edit_input,
    edit_size,
    input_eps_seed,
    run_understanding,
    understanding_context,
    vlm_think_system_prompt,
)
from irg_core.trajectory import default_system_prompt, initial_noise
from irg_core.transforms import VIT_TRANSFORM

MODES = "tiny_bagel_modes"


@pytest.fixture(scope="module")
def gdir(golden_dir: Path) -> Path:
    return golden_dir.parent / MODES


@pytest.fixture(scope="module")
def G(gdir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(gdir / "golden.safetensors"))


@pytest.fixture(scope="module")
def gj(gdir: Path) -> dict:
    return json.loads((gdir / "golden.json").read_text())


@pytest.fixture(scope="module")
def case(gdir: Path) -> dict:
    return json.loads((gdir / "case.json").read_text())


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=64)


@pytest.fixture(scope="module")
def image(gdir: Path) -> Image.Image:
    return Image.open(gdir / "input.png").convert("RGB")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.double()
    return float((a - b).norm() / b.norm())


def ids(t: torch.Tensor) -> list[int]:
    return [int(i) for i in t]


def test_system_prompts_are_the_official_ones(gj: dict) -> None:
    assert vlm_think_system_prompt() == gj["vlm_think_system_prompt"]
    assert default_system_prompt("think") == gj["gen_think_system_prompt"]


def test_edit_size_and_resizes(image: Image.Image, gdir: Path, G) -> None:
    assert np.array_equal(np.asarray(image), G["edit_input.image_u8"].numpy())
    assert edit_size(*image.size) == (848, 512)
    resized = edit_input(image)
    assert np.array_equal(np.asarray(resized), np.asarray(Image.open(gdir / "input_vae.png").convert("RGB")))
    assert np.array_equal(
        np.asarray(VIT_TRANSFORM.resize(resized)), np.asarray(Image.open(gdir / "input_vit.png").convert("RGB"))
    )
    # the long-side clamp comes last: a very elongated input ends with a short side under 512 (README)
    assert edit_size(100, 40) == (1024, 416)
    with pytest.raises(ValueError, match="RGB"):
        edit_input(image.convert("RGBA"))


def test_input_blocks(engine: Engine, image: Image.Image, G, case) -> None:
    resized = edit_input(image)
    eps_seed = input_eps_seed(GenerationParams("x", "direct", seed=case["seed"], edit=True))
    assert eps_seed == case["seed"] + 1
    g = torch.Generator("cpu").manual_seed(eps_seed)
    assert torch.equal(torch.randn((1, 16, 64, 106), generator=g), G["edit_input.vae_eps"])
    rows, latent = engine.vae_rows(resized, eps_seed)
    assert rel(latent, G["edit_input.vae_latent"]) < 1e-5
    assert rel(rows, G["edit_input.vae_llm_features"]) < 1e-5
    assert rel(engine.vit_rows(resized), G["edit_input.vit_llm_features"]) < 1e-3


def _edit_round(engine: Engine, mode: str, image: Image.Image, G, gj, case) -> None:
    think = mode == "edit_think"
    tok = engine.tok
    system_ids = tok.frame(default_system_prompt("think")) if think else []
    instruction_ids = tok.frame(case["edit"]["instruction"])
    engine.reset_pool(12000, 24)
    with_image, main, texts = edit_contexts(engine, system_ids, instruction_ids, edit_input(image), case["seed"] + 1)
    if think:
        thought = engine.decode(main, case["max_think_token_n"] - 1)
        assert thought == ids(G["edit_think.think_ids"])[1:]
        fed = tok.frame(tok.thought(thought))
        assert fed == ids(G["edit_think.think_fed_ids"])
        main = engine.prefill_text(main, fed)
    want = gj["modes"][mode]["contexts_at_gen_image"]
    for name, ctx in (("cond", main), ("cfg_text", with_image), ("cfg_img", texts)):
        assert (ctx.length, ctx.rope) == (want[name]["kv_len"], want[name]["rope"]), name
    h = case["edit"]["hyper"]
    g = RoundGuidance(
        h["cfg_text_scale"],
        h["cfg_img_scale"],
        tuple(h["cfg_interval"]),
        h["cfg_renorm_type"],
        h["cfg_renorm_min"],
        h["timestep_shift"],
    )
    noise = initial_noise(case["seed"], 1696, 64)
    assert torch.equal(noise, G[f"{mode}.init_noise"])
    seen: dict[tuple[str, int], torch.Tensor] = {}
    latent = engine.generate_image(
        Branches(main, with_image, texts),
        848,
        512,
        case["num_timesteps"],
        g,
        noise,
        observe=lambda name, i, v: seen.__setitem__((name, i), v.clone()),
    )
    for ours, theirs in (("cond", "cond"), ("no_text", "cfg_text"), ("no_img", "cfg_img")):
        assert rel(seen[(ours, 0)], G[f"{mode}.step0_v_{theirs}"]) < 0.03, ours
    for i in range(case["num_timesteps"] - 1):
        assert rel(seen[("v_t", i)], G[f"{mode}.v_t"][i]) < 0.05, f"v_t step {i}"
    assert rel(latent, G[f"{mode}.final_latent"]) < 0.05
    _, pixels = engine.decode_latent(latent, 848, 512)
    diff = np.abs(pixels.astype(int) - G[f"{mode}.image_u8"].numpy().astype(int))
    assert pixels.shape == (512, 848, 3) and diff.max() <= 8 and diff.mean() <= 1.5


def test_edit_teacher_forced(engine: Engine, image: Image.Image, G, gj, case) -> None:
    _edit_round(engine, "edit", image, G, gj, case)


def test_edit_think_teacher_forced(engine: Engine, image: Image.Image, G, gj, case) -> None:
    _edit_round(engine, "edit_think", image, G, gj, case)


@pytest.mark.parametrize("mode", ["understand", "understand_think"])
def test_understanding(engine: Engine, image: Image.Image, mode: str, G, gj, case) -> None:
    u = case["understand"]
    p = UnderstandingParams(u["question"], u["max_think_token_n"] - 1, 0.0, think=mode.endswith("think"))
    want = gj["modes"][mode]["context_at_gen_text"]
    ctx = understanding_context(engine, p, [image])
    assert (ctx.length, ctx.rope) == (want["kv_len"], want["rope"])
    events = []
    result = run_understanding(engine, p, [image], on_event=events.append, keep_logits=True)
    assert result.token_ids == ids(G[f"{mode}.answer_ids"])[1:]
    assert result.logits0.shape == G[f"{mode}.logits0"].shape
    assert float((result.logits0 - G[f"{mode}.logits0"]).abs().max()) <= 2e-2
    assert result.text == gj["modes"][mode]["answer"]["text"]
    assert [e.type for e in events][-1] == "answer.done" and events[-1].data["text"] == result.text
    assert "".join(e.data["text"] for e in events if e.type == "answer.delta") == result.text
