"""Model configuration: frozen dataclasses read from the official checkpoint's JSON files.

BAGEL reads `llm_config.json` and `vit_config.json`; the VAE parameters are hard-coded in the official
`load_ae` (FLUX), and `ae_config.json` (our extension, used by the tiny goldens) overrides them when present.
The Bagel-level values (`max_latent_size` 64, `latent_patch_size` 2, ...) are constructed in code by every
official inference script; see BAGEL_SPEC §1.4.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from irg_core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class LLMConfig:
    hidden_size: int = 3584
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    intermediate_size: int = 18944
    vocab_size: int = 152064
    rope_theta: float = 10000.0  # the Qwen2 code default; real configs say 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("llm_config.json: hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("llm_config.json: num_attention_heads must be divisible by num_key_value_heads")
        if self.head_dim % 2:
            raise ConfigError("llm_config.json: head_dim must be even for RoPE")


@dataclass(frozen=True, slots=True)
class ViTConfig:
    """SigLIP config as on disk; BAGEL builds `num_hidden_layers - 1` layers (see `layers`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def layers(self) -> int:
        return self.num_hidden_layers - 1  # BAGEL drops the last layer (vit_select_layer = -2)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("vit_config.json: hidden_size must be divisible by num_attention_heads")
        if self.num_hidden_layers < 2:
            raise ConfigError("vit_config.json: num_hidden_layers must be at least 2 (BAGEL uses all but the last)")


@dataclass(frozen=True, slots=True)
class VAEConfig:
    """FLUX AutoEncoderParams; the defaults are the ones the official `load_ae` hard-codes."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def validate(self) -> None:
        if 2 ** (len(self.ch_mult) - 1) != self.downsample:
            raise ConfigError("ae_config.json: downsample must be 2^(len(ch_mult) - 1)")
        if any((self.ch * m) % 32 for m in self.ch_mult):
            raise ConfigError("ae_config.json: every level's channel count must be a multiple of 32 (GroupNorm)")


@dataclass(frozen=True, slots=True)
class BagelConfig:
    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    timestep_embed_dim: int = 256

    @property
    def latent_downsample(self) -> int:
        """Pixels per generation token side (VAE downsample x latent patch)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample

    def validate(self) -> None:
        self.llm.validate()
        self.vit.validate()
        self.vae.validate()

    def to_dict(self) -> dict[str, Any]:
        return {
            "llm": asdict(self.llm),
            "vit": asdict(self.vit),
            "vae": asdict(self.vae),
            "latent_patch_size": self.latent_patch_size,
            "max_latent_size": self.max_latent_size,
            "vit_max_num_patch_per_side": self.vit_max_num_patch_per_side,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> BagelConfig:
        extra = {k: d[k] for k in ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side") if k in d}
        cfg = cls(
            llm=_pick(LLMConfig, d.get("llm", {}), f"{where}: llm"),
            vit=_pick(ViTConfig, d.get("vit", {}), f"{where}: vit"),
            vae=_pick(VAEConfig, d.get("vae", d.get("ae", {})), f"{where}: vae"),
            **extra,
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> BagelConfig:
        """Read `llm_config.json`, `vit_config.json` and the optional `ae_config.json`."""
        d = Path(model_dir)
        llm = _pick(LLMConfig, read_json(d / "llm_config.json"), "llm_config.json")
        vit = _pick(ViTConfig, read_json(d / "vit_config.json"), "vit_config.json")
        ae_path = d / "ae_config.json"
        vae = _pick(VAEConfig, read_json(ae_path), "ae_config.json") if ae_path.exists() else VAEConfig()
        cfg = cls(llm=llm, vit=vit, vae=vae)
        cfg.validate()
        return cfg


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path.name}: missing from {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path.name}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a JSON object")
    return data


def _pick(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a config dataclass from the JSON keys it knows; the rest of an HF config is ignored."""
    kwargs, problems = _collect(cls, data, where)
    if problems:
        raise ConfigError("; ".join(problems))
    return cls(**kwargs)


def parse_config(cls: type, data: dict[str, Any], where: str) -> tuple[Any, list[str]]:
    """Like `_pick` followed by `validate()`, but returns every problem (one message each) instead of raising."""
    kwargs, problems = _collect(cls, data, where)
    if problems:
        return None, problems
    cfg = cls(**kwargs)
    try:
        cfg.validate()
    except ConfigError as e:
        return None, [str(e)]
    return cfg, []


def _collect(cls: type, data: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    kwargs, problems = {}, []
    for f in fields(cls):
        if f.name not in data or data[f.name] is None:
            continue
        value = data[f.name]
        want = type(f.default) if f.default is not None else object
        if want is tuple:
            if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
                problems.append(f"{where}: {f.name} must be a list of integers")
                continue
            value = tuple(value)
        elif want is int and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"{where}: {f.name} must be an integer, got {value!r}")
            continue
        elif want is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{where}: {f.name} must be a number, got {value!r}")
                continue
            value = float(value)
        if want is int and value <= 0:
            problems.append(f"{where}: {f.name} must be positive, got {value}")
            continue
        kwargs[f.name] = value
    return kwargs, problems
