"""Where the GPU (bfloat16) path rounds, per mode, as the official code does: one small rule the engine reads.

The official scripts run everything under `torch.autocast("cuda", dtype=torch.bfloat16)` with bf16 weights,
but not the same things in the same way (verified against ByteDance-Seed/Bagel @ 056b5fd5 and
Osilly/Interleaving-Reasoning-Generation @ 3eee315f; docs/engine.md has the line-by-line account):

- **think / direct** (BAGEL `inferencer.py`): the initial noise is `torch.randn` (float32) and nothing casts
  it, so the Euler state stays float32 (`x_t - v_t * dt` promotes a bf16 velocity); the latent is decoded
  inside the autocast region, so the decoder's GroupNorms and swishes run in float32 and its convolutions in
  bf16, and `z / scale + shift` is done in float32.
- **irg** (`tiif_multi_turn_gen.py`): `move_generation_input_to_device` casts every floating input, the
  noise included, to bf16, so the state starts in bf16 (a per-token renorm later promotes it, as in BAGEL);
  the latent is cast to bf16 and decoded *outside* autocast: the whole decoder runs in bf16.
- **every mode**: an image put into the context goes through the VAE encoder under autocast (GroupNorm and
  the posterior's `exp` in float32, convolutions in bf16); the decoded image is mapped to uint8 in the
  decoder output's own dtype (`*0.5+0.5`, clamp, `*255` in bf16 on the GPU), as both scripts do.

With float32 weights (the CPU, the goldens) every rule below yields float32: the float32 path is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Precision:
    """How one mode's image rounds compute on weights of a given dtype."""

    state_dtype: torch.dtype  # the initial noise / Euler state of the denoising loop
    decode_mixed: bool  # decoder as under autocast (float32 norms, bf16 convs) rather than all in the weights' dtype
    encode_mixed: bool = True  # encoder as under autocast (every official path encodes inside autocast)


def precision(mode: str, weights_dtype: torch.dtype) -> Precision:
    """The rounding rule of `mode` (irg, think, direct) on weights of `weights_dtype`."""
    if weights_dtype == torch.float32:
        return Precision(torch.float32, decode_mixed=False)
    if mode == "irg":
        return Precision(weights_dtype, decode_mixed=False)
    return Precision(torch.float32, decode_mixed=True)
