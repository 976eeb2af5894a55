"""Invariants of the edit recipes (IRG edit above all: no official numbers exist for it) and of understanding:
which branch sees what, the seed contract, prefix sharing, determinism, events, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irg_core.engine import Branches, Engine
from irg_core.loader import load_model
from irg_core.params import EDIT_ROUND, LATER_ROUND, GenerationParams, ParamError, UnderstandingParams
from irg_core.recipes import image_block_tokens, input_eps_seed, run_understanding
from irg_core.trajectory import default_system_prompt, initial_noise, run_trajectory


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=32)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """32 x 20 -> an 816 x 512 edit (1632 latent tokens)."""
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (20, 32, 3), dtype=np.uint8))


def edit(**kw) -> GenerationParams:
    base = dict(prompt="Make the sky orange.", mode="irg", rounds=2, steps=3, seed=11, max_think_tokens=4, edit=True)
    return GenerationParams(**{**base, **kw})


class Spy:
    """Records the branches of every image round and the eps seed of every VAE prefill, then runs them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.branches: list[Branches] = []
        self.eps: list[int] = []
        self.noise: list[torch.Tensor] = []
        import irg_core.programs as programs

        draw, vae = programs.denoise_program, Engine.vae_rows_stages

        def denoise_program(eng, branches, width, height, steps, guidance, noise, *a, **k):
            self.branches.append(branches)
            self.noise.append(noise.clone())
            return draw(eng, branches, width, height, steps, guidance, noise, *a, **k)

        def vae_rows_stages(eng, im, eps_seed):
            self.eps.append(eps_seed)
            return vae(eng, im, eps_seed)

        monkeypatch.setattr(programs, "denoise_program", denoise_program)
        monkeypatch.setattr(Engine, "vae_rows_stages", vae_rows_stages)


@pytest.fixture(scope="module")
def irg_run(engine: Engine, image: Image.Image):
    """One IRG edit (sampled thoughts), with its branches, eps seeds and events recorded."""
    events: list = []
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        result = run_trajectory(
            engine, edit(temperature=0.8), on_event=events.append, keep_tensors=True, images=[image]
        )
        copied = engine.pool.copied_tokens
    return result, spy, events, copied


def test_irg_edit_contexts_seeds_and_sharing(engine: Engine, irg_run) -> None:
    result, spy, events, copied = irg_run
    p = edit(temperature=0.8)
    tok = engine.tok
    assert (result.params.width, result.params.height) == (816, 512)
    assert [r.kind for r in result.rounds] == ["draft", "final"]
    assert all(r.image.shape == (512, 816, 3) for r in result.rounds)
    assert result.params.guidance == (EDIT_ROUND, LATER_ROUND)

    s = len(tok.frame(default_system_prompt("irg")))
    x = image_block_tokens(engine, 816, 512)  # input and draft blocks have the same size
    i = len(tok.frame(p.prompt))
    t1, t2 = (len(tok.frame(r.text)) for r in result.rounds)
    r1, r2 = spy.branches
    # round 1 as the official think edit: cond [S X I T1], without text [S X], without image [S I]
    assert (r1.cond.length, r1.cond.rope) == (s + x + i + t1, s + 2 + i + t1)
    assert (r1.no_text.length, r1.no_text.rope) == (s + x, s + 2)
    assert (r1.no_img.length, r1.no_img.rope) == (s + i, s + i)
    # round 2: cond [S X I T1 D1 T2], without text = cond minus T2, without image [S I T1 T2] (texts only)
    assert (r2.cond.length, r2.cond.rope) == (s + x + i + t1 + x + t2, s + 2 + i + t1 + 2 + t2)
    assert (r2.no_text.length, r2.no_text.rope) == (r2.cond.length - t2, r2.cond.rope - t2)
    assert (r2.no_img.length, r2.no_img.rope) == (s + i + t1 + t2, s + i + t1 + t2)

    # prefix sharing: the input image's KV is the same pages in every branch that sees it
    shared = (s + x) // engine.page_size
    for ctx in (r1.cond, r2.cond, r2.no_text):
        assert ctx.pages[:shared] == r1.no_text.pages[:shared]
    assert r2.cond.pages[: len(r2.no_text.pages) - 1] == r2.no_text.pages[:-1]
    assert copied <= 8 * engine.page_size  # only partial tail pages are ever copied

    # seeds: noise k from seed + k - 1, input eps from seed + 3R, draft eps from seed + R + k - 1
    assert spy.eps == [p.seed + 6, p.seed + 2]
    assert spy.eps[0] == input_eps_seed(result.params)
    for k in (1, 2):
        assert torch.equal(spy.noise[k - 1], initial_noise(p.seed + k - 1, 1632, 64))
        assert torch.equal(result.tensors[f"round{k}.init_noise"], spy.noise[k - 1])

    kinds = [e.type for e in events if not e.type.endswith(".delta") and e.type != "image.progress"]
    assert kinds == ["thinking.done", "image.done", "reflection.done", "image.done"]
    assert [e.data["kind"] for e in events if e.type == "image.done"] == ["draft", "final"]


