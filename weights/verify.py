"""`irg weights verify DIR`: check a model directory against the architecture without loading any tensor.

Reads the configs, the tokenizer and the safetensors headers (names, shapes, dtypes, sizes) and collects
every problem, one message each, so a 29 GB checkpoint is judged in about a second (BAGEL_SPEC §9, §13).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irg_core import checkpoint as ck
from irg_core.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig, parse_config, read_json
from irg_core.errors import CheckpointError, ConfigError, TokenizerError
from irg_core.tokenizer import Tokenizer, expected_special_ids
from weights.fetch import human_bytes

LLM_FILE, VIT_FILE, AE_CONFIG_FILE = "llm_config.json", "vit_config.json", "ae_config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# Keys whose absence would silently give our defaults, which differ from the HF classes' defaults the
# official code would use (Qwen2Config / SiglipVisionConfig).
REQUIRED_KEYS = {
    LLM_FILE: (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "rope_theta",
    ),
    VIT_FILE: (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "patch_size",
        "image_size",
    ),
}
SHAPE_FREE_KEYS = {"rope_theta"}  # missing, it is a problem, but the tensor shapes can still be checked


@dataclass
class WeightFile:
    name: str
    size: int
    tensors: int
    params: int
    dtypes: dict[str, int]


@dataclass
class Report:
    model_dir: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: BagelConfig | None = None  # None when a config file has a problem
    tokens: int | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    files: list[WeightFile] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(model_dir: str | Path) -> Report:
    """Every problem of a model directory in the official BAGEL layout (headers only, no tensor data)."""
    report = Report(Path(model_dir))
    if not report.model_dir.is_dir():
        report.problems.append(f"{report.model_dir}: not a directory")
        return report
    report.config = _check_configs(report)
    _check_tokenizer(report)
    _check_weights(report)
    return report


def _check_configs(report: Report) -> BagelConfig | None:
    parts: dict[str, Any] = {"vae": VAEConfig()}  # the FLUX values BAGEL hard-codes, unless ae_config.json
    for key, cls, name in (
        ("llm", LLMConfig, LLM_FILE),
        ("vit", ViTConfig, VIT_FILE),
        ("vae", VAEConfig, AE_CONFIG_FILE),
    ):
        path = report.model_dir / name
        if key == "vae" and not path.exists():
            continue
        try:
            data = read_json(path)
        except ConfigError as e:
            report.problems.append(str(e))
            parts[key] = None
            continue
        missing = [k for k in REQUIRED_KEYS.get(name, ()) if data.get(k) is None]
        report.problems.extend(f"{name}: {k} is missing" for k in missing)
        parts[key], problems = parse_config(cls, data, name)
        report.problems.extend(problems)
        if set(missing) - SHAPE_FREE_KEYS:
            parts[key] = None  # our defaults would make every shape check wrong
    if any(v is None for v in parts.values()):
        return None
    return BagelConfig(**parts)


def _check_tokenizer(report: Report) -> None:
    missing = [n for n in TOKENIZER_FILES if not (report.model_dir / n).is_file()]
    report.problems.extend(f"{n}: missing from {report.model_dir}" for n in missing)
    if TOKENIZER_FILES[0] in missing:
        return
    try:
        tok = Tokenizer.from_dir(report.model_dir)
    except TokenizerError as e:
        report.problems.append(str(e))
        return
    report.tokens = len(tok)
    s = tok.special
    report.special_ids = {
        "bos": s.bos,
        "eos": s.eos,
        "start_of_image": s.start_of_image,
        "end_of_image": s.end_of_image,
    }
    for role, want in expected_special_ids().items():
        if report.special_ids[role] != want:
            report.notes.append(
                f"tokenizer.json: {role} token has id {report.special_ids[role]}, not {want} as "
                f"in the Qwen2.5 tokenizer BAGEL ships (are these the checkpoint's own files?)"
            )
    if report.config is None:
        return
    vocab = report.config.llm.vocab_size
    if len(tok) > vocab:
        report.problems.append(
            f"tokenizer.json: {len(tok)} tokens, but {LLM_FILE} vocab_size is {vocab} "
            f"(every token needs an embedding row)"
        )


def _check_weights(report: Report) -> None:
    present = [n for n in ck.EMA_NAMES if (report.model_dir / n).is_file()]
    if not present:
        report.problems.append(f"{' or '.join(ck.EMA_NAMES)}: missing from {report.model_dir}")
    elif len(present) > 1:
        report.notes.append(f"both {' and '.join(present)} are present; the loader uses {present[0]}")
    cfg = report.config
    for name in [*present[:1], ck.AE_NAME]:
        path = report.model_dir / name
        try:
            header = ck.read_header(path)
        except CheckpointError as e:
            report.problems.append(str(e))
            continue
        if cfg is None:
            report.notes.append(f"{name}: tensor names and shapes not checked (the configs have problems)")
        else:
            expected = ck.expected_ae(cfg.vae) if name == ck.AE_NAME else ck.expected_bagel(cfg)
            report.problems.extend(ck.tensor_problems(name, header, expected))
        report.problems.extend(ck.dtype_problems(name, header))
        dtypes = dict(Counter(info.dtype for info in header.values()))
        report.files.append(
            WeightFile(name, path.stat().st_size, len(header), sum(math.prod(i.shape) for i in header.values()), dtypes)
        )


def format_report(report: Report, per_file: int | None = 20) -> str:
    """The summary, every note and problem (at most `per_file` problems per file; None = all), the verdict."""
    lines = [f"model directory {report.model_dir}"]
    cfg = report.config
    if cfg is not None:
        lines.append(
            f"  {LLM_FILE}: hidden {cfg.llm.hidden_size}, {cfg.llm.num_hidden_layers} layers, "
            f"{cfg.llm.num_attention_heads}/{cfg.llm.num_key_value_heads} heads, vocab {cfg.llm.vocab_size}, "
            f"rope_theta {cfg.llm.rope_theta:.10g}, rms_norm_eps {cfg.llm.rms_norm_eps:g}"
        )
        lines.append(
            f"  {VIT_FILE}: hidden {cfg.vit.hidden_size}, {cfg.vit.num_hidden_layers} layers on disk "
            f"({cfg.vit.layers} used), patch {cfg.vit.patch_size}, image {cfg.vit.image_size}"
        )
        source = AE_CONFIG_FILE if (report.model_dir / AE_CONFIG_FILE).exists() else "FLUX values built in"
        lines.append(
            f"  vae ({source}): ch {cfg.vae.ch}, ch_mult {list(cfg.vae.ch_mult)}, z_channels {cfg.vae.z_channels}"
        )
    if report.tokens is not None:
        ids = "/".join(str(v) for v in report.special_ids.values())
        lines.append(f"  tokenizer: {report.tokens} tokens, special ids {ids} (bos/eos/start/end of image)")
    for f in report.files:
        dtypes = ", ".join(f"{d} x{n}" if len(f.dtypes) > 1 else d for d, n in f.dtypes.items())
        lines.append(f"  {f.name}: {f.tensors} tensors, {_count(f.params)} parameters, {dtypes}, {human_bytes(f.size)}")
    lines += [f"  note: {n}" for n in report.notes]
    if report.ok:
        lines.append("ok: no problems found")
    else:
        shown: Counter[str] = Counter()
        for p in report.problems:
            source = p.split(":", 1)[0]
            shown[source] += 1
            if per_file is None or shown[source] <= per_file:
                lines.append(f"  problem: {p}")
        for source, n in shown.items():
            if per_file is not None and n > per_file:
                lines.append(f"  ... and {n - per_file} more problems with {source} (--all lists them)")
        lines.append(f"{len(report.problems)} problem{'s' if len(report.problems) > 1 else ''} found")
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)
