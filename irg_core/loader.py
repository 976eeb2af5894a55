"""Loading a model directory in the official layout, or building the same architecture with dummy weights.

Modules are built on the meta device; every tensor is then read from memory-mapped safetensors straight to
the target device and cast there (`load_state_dict(strict=True, assign=True)`), so a 14B checkpoint never
exists as a float32 copy in host memory. Before anything is read, the headers are checked against the
architecture and every missing, unexpected or mis-shaped tensor is reported by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from irg_core.checkpoint import AE_NAME, FLOAT_DTYPES, TensorInfo, check_model_files, ema_path, read_header
from irg_core.config import BagelConfig
from irg_core.errors import CheckpointError
from irg_core.model.bagel import Bagel
from irg_core.model.embed import PositionEmbedding, sincos_table
from irg_core.model.vae import AutoEncoder
from irg_core.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    cfg: BagelConfig
    model: Bagel
    vae: AutoEncoder
    tokenizer: Tokenizer | None
    device: torch.device
    dtype: torch.dtype


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on accelerators (as the official code runs), float32 on CPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _read_into(
    module: nn.Module, path: Path, header: dict[str, TensorInfo], device: torch.device, dtype: torch.dtype
) -> None:
    state = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in header:
                state[key] = f.get_tensor(key).to(dtype)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: could not read tensors ({e})") from e
    module.load_state_dict(state, strict=True, assign=True)


def grids_from_checkpoint(cfg: BagelConfig, model_dir: Path) -> BagelConfig:
    """Take the 2-D position grids from the checkpoint's sin-cos tables when they are genuine G x G tables.

    The official scripts construct max_latent_size 64 and 70 ViT patches per side in code; a checkpoint built
    with another grid carries a table of another size. A table whose rows are not exactly the G x G sin-cos
    table (e.g. a cut-down 64 x 64 one) keeps the default, and the shape check then reports it.
    Anything unreadable is left for `check_model_files` to report."""
    try:
        path = ema_path(model_dir)
        header = read_header(path)
    except CheckpointError:
        return cfg
    grids = {}
    for key, field, default in (
        ("latent_pos_embed.pos_embed", "max_latent_size", cfg.max_latent_size),
        ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side", cfg.vit_max_num_patch_per_side),
    ):
        info = header.get(key)
        if info is None or len(info.shape) != 2 or info.shape[1] != cfg.llm.hidden_size:
            continue
        side = math.isqrt(info.shape[0])
        if side == default or side * side != info.shape[0] or info.dtype not in FLOAT_DTYPES:
            continue
        with safe_open(str(path), framework="pt") as f:
            table = f.get_tensor(key).float()
        if torch.allclose(table, sincos_table(cfg.llm.hidden_size, side), atol=1e-2):
            grids[field] = side
    return replace(cfg, **grids)


def load_model(
    model_dir: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load `llm_config.json`, `vit_config.json`, [`ae_config.json`], the tokenizer and both weight files."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    cfg = grids_from_checkpoint(BagelConfig.from_model_dir(model_dir), model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    ema, ema_header, ae_header = check_model_files(model_dir, cfg)
    with torch.device("meta"):
        model, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    _read_into(model, ema, ema_header, device, dtype)
    _read_into(vae, model_dir / AE_NAME, ae_header, device, dtype)
    return LoadedModel(
        cfg, model.eval().requires_grad_(False), vae.eval().requires_grad_(False), tokenizer, device, dtype
    )


@torch.no_grad()
def init_weights(module: nn.Module, seed: int) -> None:
    """Random weights in place on the module's device: Linear/Conv N(0, 1/fan_in), biases N(0, 0.05^2),
    embeddings N(0, 0.5^2), norms 1 (+ bias 0); sin-cos tables exact."""
    device = next(module.parameters()).device
    if device.type == "meta":  # shapes only (e.g. to plan memory): nothing to fill
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, PositionEmbedding):
            sub.reset_table()
            continue
        for name, p in sub.named_parameters(recurse=False):
            if isinstance(sub, (nn.Linear, nn.Conv2d)) and name == "weight":
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
            elif isinstance(sub, nn.Embedding):
                p.normal_(0.0, 0.5, generator=gen)
            elif name == "bias":
                p.normal_(0.0, 0.05, generator=gen) if isinstance(sub, (nn.Linear, nn.Conv2d)) else p.zero_()
            else:  # norm weights
                p.fill_(1.0)


def build_dummy(
    cfg: BagelConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> LoadedModel:
    """The architecture of `cfg` with random weights, allocated directly on `device` (never on the CPU first)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    model = model.to(dtype).to_empty(device=device)  # the cast is free on meta; memory is allocated once
    vae = vae.to(dtype).to_empty(device=device)
    init_weights(model, seed)
    init_weights(vae, seed + 1)
    return LoadedModel(
        cfg, model.eval().requires_grad_(False), vae.eval().requires_grad_(False), tokenizer, device, dtype
    )