def test_irg_edit_is_deterministic(engine: Engine, image: Image.Image, irg_run) -> None:
    again = run_trajectory(engine, edit(temperature=0.8), images=[image])
    for ra, rb in zip(irg_run[0].rounds, again.rounds, strict=True):
        assert ra.token_ids == rb.token_ids
        assert np.array_equal(ra.image, rb.image)


@pytest.mark.parametrize("mode", ["think"])  # direct: tests/core/test_golden_modes.py and the CLI golden check
def test_single_round_edits_use_the_official_branches(
    engine: Engine, image: Image.Image, mode: str, monkeypatch
) -> None:
    spy = Spy(monkeypatch)
    p = edit(mode=mode, rounds=1)
    result = run_trajectory(engine, p, images=[image])
    assert spy.eps == [p.seed + 1]
    s = len(engine.tok.frame(default_system_prompt(mode))) if mode == "think" else 0
    x, i = image_block_tokens(engine, 816, 512), len(engine.tok.frame(p.prompt))
    t = len(engine.tok.frame(result.rounds[0].text)) if mode == "think" else 0
    (b,) = spy.branches
    assert (b.cond.length, b.cond.rope) == (s + x + i + t, s + 2 + i + t)
    assert (b.no_text.length, b.no_text.rope) == (s + x, s + 2)
    assert (b.no_img.length, b.no_img.rope) == (s + i, s + i)
    assert [r.kind for r in result.rounds] == ["final"]


def test_edit_needs_exactly_one_image(engine: Engine, image: Image.Image) -> None:
    with pytest.raises(ParamError, match="image"):
        run_trajectory(engine, edit(), images=[])
    with pytest.raises(ParamError, match="image"):
        run_trajectory(engine, edit(), images=[image, image])
    with pytest.raises(ParamError, match="image"):
        run_trajectory(engine, edit(edit=False), images=[image])


def test_understanding_sees_every_image_in_order(engine: Engine, image: Image.Image) -> None:
    other = Image.fromarray(255 - np.asarray(image))
    p = UnderstandingParams("What changed?", max_tokens=3)
    ab = run_understanding(engine, p, [image, other], keep_logits=True)
    ba = run_understanding(engine, p, [other, image], keep_logits=True)
    vit = image_block_tokens(engine, 816, 512, vae=False)
    assert ab.context_length == 2 * vit + len(engine.tok.frame(p.question))
    assert ab.context_rope == 2 + len(engine.tok.frame(p.question))
    assert float((ab.logits0 - ba.logits0).abs().max()) > 1e-3  # order matters
    again = run_understanding(engine, p, [image, other], keep_logits=True)
    assert again.token_ids == ab.token_ids and torch.equal(again.logits0, ab.logits0)
    with pytest.raises(ParamError, match="images"):
        run_understanding(engine, p, [])
    with pytest.raises(ParamError, match="question"):
        run_understanding(engine, UnderstandingParams(" "), [image])
