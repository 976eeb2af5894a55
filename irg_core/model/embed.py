"""Timestep embedder, 2-D sin-cos position tables and the ViT connector (BAGEL `modeling_utils.py`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sincos_table(hidden: int, grid: int) -> Tensor:
    """The fixed [grid*grid, hidden] table; row r*grid + c holds [sin(c w), cos(c w), sin(r w), cos(r w)].

    The column term comes first (BAGEL labels it "h" but builds it from the w-grid); float64, then float32.
    """
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    coords = torch.arange(grid, dtype=torch.float64)
    col = torch.outer(coords.repeat(grid), omega)  # c for row-major (r, c)
    row = torch.outer(coords.repeat_interleave(grid), omega)
    table = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1)  # [G*G, D]
    return table.float()


def table_embedding(rows: int, hidden: int) -> nn.Embedding:
    """An `nn.Embedding` whose weight is left uninitialised: the checkpoint fills it.

    `nn.Embedding`'s own init draws a normal on the meta device, where PyTorch routes it through a Python
    decomposition that imports `torch._dynamo` (about 1 s, once per process): a cost every `irg` command
    paid for a value it overwrites.
    """
    return nn.Embedding(rows, hidden, _weight=torch.empty(rows, hidden))


class PositionEmbedding(nn.Module):
    """A checkpoint-stored sin-cos table indexed by flattened 2-D position ids."""

    def __init__(self, grid: int, hidden: int):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.empty(grid * grid, hidden), requires_grad=False)

    def reset_table(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_table(self.pos_embed.shape[1], self.grid))

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.pos_embed[position_ids]


def timestep_freqs(freq_dim: int) -> Tensor:
    """exp(-ln(10000) * i / half), i < half: computed on the CPU in float32, as the official code does before
    moving it to the device (a device `exp` may round an ulp differently)."""
    half = freq_dim // 2
    return torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding: t in [0, 1] as is, [cos, sin] features (cos first), then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def features(self, t: Tensor) -> Tensor:
        args = t.float()[:, None] * timestep_freqs(self.freq_dim).to(t.device)[None]  # [N, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(self.features(t).to(dtype))


class MLPConnector(nn.Module):
    """ViT width -> LLM width: fc1, GELU (tanh), fc2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))
