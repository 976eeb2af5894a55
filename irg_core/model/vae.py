"""The FLUX autoencoder (`ae.safetensors`, raw FLUX key names).

Encoding samples the diagonal Gaussian posterior (mean + std * eps), as the official code does even at
inference; the caller supplies eps so that the noise comes from the request's seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from irg_core.config import VAEConfig


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head attention over all spatial positions, with a residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (p(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(o.transpose(2, 3).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


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
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
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
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def stages(self) -> list[Callable[[Tensor], Tensor]]:
        """The encoder as a sequence of functions (a caller may stop between two of them)."""
        out: list[Callable[[Tensor], Tensor]] = [self.conv_in]
        for level in self.down:
            out.extend(level.block)
            if hasattr(level, "downsample"):
                out.append(level.downsample)
        return out + [self.mid, lambda h: self.conv_out(swish(self.norm_out(h)))]

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages():
            x = stage(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
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
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def stages(self) -> list[Callable[[Tensor], Tensor]]:
        """The decoder as a sequence of functions (a caller may stop between two of them)."""
        out: list[Callable[[Tensor], Tensor]] = [self.conv_in, self.mid]
        for level in reversed(self.up):
            out.extend(level.block)
            if hasattr(level, "upsample"):
                out.append(level.upsample)
        return out + [lambda h: self.conv_out(swish(self.norm_out(h)))]

    def forward(self, z: Tensor) -> Tensor:
        for stage in self.stages():
            z = stage(z)
        return z


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def moments(self, x: Tensor) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> cat(mean, logvar) [B, 2z, H/8, W/8]."""
        return self.encoder(x)

    def encode(self, x: Tensor, eps: Tensor) -> Tensor:
        """Posterior sample mean + exp(logvar/2) * eps, then scaled and shifted into BAGEL's latent space."""
        return self.sample(self.moments(x), eps)

    def sample(self, moments: Tensor, eps: Tensor) -> Tensor:
        mean, logvar = moments.chunk(2, dim=1)
        z = mean + (0.5 * logvar).exp() * eps.to(mean.dtype)
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.decoder_input(z))

    def decoder_input(self, z: Tensor) -> Tensor:
        return z / self.cfg.scale_factor + self.cfg.shift_factor
