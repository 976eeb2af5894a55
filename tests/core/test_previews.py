"""Preview pieces: which steps, the x0 estimate, the fitted fast decoder against the golden checkpoint's VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from irg_core.engine import Engine
from irg_core.loader import load_model
from irg_core.params import GenerationParams, ParamError
from irg_core.previews import preview_size, preview_steps, x0_estimate
from irg_core.sampling import timesteps
from irg_core.transforms import patchify


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=16)


def test_preview_steps_are_spread_and_skip_the_last() -> None:
    assert preview_steps(49, 4) == [9, 19, 29, 39]
    assert preview_steps(3, 4) == [0, 1]  # at most one per step, never the last
    assert preview_steps(11, 3) == [2, 5, 8]
    assert preview_steps(10, 0) == [] and preview_steps(0, 3) == []
    for n in range(1, 12):
        got = preview_steps(10, n)
        assert len(got) == min(n, 9) and len(set(got)) == len(got) and max(got) < 9, (n, got)


def test_preview_size() -> None:
    assert preview_size(256, 256) == (256, 256)
    assert preview_size(1024, 512) == (256, 128)
    assert preview_size(64, 48) == (64, 48)


def test_x0_of_the_last_step_is_the_final_latent(golden_dir: Path) -> None:
    """With t_{n-1} = 0 the last Euler step is exactly x0 = x_t - t v_t: the golden final latent."""
    G = load_file(str(golden_dir.parent / "tiny_bagel_modes" / "golden.safetensors"))
    x, v = G["direct.x_t"], G["direct.v_t"]
    ts = timesteps(7, 3.0)
    x0 = x0_estimate(x[-2], v[-1], ts[-2])
    assert torch.allclose(x0, G["direct.final_latent"], atol=1e-5)


def test_fast_decoder_follows_the_vae(engine: Engine) -> None:
    """On an image it was not fitted on (encoded by the same VAE), the least-squares map's colours per latent
    pixel go with the full decode's (the random-weight test VAE is far from linear: a loose bound)."""
    import torch.nn.functional as F

    rgb = engine.latent_rgb()
    assert rgb.weight.shape == (16, 3) and 0.0 < rgb.r2 <= 1.0
    g = torch.Generator().manual_seed(99)  # not the fit's seed
    x = F.interpolate(torch.rand((1, 3, 3, 3), generator=g) * 2 - 1, size=(128, 128), mode="bicubic").clamp(-1, 1)
    with torch.inference_mode():
        z = engine.vae.encode(x, torch.zeros(()))  # [1, 16, 16, 16]
    latent = patchify(z[0], engine.cfg.latent_patch_size)  # packed [64, 64]
    fast = engine.preview(latent, 128, 128, "fast").astype(float)
    full = engine.preview(latent, 128, 128, "vae").astype(float)
    assert fast.shape == full.shape == (128, 128, 3)

    def blocks(a):
        return a.reshape(16, 8, 16, 8, 3).mean(axis=(1, 3))

    corr = np.corrcoef(blocks(fast).ravel(), blocks(full).ravel())[0, 1]
    print(f"fit r2 {rgb.r2:.3f}, held-out block correlation {corr:.3f}")
    assert corr > 0.3, corr  # measured 0.45 (fit R2 0.20)


def test_preview_params_are_validated() -> None:
    with pytest.raises(ParamError, match="previews"):
        GenerationParams("x", previews=-1).resolved()
    with pytest.raises(ParamError, match="preview_decoder"):
        GenerationParams("x", preview_decoder="png").resolved()
