"""The flow sampler and guidance as pure functions."""

from __future__ import annotations

import torch

from irg_core.sampling import cfg_active, cfg_combine, sample_flow, timesteps


def test_timesteps_endpoints_and_shift() -> None:
    ts = timesteps(50, 3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and ts.shape == (50,)
    assert abs(float(ts[1]) - 0.9931) < 1e-4
    assert abs(float(ts[-2]) - 0.0588) < 1e-4  # the last evaluated t (BAGEL_SPEC 6.5)
    assert torch.allclose(timesteps(10, 1.0), torch.linspace(1, 0, 10))


def test_cfg_interval_counts_match_the_spec() -> None:
    assert sum(cfg_active(timesteps(50, 3.0), (0.4, 1.0))) == 41
    assert sum(cfg_active(timesteps(50, 1.0), (0.4, 1.0))) == 30
    assert all(cfg_active(timesteps(50, 3.0), (0.0, 1.0)))


def test_guidance_with_unit_scales_is_the_identity() -> None:
    v, a, b = torch.randn(3, 16, 64).unbind(0)
    for renorm in ("global", "channel", "text_channel"):
        assert torch.equal(cfg_combine(v, a, b, 1.0, 1.0, renorm, 0.0), v)
        # image guidance alone does nothing (official quirk)
        assert torch.equal(cfg_combine(v, a, b, 1.0, 3.0, renorm, 0.0), v)


def test_text_guidance_without_renorm_effect() -> None:
    v, a = torch.randn(2, 16, 64).unbind(0)
    out = cfg_combine(v, a, None, 4.0, 1.0, "global", 1.0)  # renorm_min 1 keeps the scale at 1
    assert torch.allclose(out, a + 4.0 * (v - a))


def test_renorms_bound_the_norm_by_the_conditional_one() -> None:
    v, a, b = torch.randn(3, 16, 64).unbind(0)
    g = cfg_combine(v, a, b, 4.0, 2.0, "global", 0.0)
    assert g.norm() <= v.norm() * (1 + 1e-5)
    c = cfg_combine(v, a, b, 4.0, 2.0, "channel", 0.0)
    assert (c.norm(dim=-1) <= v.norm(dim=-1) * (1 + 1e-5)).all()
    t = cfg_combine(v, a, None, 4.0, 1.0, "text_channel", 0.0)
    assert (t.norm(dim=-1) <= v.norm(dim=-1) * (1 + 1e-5)).all()


def test_sample_flow_with_constant_velocity_is_exact() -> None:
    ts = timesteps(7, 3.0)
    x0 = torch.randn(8, 64)
    v = torch.randn(8, 64)
    out = sample_flow(lambda i, x: v, x0, ts)
    assert torch.allclose(out, x0 - v * (ts[0] - ts[-1]), atol=1e-6)


def test_sampled_tokens_are_the_gumbel_max_over_the_whole_vocabulary() -> None:
    """Rows with a peaked distribution (decided among the top candidates), flat rows (the whole vocabulary
    competes) and greedy rows in one batch: each is argmax(logits / T + its own noise), and the same alone."""
    from irg_core.sampling import gumbel_noise, sample_tokens

    g = torch.Generator().manual_seed(0)
    vocab = 5000
    peaked = torch.randn(vocab, generator=g)
    peaked[17] += 40.0
    flat = torch.randn(vocab, generator=g)
    logits = torch.stack([peaked, flat, flat, peaked])
    temps, seeds, steps = [0.3, 0.3, 1.0, 0.0], [5, 6, 7, 8], [0, 3, 9, 1]
    got = sample_tokens(logits, temps, seeds, steps).tolist()
    for i, t in enumerate(temps):
        want = (
            int((logits[i] / t + gumbel_noise([seeds[i]], [steps[i]], vocab, logits.device)[0]).argmax())
            if t > 0
            else int(logits[i].argmax())
        )
        assert got[i] == want
        assert sample_tokens(logits[i : i + 1], [t], [seeds[i]], [steps[i]]).tolist() == [want]
    assert got[0] == got[3] == 17
    tokens = {sample_tokens(flat[None], [1.0], [s], [0]).item() for s in range(20)}
    assert len(tokens) > 10  # flat rows really are sampled
