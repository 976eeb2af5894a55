"""The bf16 (GPU) path rounds where the official code rounds, per mode (irg_core.numerics). These run the bf16
path on the CPU with bfloat16 weights and pin the dtype flow; the float32 path is the goldens' (unchanged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from irg_core.engine import Branches, Engine
from irg_core.kv_cache import EMPTY
from irg_core.loader import load_model
from irg_core.model.embed import TimestepEmbedder, timestep_freqs
from irg_core.numerics import precision
from irg_core.params import RoundGuidance
from irg_core.transforms import to_uint8

BF16, F32 = torch.bfloat16, torch.float32


@pytest.fixture(scope="module")
def bf16(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu", dtype=BF16), page_size=16)


@pytest.fixture
def norms(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """(input dtype, output dtype) of every group_norm call."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real = F.group_norm

    def spy(x, *args, **kw):
        out = real(x, *args, **kw)
        seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(F, "group_norm", spy)
    return seen


def conv_inputs(module: torch.nn.Module) -> tuple[list[torch.dtype], list]:
    seen: list[torch.dtype] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
        for m in module.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    return seen, hooks


def test_the_rule_per_mode() -> None:
    assert precision("irg", BF16).state_dtype == BF16 and not precision("irg", BF16).decode_mixed
    for mode in ("think", "direct"):
        assert precision(mode, BF16).state_dtype == F32 and precision(mode, BF16).decode_mixed
    for mode in ("irg", "think", "direct"):  # float32 weights: the float32 path, whatever the mode
        assert precision(mode, F32) == precision("irg", F32) and precision(mode, F32).state_dtype == F32
        assert precision(mode, BF16).encode_mixed


