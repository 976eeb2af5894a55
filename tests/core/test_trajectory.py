"""Behaviour of the engine and the trajectories beyond the golden numbers: batching, prefix sharing,
events, seeds, cancellation, modes and shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from irg_core.engine import Branches, Engine
from irg_core.errors import Cancelled
from irg_core.kv_cache import EMPTY
from irg_core.loader import load_model
from irg_core.params import GenerationParams, ParamError, RoundGuidance
from irg_core.trajectory import run_trajectory


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=16)


def small(**kw) -> GenerationParams:
    base = dict(prompt="A red apple on a wooden table.", width=64, height=48, steps=4, seed=7, max_think_tokens=6)
    return GenerationParams(**{**base, **kw})


def test_all_guidance_branches_run_as_one_forward(engine: Engine, monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    lm = engine.model.language_model
    original = type(lm).forward

    def spy(self, x, rope, rows, gen_mode, *args, **kw):
        calls.append((x.shape[0], sum(b - a for a, b, gen in rows.groups if gen)))
        return original(self, x, rope, rows, gen_mode, *args, **kw)

    engine.reset_pool(3000, 16)
    s = engine.prefill_text(EMPTY, engine.tok.frame("system"))
    p = engine.prefill_text(s, engine.tok.frame("prompt"))
    c = engine.prefill_text(p, engine.tok.frame("thought"))
    monkeypatch.setattr(type(lm), "forward", spy)
    g = RoundGuidance(4.0, 2.0, (0.0, 1.0), "text_channel", 0.0, 3.0)
    engine.generate_image(Branches(c, s, p), 64, 64, 5, g, torch.randn(16, 64))
    n = 16
    assert calls == [(3 * (n + 2), 3 * n)] * 4  # one forward per step, three branches packed


def test_packed_branches_equal_branches_run_alone(engine: Engine) -> None:
    engine.reset_pool(3000, 16)
    s = engine.prefill_text(EMPTY, engine.tok.frame("system"))
    p = engine.prefill_text(s, engine.tok.frame("prompt"))
    c = engine.prefill_text(p, engine.tok.frame("thought"))
    noise = torch.randn(16, 64)
    seen: dict[str, torch.Tensor] = {}

    def keep(prefix: str):
        return lambda name, i, v: seen.setdefault(f"{prefix}{name}{i}", v.clone())

    both = RoundGuidance(4.0, 2.0, (0.0, 1.0), "global", 0.0, 3.0)
    engine.generate_image(Branches(c, s, p), 64, 64, 3, both, noise, observe=keep("packed."))
    alone = RoundGuidance(1.0, 1.0, (0.0, 1.0), "global", 0.0, 3.0)
    for name, ctx in (("cond", c), ("no_text", s), ("no_img", p)):
        engine.generate_image(Branches(ctx), 64, 64, 3, alone, noise, observe=keep(f"{name}."))
        packed, lone = seen[f"packed.{name}0"], seen[f"{name}.cond0"]
        # equal up to bf16 rounding flips (the GEMMs of a bigger batch sum in another order); a packing
        # mistake would be off by the size of the velocity itself
        assert float((packed - lone).norm() / lone.norm()) < 5e-3, name


def test_guidance_contexts_share_the_prefix_kv(engine: Engine, monkeypatch) -> None:
    seen: list[Branches] = []
    original = Engine.prepare_loop

    def spy(self, loop):
        if loop.state is None:  # once per image round: cond, no_text, no_img (when guided), in that order
            seen.append(Branches(*loop.contexts))
        return original(self, loop)

    monkeypatch.setattr(Engine, "prepare_loop", spy)
    run_trajectory(engine, small(rounds=3))
    page = engine.page_size
    pool = engine.pool
    assert pool is not None
    for k, b in enumerate(seen[1:], start=2):
        # without text = cond minus its last thought: every full page of it is one of cond's pages
        full = b.no_text.length // page
        assert b.no_text.pages[:full] == b.cond.pages[:full], f"round {k}"
        # without image = [S, P, T1, ...]: shares the pages of [S, P, T1] with cond
        first_thought_end = seen[0].cond.length // page
        assert b.no_img.pages[:first_thought_end] == b.cond.pages[:first_thought_end], f"round {k}"
    # the only copies were partial tail pages, never a prefix
    assert pool.copied_tokens < page * 4 * 3


def test_events_arrive_in_trajectory_order(engine: Engine) -> None:
    events = []
    result = run_trajectory(engine, small(), on_event=events.append)
    kinds = [e.type for e in events]
    compact = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert compact == [
        "thinking.delta",
        "thinking.done",
        "image.progress",
        "image.done",
        "reflection.delta",
        "reflection.done",
        "image.progress",
        "image.done",
    ]
    done = [e for e in events if e.type == "image.done"]
    assert [e.data["kind"] for e in done] == ["draft", "final"]
    assert done[0].image.shape == (48, 64, 3) and done[0].image.dtype == np.uint8
    steps = [e.data["step"] for e in events if e.type == "image.progress" and e.data["round"] == 1]
    assert steps == [1, 2, 3]
    for kind, k in (("thinking", 1), ("reflection", 2)):
        pieces = "".join(e.data["text"] for e in events if e.type == f"{kind}.delta")
        final = next(e.data["text"] for e in events if e.type == f"{kind}.done")
        assert pieces == final == result.rounds[k - 1].text


def test_same_seed_same_images_other_seed_other_images(engine: Engine) -> None:
    a = run_trajectory(engine, small(seed=11))
    b = run_trajectory(engine, small(seed=11))
    c = run_trajectory(engine, small(seed=12))
    for ra, rb in zip(a.rounds, b.rounds):
        assert np.array_equal(ra.image, rb.image) and ra.token_ids == rb.token_ids
    assert not np.array_equal(a.rounds[0].image, c.rounds[0].image)


def test_sampled_thoughts_depend_on_the_seed(engine: Engine) -> None:
    a = run_trajectory(engine, small(seed=3, temperature=1.0, max_think_tokens=12))
    b = run_trajectory(engine, small(seed=3, temperature=1.0, max_think_tokens=12))
    c = run_trajectory(engine, small(seed=4, temperature=1.0, max_think_tokens=12))
    assert a.rounds[0].token_ids == b.rounds[0].token_ids != c.rounds[0].token_ids


@pytest.mark.parametrize("stage", ["thinking.delta", "image.progress", "reflection.delta"])
def test_cancel_stops_at_the_next_step(engine: Engine, stage: str) -> None:
    flag = {"stop": False}
    events = []

    def on_event(e):
        events.append(e.type)
        if e.type == stage:
            flag["stop"] = True

    with pytest.raises(Cancelled):
        run_trajectory(engine, small(), on_event=on_event, should_cancel=lambda: flag["stop"])
    assert events.count(stage) == 1  # nothing ran after the flag was seen
    # the engine is still usable
    assert len(run_trajectory(engine, small()).rounds) == 2


def test_modes_and_shapes(engine: Engine) -> None:
    think = run_trajectory(engine, small(mode="think", width=80, height=32, prompt="Ein Apfel 🍎 auf dem Tisch, 苹果"))
    assert [r.kind for r in think.rounds] == ["final"] and think.rounds[0].image.shape == (32, 80, 3)
    assert think.rounds[0].text is not None
    direct = run_trajectory(engine, small(mode="direct"))
    assert [r.kind for r in direct.rounds] == ["final"] and direct.rounds[0].text is None
    three = run_trajectory(engine, small(rounds=3))
    assert [r.kind for r in three.rounds] == ["draft", "draft", "final"]
    assert [s.stage for s in three.stages].count("reencode") == 2


def test_bad_parameters_are_named(engine: Engine) -> None:
    with pytest.raises(ParamError, match="width"):
        run_trajectory(engine, small(width=50))
    with pytest.raises(ParamError, match="height.*at most 1024"):
        run_trajectory(engine, small(height=2048))
    with pytest.raises(ParamError, match="rounds"):
        run_trajectory(engine, small(rounds=1))
    with pytest.raises(ParamError, match=r"guidance\[1\].renorm"):
        run_trajectory(engine, small(guidance=(RoundGuidance(), RoundGuidance(renorm="local"))))
    with pytest.raises(ParamError, match="text_scale"):
        run_trajectory(engine, small(guidance=(RoundGuidance(text_scale=float("nan")),)))


def test_bfloat16_weights_run_the_gpu_precision_path(golden_dir: Path, engine: Engine) -> None:
    """bfloat16 weights (what a GPU runs) on the CPU: same code path, bf16 KV pool, close to float32."""
    bf16 = Engine(load_model(golden_dir / "model", device="cpu", dtype=torch.bfloat16), page_size=16)
    p = small(max_think_tokens=4)
    low = run_trajectory(bf16, p, keep_tensors=True)
    assert bf16.pool is not None and bf16.pool.data.dtype == torch.bfloat16
    full = run_trajectory(engine, p, keep_tensors=True)
    a, b = low.tensors["round1.final_latent"], full.tensors["round1.final_latent"]
    assert torch.isfinite(a).all() and float((a - b).norm() / b.norm()) < 0.1
    assert low.rounds[1].image.shape == (48, 64, 3)


def test_other_model_sizes_and_a_non_square_image(golden_dir: Path) -> None:
    """Nothing assumes the golden's sizes: another head layout, a 4-level VAE, a tall image, three rounds."""
    from irg_core.config import BagelConfig
    from irg_core.loader import build_dummy
    from irg_core.tokenizer import Tokenizer

    cfg = BagelConfig.from_dict(
        {
            "llm": {
                "hidden_size": 96,
                "num_hidden_layers": 3,
                "num_attention_heads": 6,
                "num_key_value_heads": 3,
                "intermediate_size": 160,
                "vocab_size": 151700,
                "rope_theta": 10000.0,
            },
            "vit": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3, "num_hidden_layers": 3},
            "vae": {"ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1},
        }
    )
    tok = Tokenizer.from_dir(golden_dir / "model")
    e = Engine(build_dummy(cfg, "cpu", torch.float32, seed=3, tokenizer=tok), page_size=8)
    p = small(width=48, height=112, rounds=3, prompt="Ein Leuchtturm in der Dämmerung, 灯塔 🌅")
    r = run_trajectory(e, p, keep_tensors=True)
    assert [x.image.shape for x in r.rounds] == [(112, 48, 3)] * 3
    assert r.tensors["round3.final_latent"].shape == (3 * 7, 64)
    with pytest.raises(ParamError, match="at most 1024"):
        run_trajectory(e, small(width=1040))


def test_a_draft_that_cannot_be_re_encoded_is_refused_up_front(golden_dir: Path, tmp_path: Path) -> None:
    """With a 32x32 latent grid, a tall draft re-encoded with its long side at 1024 would not fit: a named error."""
    import shutil

    from safetensors.torch import load_file, save_file

    from irg_core.model.embed import sincos_table

    model = Path(shutil.copytree(golden_dir / "model", tmp_path / "model", copy_function=shutil.copyfile))
    tensors = load_file(str(model / "ema.safetensors"))
    tensors["latent_pos_embed.pos_embed"] = sincos_table(64, 32).bfloat16()
    save_file(tensors, str(model / "ema.safetensors"))
    e = Engine(load_model(model, device="cpu"), page_size=16)
    with pytest.raises(ParamError, match="height: a 48x112 draft is re-encoded at 432x1024"):
        run_trajectory(e, small(width=48, height=112))
    assert len(run_trajectory(e, small(width=48, height=112, mode="think")).rounds) == 1
