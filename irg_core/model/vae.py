"""The FLUX autoencoder (`ae.safetensors`, raw FLUX key names).

Encoding samples the diagonal Gaussian posterior (mean + std * eps), as the official code does even at
inference; the caller supplies eps so that the noise comes from the request's seed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from irg_core.config import VAEConfig


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and keys). On the CPU a bfloat16 convolution is computed in float32 from
    the bf16 values and rounded once to bf16, which is what a GPU's bf16 kernel computes (float32
    accumulation, one rounding of the output). PyTorch's own CPU bf16 convolution falls back to a reference
    kernel where oneDNN has no bf16 support (no AVX-512): about 100x slower, minutes for one 512² encode."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16:
            bias = None if self.bias is None else self.bias.float()
            return self._conv_forward(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return super().forward(x)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _norm_out(norm: nn.GroupNorm, x: Tensor, mixed: bool) -> Tensor:
    """GroupNorm; `mixed`: as under CUDA autocast, in float32 with a float32 result (group_norm is on
    autocast's float32 list), whatever the weights' dtype; the next convolution rounds back (`_conv`)."""
    if not mixed:
        return norm(x)
    return F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)


def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A convolution in the weights' dtype (under autocast: its input cast to bf16)."""
    return conv(x.to(conv.weight.dtype))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, mixed: bool = False) -> Tensor:
        h = _conv(self.conv1, swish(_norm_out(self.norm1, x, mixed)))
        h = _conv(self.conv2, swish(_norm_out(self.norm2, h, mixed)))
        return (x if self.nin_shortcut is None else _conv(self.nin_shortcut, x)) + h


class AttnBlock(nn.Module):
    """Single-head attention over all spatial positions, with a residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: Tensor, mixed: bool = False) -> Tensor:
        h = _norm_out(self.norm, x, mixed)
        b, c, hh, ww = x.shape
        q, k, v = (_conv(p, h).reshape(b, 1, c, hh * ww).transpose(2, 3) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(o.transpose(2, 3).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)

    def forward(self, x: Tensor, mixed: bool = False) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x, mixed), mixed), mixed)


class _Level(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, name, resample)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = Conv2d(cfg.in_channels, ch, 3, padding=1)
        levels, cin = [], ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * m))
                cin = ch * m
            levels.append(_Level(blocks, Downsample(cin) if i < len(mult) - 1 else None, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def stages(self, mixed: bool = False) -> list[Callable[[Tensor], Tensor]]:
        """The encoder as a sequence of functions (a caller may stop between two of them)."""
        out: list[Callable[[Tensor], Tensor]] = [partial(_conv, self.conv_in)]
        for level in self.down:
            out.extend(partial(block, mixed=mixed) for block in level.block)
            if hasattr(level, "downsample"):
                out.append(level.downsample)
        return out + [
            partial(self.mid, mixed=mixed),
            lambda h: _conv(self.conv_out, swish(_norm_out(self.norm_out, h, mixed))),
        ]

    def forward(self, x: Tensor, mixed: bool = False) -> Tensor:
        for stage in self.stages(mixed):
            x = stage(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        cin = ch * mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin)
        levels: list[_Level] = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
            levels.insert(0, _Level(blocks, Upsample(cin) if i > 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = Conv2d(cin, cfg.out_ch, 3, padding=1)

    def stages(self, mixed: bool = False) -> list[Callable[[Tensor], Tensor]]:
        """The decoder as a sequence of functions (a caller may stop between two of them)."""
        out: list[Callable[[Tensor], Tensor]] = [partial(_conv, self.conv_in), partial(self.mid, mixed=mixed)]
        for level in reversed(self.up):
            out.extend(partial(block, mixed=mixed) for block in level.block)
            if hasattr(level, "upsample"):
                out.append(level.upsample)
        return out + [lambda h: _conv(self.conv_out, swish(_norm_out(self.norm_out, h, mixed)))]

    def forward(self, z: Tensor, mixed: bool = False) -> Tensor:
        for stage in self.stages(mixed):
            z = stage(z)
        return z


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def moments(self, x: Tensor, mixed: bool = False) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> cat(mean, logvar) [B, 2z, H/8, W/8] (in the weights' dtype)."""
        return self.encoder(x, mixed)

    def encode(self, x: Tensor, eps: Tensor, mixed: bool = True) -> Tensor:
        """Posterior sample mean + exp(logvar/2) * eps, then scaled and shifted into BAGEL's latent space.

        `mixed` (the official code encodes under autocast): GroupNorms in float32, and `exp` too, so with
        bf16 weights the sample is float32 (bf16 mean + float32 std * eps rounded to bf16, as `randn_like(mean)`
        draws it)."""
        return self.sample(self.moments(x, mixed), eps, mixed)

    def sample(self, moments: Tensor, eps: Tensor, mixed: bool = True) -> Tensor:
        """The posterior sample of encoder moments, scaled and shifted (see `encode`)."""
        mean, logvar = moments.chunk(2, dim=1)
        std = (0.5 * logvar).float().exp() if mixed else (0.5 * logvar).exp()
        z = mean + std * eps.to(mean.dtype)
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, z: Tensor, mixed: bool = False) -> Tensor:
        """Latent [B, z, h, w] -> image [B, 3, H, W]. Plain: z is cast to the weights' dtype first and every op
        runs in it. `mixed` (as under autocast): `z / scale + shift` in z's dtype, GroupNorm and swish in float32,
        convolutions in the weights' dtype; the output is in the weights' dtype either way."""
        return self.decoder(self.decoder_input(z, mixed), mixed)

    def decoder_input(self, z: Tensor, mixed: bool = False) -> Tensor:
        """What the decoder's first convolution takes: z unscaled and unshifted (see `decode`)."""
        if not mixed:
            z = z.to(self.dtype)
        return z / self.cfg.scale_factor + self.cfg.shift_factor
