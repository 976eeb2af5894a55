"""`irg bench`: time a trajectory stage by stage with fixed thought lengths, and print where the time goes."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.cli.common import add_model_options, open_engine, show_weights_log
from server.cli.generate import add_generation_options, params_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time a trajectory per stage (seconds, tokens/s, steps/s, peak memory)")
    add_model_options(p)
    add_generation_options(p)
    p.set_defaults(max_think_tokens=256, seed=0)
    p.add_argument("--prompt", default="A red fox in fresh snow at dawn, photographed with a telephoto lens.")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up run")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--json", type=Path, help="also write the measurements to this file")
    p.set_defaults(func=run)


def say(message: str) -> None:
    """Progress on stderr, as it happens (the table goes to stdout at the end)."""
    print(f"irg bench: {message}", file=sys.stderr, flush=True)


class StageLog:
    """Says when each stage of a timed run ends (thought, image), each quarter of an image's denoising steps, and
    how far into the run."""

    def __init__(self, label: str):
        self.label, self.start = label, time.perf_counter()

    def __call__(self, event: Any) -> None:
        data = event.data
        quarter = max(1, data.get("steps", 0) // 4)
        if event.type == "image.progress" and data["step"] < data["steps"] and data["step"] % quarter == 0:
            say(f"{self.label}: image {data['round']} step {data['step']}/{data['steps']} at "
                f"{time.perf_counter() - self.start:.2f} s")
        if event.type.endswith(".done"):
            stage = event.type.removesuffix(".done")
            what = f"{data['tokens']} tokens" if "tokens" in data else data.get("kind", "")
            say(f"{self.label}: {stage} {data.get('round', '')} done ({what}) at "
                f"{time.perf_counter() - self.start:.2f} s")


def _rows(result: Any) -> list[dict[str, Any]]:
    rows = []
    for s in result.stages:
        rate = ""
        if s.tokens:
            rate = f"{s.tokens / s.seconds:.1f} tok/s, {1000 * s.seconds / s.tokens:.2f} ms/tok"
        elif s.steps:
            rate = f"{s.steps / s.seconds:.2f} steps/s, {s.seconds / s.steps:.3f} s/step"
        rows.append({"stage": s.stage, "round": s.round, "seconds": s.seconds, "tokens": s.tokens,
                     "steps": s.steps, "rate": rate})
    return rows


def format_table(rows: list[dict[str, Any]], total: float, peak: int) -> str:
    lines = [f"{'stage':<12} {'round':>5} {'seconds':>9} {'share':>6}  rate", "-" * 64]
    for r in rows:
        share = 100 * r["seconds"] / total if total else 0.0
        lines.append(f"{r['stage']:<12} {r['round']:>5} {r['seconds']:>9.3f} {share:>5.1f}%  {r['rate']}")
    lines.append("-" * 64)
    lines.append(f"{'total':<12} {'':>5} {total:>9.3f} {100.0:>5.1f}%")
    lines.append(f"peak accelerator memory: {peak / 2**30:.2f} GiB" if peak else "peak accelerator memory: n/a (CPU)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from irg_core.trajectory import run_trajectory

    params = params_from_args(args)
    show_weights_log()
    say("loading the model")
    engine = open_engine(args)
    if not args.no_warmup:
        say("warm-up run (3 steps, 4-token thoughts)")
        run_trajectory(engine, replace(params, steps=min(params.steps, 3), max_think_tokens=4), fixed_thoughts=True)
    repeats = max(1, args.repeats)
    results = []
    for i in range(repeats):
        label = f"run {i + 1}/{repeats}"
        say(f"{label}: {params.mode}, {params.width}x{params.height}, {params.steps} steps")
        results.append(run_trajectory(engine, params, on_event=StageLog(label), fixed_thoughts=True))
        say(f"{label}: {results[-1].total_seconds:.2f} s")
    best = min(results, key=lambda r: r.total_seconds)
    rows = _rows(best)
    cfg = engine.cfg
    print(f"irg bench: mode {params.mode}, {params.width}x{params.height}, {params.steps} timesteps "
          f"({params.steps - 1} evaluations), {params.max_think_tokens}-token thoughts, "
          f"best of {len(results)}")
    print(f"model: hidden {cfg.llm.hidden_size} x {cfg.llm.num_hidden_layers} layers, device {engine.device}, "
          f"dtype {str(engine.dtype).removeprefix('torch.')}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(format_table(rows, best.total_seconds, best.peak_memory_bytes))
    if args.json:
        record = {"params": params.to_dict(), "device": str(engine.device), "machine": platform.machine(),
                  "torch": torch.__version__, "stages": rows, "total_seconds": best.total_seconds,
                  "all_totals": [r.total_seconds for r in results], "peak_memory_bytes": best.peak_memory_bytes,
                  "config": cfg.to_dict()}
        args.json.write_text(json.dumps(record, indent=2), "utf-8")
    return 0
