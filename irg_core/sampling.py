"""The rectified-flow sampler and classifier-free guidance, as pure functions (BAGEL `generate_image`).

Convention: t runs from 1 (pure noise) to 0 (data); the model predicts v ~ noise - data, and each Euler step
is x <- x - v * (t_i - t_{i+1}).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def timesteps(num_timesteps: int, shift: float, device: torch.device | str = "cpu") -> Tensor:
    """The shifted schedule t_0 = 1 > ... > t_{n-1} = 0 (float32); n - 1 model evaluations use t_0..t_{n-2}."""
    s = torch.linspace(1, 0, num_timesteps, device=device)
    return shift * s / (1 + (shift - 1) * s)


def cfg_active(ts: Tensor, interval: tuple[float, float]) -> list[bool]:
    """Per evaluated step: is guidance on (lo < t <= hi, compared in float32 as upstream)?"""
    lo, hi = interval
    return ((ts[:-1] > lo) & (ts[:-1] <= hi)).tolist()


def _norm(v: Tensor, per_token: bool) -> Tensor:
    """L2 norm in float32 (what torch.norm returns under autocast): per token [N, 1] or over everything."""
    if per_token:
        return torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.linalg.vector_norm(v, dtype=torch.float32)


def cfg_combine(v: Tensor, v_no_text: Tensor | None, v_no_img: Tensor | None, text_scale: float,
                img_scale: float, renorm: str, renorm_min: float) -> Tensor:
    """BAGEL `_forward_flow`: text guidance first, then image guidance, then the renorm.

    Guidance applies only when text_scale > 1 (image guidance alone does nothing, as upstream).
    `text_channel` renormalises the text-guided velocity per token before image guidance; `global` and
    `channel` renormalise the final velocity (over the whole tensor / per token) against the conditional one.
    """
    if text_scale <= 1.0 or v_no_text is None:
        return v
    use_img = img_scale > 1.0 and v_no_img is not None
    u = v_no_text + text_scale * (v - v_no_text)
    if renorm == "text_channel":
        u = u * (_norm(v, True) / (_norm(u, True) + 1e-8)).clamp(min=renorm_min, max=1.0)
        return v_no_img + img_scale * (u - v_no_img) if use_img else u
    if use_img:
        u = v_no_img + img_scale * (u - v_no_img)
    per_token = renorm == "channel"
    if renorm not in ("global", "channel"):
        raise ValueError(f"renorm must be global, channel or text_channel, not {renorm!r}")
    return u * (_norm(v, per_token) / (_norm(u, per_token) + 1e-8)).clamp(min=renorm_min, max=1.0)


def sample_flow(velocity: Callable[[int, Tensor], Tensor], x: Tensor, ts: Tensor) -> Tensor:
    """Euler integration from t_0 to t_{n-1}; `velocity(i, x)` is evaluated at t_i."""
    dts = ts[:-1] - ts[1:]
    for i in range(ts.shape[0] - 1):
        x = x - velocity(i, x) * dts[i]
    return x
