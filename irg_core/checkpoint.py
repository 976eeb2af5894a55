"""What a BAGEL model directory must hold, and reading safetensors headers without loading tensors.

Used by the loader (strict loading with clear errors) and by `irg weights verify`.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from irg_core.config import BagelConfig, VAEConfig
from irg_core.errors import CheckpointError

FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ITEM_SIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
EMA_NAMES = ("ema.safetensors", "ema_bf16.safetensors")  # BAGEL's app / IRG's script
AE_NAME = "ae.safetensors"
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file; checks that the data is complete."""
    name = path.name
    if not path.is_file():
        raise CheckpointError(f"{name}: missing from {path.parent}")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{name}: truncated ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{name}: truncated or not a safetensors file (header of {n} bytes, file of {size})"
                )
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: malformed safetensors header")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for key, meta in header.items():
        try:
            info = TensorInfo(
                str(meta["dtype"]),
                tuple(int(d) for d in meta["shape"]),
                int(meta["data_offsets"][0]),
                int(meta["data_offsets"][1]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{name}: malformed header entry for tensor {key}") from e
        numel = 1
        for d in info.shape:
            numel *= d
        if info.dtype in ITEM_SIZE and info.end - info.start != numel * ITEM_SIZE[info.dtype]:
            raise CheckpointError(
                f"{name}: tensor {key} has {info.end - info.start} bytes for shape {list(info.shape)} {info.dtype}"
            )
        out[key] = info
        end = max(end, info.end)
    if 8 + n + end > size:
        raise CheckpointError(f"{name}: truncated ({size} bytes on disk, the header describes {8 + n + end})")
    return out


def ema_path(model_dir: Path) -> Path:
    for candidate in EMA_NAMES:
        if (model_dir / candidate).is_file():
            return model_dir / candidate
    raise CheckpointError(f"{' or '.join(EMA_NAMES)}: missing from {model_dir}")


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def expected_bagel(cfg: BagelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of `ema.safetensors` for this config, with its shape."""
    from irg_core.model.bagel import Bagel

    with torch.device("meta"):
        return _meta_shapes(Bagel(cfg))


def expected_ae(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    from irg_core.model.vae import AutoEncoder

    with torch.device("meta"):
        return _meta_shapes(AutoEncoder(cfg))


def tensor_problems(file_name: str, found: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Every missing, unexpected, mis-shaped or non-float tensor, one message each."""
    problems = []
    for key in expected:
        if key not in found:
            problems.append(f"{file_name}: missing tensor {key} (expected shape {list(expected[key])})")
    for key, info in found.items():
        if key not in expected:
            problems.append(f"{file_name}: unexpected tensor {key} (shape {list(info.shape)})")
        elif info.shape != expected[key]:
            problems.append(f"{file_name}: tensor {key} has shape {list(info.shape)}, expected {list(expected[key])}")
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(
                f"{file_name}: tensor {key} has dtype {info.dtype}, expected a float type ({'/'.join(FLOAT_DTYPES)})"
            )
    return problems


def dtype_problems(file_name: str, found: dict[str, TensorInfo]) -> list[str]:
    """Float tensors whose dtype differs from the file's most common one (the loader casts them; a mixed
    file is usually a bad conversion). Non-float tensors are `tensor_problems`' business."""
    counts = Counter(info.dtype for info in found.values() if info.dtype in FLOAT_DTYPES)
    if len(counts) < 2:
        return []
    main, n = counts.most_common(1)[0]
    return [
        f"{file_name}: tensor {key} is {info.dtype} while {n} other tensors of the file are {main}"
        for key, info in found.items()
        if info.dtype in FLOAT_DTYPES and info.dtype != main
    ]


def check_model_files(model_dir: Path, cfg: BagelConfig) -> tuple[Path, dict[str, TensorInfo], dict[str, TensorInfo]]:
    """Headers of the weight files, or a CheckpointError listing every problem found."""
    problems: list[str] = []
    headers: list[dict[str, TensorInfo]] = []
    try:
        ema = ema_path(model_dir)
    except CheckpointError as e:
        problems.append(str(e))
        ema = model_dir / EMA_NAMES[0]
    for path, expected in ((ema, lambda: expected_bagel(cfg)), (model_dir / AE_NAME, lambda: expected_ae(cfg.vae))):
        try:
            header = read_header(path)
        except CheckpointError as e:
            if str(e) not in problems:
                problems.append(str(e))
            headers.append({})
            continue
        headers.append(header)
        problems.extend(tensor_problems(path.name, header, expected()))
    if problems:
        raise CheckpointError(_summarise(problems))
    return ema, headers[0], headers[1]


def _summarise(problems: list[str], limit: int = 8) -> str:
    head = "; ".join(problems[:limit])
    more = f"; and {len(problems) - limit} more problems" if len(problems) > limit else ""
    return head + more
