"""Live previews of an image while it is denoised: the clean-image estimate x0 of a step, drawn cheaply.

BAGEL's flow (rectified flow, t from 1 = noise to 0 = data) predicts v ~ noise - data and steps
x <- x - v * (t_i - t_{i+1}). Since x_t = t * noise + (1 - t) * data, the estimate of the data after the step
at t is x0 = x_t - t * v_t (the Euler step straight to t = 0). See docs/engine.md.

Two decoders:
- `fast`: a fixed linear map from the 16 latent channels to RGB at latent resolution (H/8 x W/8), upscaled.
  The map is fitted once per model by least squares against the checkpoint's own VAE decoder
  (`fit_latent_rgb`), so it needs no constants from elsewhere and follows whatever VAE is loaded.
- `vae`: the full VAE decode of x0, downscaled to the preview size.

Previews are at most `PREVIEW_MAX_SIDE` pixels on the long side (the image's size when it is smaller).
Pure tensor code, no I/O; the caller encodes and sends them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from irg_core.transforms import unpatchify

PREVIEW_MAX_SIDE = 256
FIT_SIZE = 64  # side of the synthetic images the fast map is fitted on
FIT_IMAGES = 4


def preview_steps(evaluations: int, count: int) -> list[int]:
    """The 0-based step indices (of `evaluations` denoising steps) after which a preview is drawn: `count`
    evenly spaced ones, never the last step (the finished image follows it)."""
    count = min(count, evaluations - 1)
    if count <= 0:
        return []
    return [-(-j * evaluations // (count + 1)) - 1 for j in range(1, count + 1)]  # ceil(j E / (count + 1)) - 1


def x0_estimate(x_t: Tensor, v_t: Tensor, t: Tensor | float) -> Tensor:
    """The clean-latent estimate at a step: x0 = x_t - t * v_t."""
    return x_t - t * v_t


def preview_size(width: int, height: int, max_side: int = PREVIEW_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of a preview: the image's, scaled down to `max_side` on the long side."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True, slots=True)
class LatentRGB:
    """rgb = latent @ weight + bias per latent pixel, in the decoder's [-1, 1] range."""

    weight: Tensor  # [z_channels, 3]
    bias: Tensor  # [3]
    r2: float  # fraction of the decoder's (downsampled) pixel variance the map explains on the fit images


@torch.inference_mode()
def fit_latent_rgb(vae: torch.nn.Module, seed: int = 0) -> LatentRGB:
    """Least squares from latent pixels to the VAE decoder's output averaged over each latent pixel's block
    (8 x 8 for BAGEL's VAE), fitted on smooth random images encoded by this VAE (posterior mean): the latents
    a trained model's x0 estimates resemble. (Adding standard normal latents to the fit was tried: it lowered
    the held-out agreement on encoded images, tests/core/test_previews.py.)"""
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    g = torch.Generator("cpu").manual_seed(seed)
    low = torch.rand((FIT_IMAGES, 3, 4, 4), generator=g) * 2 - 1
    x = F.interpolate(low, size=(FIT_SIZE, FIT_SIZE), mode="bicubic", align_corners=False).clamp(-1, 1)
    encoded = vae.encode(x.to(device, dtype), torch.zeros(()))  # posterior mean (eps 0)
    rows, targets = [], []
    for z in (encoded,):
        decoded = vae.decode(z).float()
        y = F.avg_pool2d(decoded, decoded.shape[-1] // z.shape[-1])  # [n, 3, h, w]
        rows.append(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu())
        targets.append(y.permute(0, 2, 3, 1).reshape(-1, 3).cpu())
    a = torch.cat(rows)
    a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1).double()
    b = torch.cat(targets).double()
    sol = torch.linalg.lstsq(a, b).solution  # [z + 1, 3]
    resid = b - a @ sol
    r2 = float(1 - resid.pow(2).sum() / (b - b.mean(0)).pow(2).sum().clamp_min(1e-12))
    return LatentRGB(sol[:-1].float().to(device), sol[-1].float().to(device), r2)


def _to_uint8(rgb: Tensor) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> HWC uint8."""
    return ((rgb.float() * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


def fast_preview(
    x0: Tensor,
    width: int,
    height: int,
    rgb_map: LatentRGB,
    downsample: int,
    patch: int,
    z_channels: int,
    max_side: int = PREVIEW_MAX_SIDE,
) -> np.ndarray:
    """A packed latent [N, p*p*z] (`downsample` image pixels per token side) through the linear map, upscaled
    to `preview_size`: HWC uint8."""
    z = unpatchify(x0.float(), height // downsample, width // downsample, patch, z_channels)  # [1, z, h, w]
    rgb = torch.einsum("nchw,cd->ndhw", z, rgb_map.weight) + rgb_map.bias[None, :, None, None]
    pw, ph = preview_size(width, height, max_side)
    rgb = F.interpolate(rgb, size=(ph, pw), mode="bilinear", align_corners=False)
    return _to_uint8(rgb)


def downscale(decoded: Tensor, width: int, height: int, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """A full decoder output [1, 3, H, W] scaled down to `preview_size`: HWC uint8."""
    pw, ph = preview_size(width, height, max_side)
    if (pw, ph) != (width, height):
        decoded = F.interpolate(decoded.float(), size=(ph, pw), mode="area")
    return _to_uint8(decoded)