def test_to_uint8_computes_in_the_decoder_outputs_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    image = (torch.rand((1, 3, 64, 64), generator=g) * 2.4 - 1.2).to(BF16)
    half = image * 0.5  # the official expression, one bf16 rounding per op
    expected = ((half + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    got = to_uint8(image)
    assert np.array_equal(got, expected)
    in_float32 = to_uint8(image.float())  # what converting in float32 would give: not the same pixels
    assert (got != in_float32).mean() > 0.01


def test_encoder_runs_as_under_autocast(bf16: Engine, norms: list) -> None:
    vae = bf16.vae
    x = (torch.rand((1, 3, 64, 48), generator=torch.Generator().manual_seed(1)) * 2 - 1).to(BF16)
    eps = torch.randn((1, 16, 8, 6), generator=torch.Generator().manual_seed(2))
    convs, hooks = conv_inputs(vae.encoder)
    try:
        z = vae.encode(x, eps)  # the engine's default: mixed, as every official path encodes under autocast
    finally:
        for h in hooks:
            h.remove()
    assert norms and all(pair == (F32, F32) for pair in norms)  # GroupNorm in float32
    assert convs and set(convs) == {BF16}  # convolutions in bf16
    mean, logvar = vae.moments(x, mixed=True).chunk(2, dim=1)
    assert mean.dtype == BF16
    # exp in float32 on the bf16 `0.5 * logvar`; eps rounded to bf16 as randn_like(mean) draws it
    sample = mean + (0.5 * logvar).float().exp() * eps.to(BF16)
    assert z.dtype == F32 and torch.equal(z, vae.cfg.scale_factor * (sample - vae.cfg.shift_factor))
    norms.clear()
    vae.moments(x, mixed=False)
    assert norms and all(pair == (BF16, BF16) for pair in norms)  # the all-bf16 path, for contrast
    # float32 norms bring the encoder closer to float32 arithmetic on the same (bf16-rounded) weights
    import copy

    ref = copy.deepcopy(vae).float().moments(x.float())
    err = {m: float((vae.moments(x, mixed=m).float() - ref).norm() / ref.norm()) for m in (True, False)}
    assert err[True] < err[False], err


def test_decoder_per_mode(bf16: Engine, norms: list) -> None:
    latent = torch.randn((4 * 3, 64), generator=torch.Generator().manual_seed(3))  # a 64x48 image
    image, _ = bf16.decode_latent(latent, 48, 64, mode="think")
    assert image.dtype == BF16 and norms and all(pair == (F32, F32) for pair in norms)
    vae, cfg = bf16.vae, bf16.vae.cfg
    from irg_core.transforms import unpatchify

    z = unpatchify(latent, 4, 3, 2, 16)
    assert torch.equal(image, vae.decoder(z / cfg.scale_factor + cfg.shift_factor, True))  # scale/shift in float32
    norms.clear()
    image, _ = bf16.decode_latent(latent, 48, 64, mode="irg")  # the IRG script decodes outside autocast
    assert image.dtype == BF16 and norms and all(pair == (BF16, BF16) for pair in norms)
    assert torch.equal(image, vae.decoder(z.to(BF16) / cfg.scale_factor + cfg.shift_factor))


@pytest.mark.parametrize(("mode", "state"), [("think", F32), ("direct", F32), ("irg", BF16)])
def test_denoising_state_dtype_per_mode(bf16: Engine, mode: str, state: torch.dtype) -> None:
    bf16.reset_pool(3000, 16)
    s = bf16.prefill_text(EMPTY, bf16.tok.frame("system"))
    c = bf16.prefill_text(s, bf16.tok.frame("prompt"))
    seen: list[torch.dtype] = []

    def observe(name: str, i: int, value: torch.Tensor) -> None:
        if name == "x_t":
            seen.append(value.dtype)

    g = RoundGuidance(4.0, 1.0, (0.0, 1.0), "global", 0.0, 3.0)  # round 1's kind: a global renorm keeps bf16
    noise = torch.randn((16, 64), generator=torch.Generator().manual_seed(4))
    out = bf16.generate_image(Branches(c, s), 64, 64, 4, g, noise, observe=observe, mode=mode)
    assert seen == [state] * 3 and out.dtype == state


def test_timestep_frequencies_come_from_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import math

    half = 128
    official = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    assert torch.equal(timestep_freqs(256), official) and timestep_freqs(256).device.type == "cpu"
    devices: list[str] = []
    real = torch.exp

    def spy(x, *a, **kw):
        devices.append(x.device.type)
        return real(x, *a, **kw)

    monkeypatch.setattr(torch, "exp", spy)
    emb = TimestepEmbedder(32).to("meta")
    out = emb.features(torch.tensor([0.5], device="meta"))  # a device that computes nothing
    assert out.device.type == "meta" and devices == ["cpu"]


def test_cpu_bf16_convolution_is_the_gpu_kernels_result() -> None:
    """The VAE's bf16 convolution on the CPU (float32 sums of the bf16 values, one rounding) agrees with
    PyTorch's own bf16 kernel to one bf16 rounding step, and keeps the bf16 dtype."""
    from irg_core.model.vae import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(8, 16, 3, padding=1).to(BF16)
    x = torch.randn(1, 8, 12, 12).to(BF16)
    ours = conv(x)
    native = torch.nn.Conv2d.forward(conv, x)
    assert ours.dtype == BF16
    assert torch.equal(ours, F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1).to(BF16))
    ulp = native.float().abs().clamp(min=1e-3) * 2.0**-7
    assert bool(((ours.float() - native.float()).abs() <= ulp).all())


def test_bf16_rms_norm_normalises_in_float32_then_rounds() -> None:
    """Qwen2's RMSNorm on bf16 activations: float32 normalisation, one rounding to bf16, then the bf16 weight."""
    from irg_core.model.qwen2_mot import rms_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 512, generator=g) * 3).to(BF16)
    w = (1 + 0.1 * torch.randn(512, generator=g)).to(BF16)
    ref = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(BF16)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == BF16
    assert float((out.float() - ref.float()).abs().max()) <= float(ref.float().abs().max()) * 2.0**-7
