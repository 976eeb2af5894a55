"""Options shared by the commands that run the engine: which model, which device."""

from __future__ import annotations

import argparse
import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli.errors import CommandError

if TYPE_CHECKING:
    from irg_core.engine import Engine

DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("sdpa", "varlen", "flash", "xformers")  # irg_core.attention.BACKENDS (no torch import here)


def add_model_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model-dir",
        type=Path,
        help="model directory in the official BAGEL layout (default: the embedded demo checkpoint)",
    )
    src.add_argument(
        "--dummy-weights",
        type=Path,
        metavar="CONFIG",
        help="random weights for this architecture: a config file, or the name of a packaged one ("
        + ", ".join(packaged_configs())
        + ")",
    )
    p.add_argument("--tokenizer-dir", type=Path, help="tokenizer files for --dummy-weights (default: the demo's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument(
        "--attention",
        choices=BACKENDS,
        default=os.environ.get("IRG_ATTENTION", "sdpa"),
        help="attention backend (default: $IRG_ATTENTION or sdpa; flash and xformers need their extras)",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly on CUDA")
    p.add_argument(
        "--compile",
        action="store_true",
        default=os.environ.get("IRG_COMPILE", "").lower() in ("1", "true", "yes"),
        help="compile the decode step with torch.compile (default: $IRG_COMPILE; the first step of each new "
        "shape compiles, tens of seconds; needs a C++ compiler on the CPU)",
    )


def show_weights_log() -> None:
    """Let the weights package's progress lines (the demo checkpoint being created) reach stderr in commands
    that configure no logging of their own (`irg generate`, `irg bench`)."""
    import logging
    import sys

    logger = logging.getLogger("weights")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("irg: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def packaged_configs() -> list[str]:
    """Names of the architecture configs shipped in irg_core/data (JSON files with an `llm` section)."""
    folder = resources.files("irg_core.data")
    names = []
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            try:
                if "llm" in json.loads(entry.read_text("utf-8")):
                    names.append(entry.name.removesuffix(".json"))
            except (OSError, ValueError):
                continue
    return sorted(names)


def read_config(value: Path) -> tuple[dict, str]:
    """An architecture config and where it came from: a file (from any directory), else a packaged name
    (`dummy_medium`, `dummy_medium.json`, `irg_core/data/dummy_medium.json` from outside the repository)."""
    if value.is_file():
        where: str = str(value)
        text = value.read_text("utf-8")
    else:
        name = value.name.removesuffix(".json")
        if name not in packaged_configs():
            raise CommandError(
                f"--dummy-weights {value}: no such file, nor a packaged config (packaged: "
                f"{', '.join(packaged_configs())})"
            )
        where = f"irg_core/data/{name}.json"
        text = resources.files("irg_core.data").joinpath(f"{name}.json").read_text("utf-8")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f"--dummy-weights {value}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise CommandError(f"--dummy-weights {value}: expected a JSON object with llm, vit and vae sections")
    return config, where


def check_attention(args: argparse.Namespace) -> None:
    """Fail at start, with the extra to install, when the asked-for attention backend cannot run here."""
    from irg_core.attention import BackendUnavailable, make_backend

    try:
        make_backend(args.attention)
    except BackendUnavailable as e:
        raise CommandError(f"--attention {args.attention}: {e}") from e


def open_engine(args: argparse.Namespace) -> Engine:
    import torch

    from irg_core.attention import BackendUnavailable
    from irg_core.config import BagelConfig
    from irg_core.engine import Engine
    from irg_core.loader import build_dummy, load_model
    from irg_core.tokenizer import Tokenizer
    from weights.demo import ensure_demo

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {args.device}: no CUDA device is available")
    if args.dummy_weights is not None:
        try:
            config, where = read_config(args.dummy_weights)
        except OSError as e:
            raise CommandError(f"--dummy-weights {args.dummy_weights}: not readable ({e})") from e
        tokenizer = Tokenizer.from_dir(args.tokenizer_dir or ensure_demo())
        loaded = build_dummy(BagelConfig.from_dict(config, where), args.device, dtype, tokenizer=tokenizer)
    else:
        loaded = load_model(args.model_dir or ensure_demo(), args.device, dtype)
    try:
        engine = Engine(
            loaded,
            attention=args.attention,
            cuda_graphs=not getattr(args, "no_cuda_graphs", False),
            compile_decode=getattr(args, "compile", False),
        )
    except (BackendUnavailable, ValueError) as e:
        raise CommandError(str(e)) from e
    log_attention_kernels(engine)
    return engine


def log_attention_kernels(engine: Engine) -> None:
    """Say, once at start-up, which SDPA kernel each attention call shape reaches (probed on CUDA only)."""
    import logging

    log = logging.getLogger("weights")  # the start-up logger (see show_weights_log)
    for shape, choice in engine.attention_kernels.items():
        how = "key heads expanded" if choice.expand_kv else "grouped key heads"
        log.info("attention %s: %s (%s)", shape, choice.kernel.lower(), how)
