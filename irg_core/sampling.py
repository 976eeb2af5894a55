"""The rectified-flow sampler and classifier-free guidance, as pure functions (BAGEL `generate_image`).

Convention: t runs from 1 (pure noise) to 0 (data); the model predicts v ~ noise - data, and each Euler step
is x <- x - v * (t_i - t_{i+1}).
"""

from __future__ import annotations

import math
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


def cfg_combine(
    v: Tensor,
    v_no_text: Tensor | None,
    v_no_img: Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm: str,
    renorm_min: float,
) -> Tensor:
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


# -- token sampling ----------------------------------------------------------------------------------------
# Sampled thoughts use the Gumbel-max trick with counter-based noise: token = argmax(logits / T + g), where
# g = -log(-log(u)) and u is a hash of (the sequence's seed, the token's index in the thought, the vocabulary
# id). That samples from softmax(logits / T), is computed on the device for a whole batch at once, and gives a
# sequence the same noise whether it decodes alone or beside others, on any device.

_M32 = 0xFFFFFFFF
_VOCAB_HASH: dict[tuple[int, str], Tensor] = {}


def _mix32(x):
    """A 32-bit integer finaliser (xor-shift-multiply); works on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _row_key(seed: int, step: int) -> int:
    seed &= (1 << 64) - 1
    return _mix32(_mix32(_mix32(seed & _M32) ^ _mix32((seed >> 32) & _M32) ^ 0x5BD1E995) ^ (step & _M32))


def _vocab_hash(vocab: int, device: torch.device) -> Tensor:
    key = (vocab, str(device))
    table = _VOCAB_HASH.get(key)
    if table is None:
        table = _VOCAB_HASH[key] = _mix32(torch.arange(vocab, dtype=torch.int64, device=device) + 0x632BE5AB)
    return table


def _uniform_to_gumbel(h: Tensor) -> Tensor:
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in [2^-25, 1 - 2^-25]
    return -torch.log(-torch.log(u))


# The extreme values the noise can take (u at its bounds), with a margin for float32 rounding.
GUMBEL_MAX = -math.log(-math.log1p(-(2.0**-25))) + 1e-3
GUMBEL_MIN = -math.log(-math.log(2.0**-25)) - 1e-3
CANDIDATES = 64


def _row_keys(seeds: list[int], steps: list[int], device: torch.device) -> Tensor:
    return torch.tensor([_row_key(s, i) for s, i in zip(seeds, steps)], dtype=torch.int64, device=device)


def gumbel_noise(seeds: list[int], steps: list[int], vocab: int, device: torch.device) -> Tensor:
    """[B, vocab] float32 standard Gumbel noise, a pure function of (seed, step, vocabulary id)."""
    keys = _row_keys(seeds, steps, device)
    return _uniform_to_gumbel(_mix32(keys[:, None] ^ _vocab_hash(vocab, device)[None, :]))


def sample_tokens(logits: Tensor, temperatures: list[float], seeds: list[int], steps: list[int]) -> Tensor:
    """One token per row of logits [B, vocab]: argmax where the temperature is 0, else a Gumbel-max sample
    at that temperature from the row's own noise stream.

    The noise of a token depends only on (seed, step, token id), so it is computed for the row's best
    `CANDIDATES` tokens only when no other token could win (its scaled logit plus the largest possible noise
    stays below the best one's plus the smallest): the same token as over the whole vocabulary, far cheaper."""
    greedy = logits.argmax(dim=-1)
    if not any(t > 0 for t in temperatures):
        return greedy
    device = logits.device
    temps = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=device)
    scaled = logits.float() / temps[:, None]
    k = min(CANDIDATES, scaled.shape[-1])
    top, ids = scaled.topk(k, dim=-1)
    keys = _row_keys(seeds, steps, device)
    noise = _uniform_to_gumbel(_mix32(keys[:, None] ^ _vocab_hash(scaled.shape[-1], device)[ids]))
    sampled = ids.gather(1, (top + noise).argmax(dim=-1, keepdim=True))[:, 0]
    exact = (top[:, -1] + GUMBEL_MAX < top[:, 0] + GUMBEL_MIN).tolist()
    flat = [i for i, ok in enumerate(exact) if not ok and temperatures[i] > 0]  # greedy rows never need it
    for i in flat:  # a flat distribution: the whole vocabulary competes
        # one row at a time: a row's temporaries stay in the CPU's cache (all rows at once: 5x the time at 4 rows)
        noise = gumbel_noise([seeds[i]], [steps[i]], scaled.shape[-1], device)
        sampled[i] = (scaled[i] + noise[0]).argmax()
    hot = torch.tensor([t > 0 for t in temperatures], device=device)
    return torch.where(hot, sampled, greedy)
