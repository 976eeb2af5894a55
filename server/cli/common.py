"""Options shared by the commands that run the engine: which model, which device."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli.errors import CommandError

if TYPE_CHECKING:
    from irg_core.engine import Engine

DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("sdpa", "varlen", "flash", "xformers")  # irg_core.attention.BACKENDS (no torch import here)


def add_model_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, help="model directory in the official BAGEL layout "
                     "(default: the embedded demo checkpoint)")
    src.add_argument("--dummy-weights", type=Path, metavar="CONFIG.json",
                     help="random weights for this architecture config (e.g. irg_core/data/bagel_7b_mot.json)")
    p.add_argument("--tokenizer-dir", type=Path, help="tokenizer files for --dummy-weights (default: the demo's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attention", choices=BACKENDS, default=os.environ.get("IRG_ATTENTION", "sdpa"),
                   help="attention backend (default: $IRG_ATTENTION or sdpa; flash and xformers need their extras)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly on CUDA")


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
            config = json.loads(args.dummy_weights.read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CommandError(f"--dummy-weights {args.dummy_weights}: not a readable JSON config ({e})") from e
        tokenizer = Tokenizer.from_dir(args.tokenizer_dir or ensure_demo())
        loaded = build_dummy(BagelConfig.from_dict(config, str(args.dummy_weights)), args.device, dtype,
                             tokenizer=tokenizer)
    else:
        loaded = load_model(args.model_dir or ensure_demo(), args.device, dtype)
    try:
        return Engine(loaded, attention=args.attention, cuda_graphs=not getattr(args, "no_cuda_graphs", False))
    except (BackendUnavailable, ValueError) as e:
        raise CommandError(str(e)) from e
