"""`irg understand --image IN.png [--image ...] QUESTION`: answer a question about images on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from irg_core.params import UnderstandingParams
from server.cli.common import add_model_options, open_engine
from server.cli.generate import read_image


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("understand", help="answer a question about one or more images; writes answer.json")
    p.add_argument("question")
    p.add_argument(
        "--image",
        type=Path,
        action="append",
        required=True,
        metavar="IN.png",
        help="an input image (PNG, JPEG or WebP); repeat for several, in order",
    )
    add_model_options(p)
    p.add_argument("--max-tokens", type=int, default=512, help="answer tokens at most (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--think", action="store_true", help="put BAGEL's VLM_THINK_SYSTEM_PROMPT first (official think)")
    p.add_argument(
        "--save-logits",
        action="store_true",
        help="also write logits0.safetensors (the first step's full-vocabulary logits, float32)",
    )
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory (default: ./out)")
    p.add_argument("--quiet", action="store_true", help="do not stream the answer to stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from irg_core.recipes import run_understanding

    params = UnderstandingParams(args.question, args.max_tokens, args.temperature, args.seed, args.think)
    params.validate()
    images = [read_image(path) for path in args.image]
    engine = open_engine(args)

    def on_event(event) -> None:
        if not args.quiet and event.type == "answer.delta":
            sys.stdout.write(event.data["text"])
            sys.stdout.flush()

    result = run_understanding(engine, params, images, on_event=on_event, keep_logits=args.save_logits)
    if not args.quiet:
        sys.stdout.write("\n")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "question": params.question,
        "images": [str(p) for p in args.image],
        "think": params.think,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "seed": params.seed,
        "token_ids": result.token_ids,
        "text": result.text,
        "context": {"kv_length": result.context_length, "start_rope": result.context_rope},
        "total_seconds": result.total_seconds,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
    }
    (out / "answer.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), "utf-8")
    if args.save_logits and result.logits0 is not None:
        from safetensors.torch import save_file

        save_file({"logits0": result.logits0.contiguous()}, str(out / "logits0.safetensors"))
    return 0
