"""`irg bench`: time a trajectory stage by stage with fixed thought lengths, and print where the time goes."""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.cli.common import add_model_options, open_engine
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
    p.add_argument("--previews", type=int, default=0, metavar="N",
                   help="also time the trajectory with N previews per image (encoded as the server sends them) "
                        "against none, interleaved in this run, and print the cost")
    p.add_argument("--preview-decoder", choices=("fast", "vae"), default="fast")
    p.set_defaults(func=run)


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
    engine = open_engine(args)
    if not args.no_warmup:
        run_trajectory(engine, replace(params, steps=min(params.steps, 3), max_think_tokens=4), fixed_thoughts=True)
    results = [run_trajectory(engine, params, fixed_thoughts=True) for _ in range(max(1, args.repeats))]
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
    preview_cost = None
    if args.previews > 0:
        preview_cost = measure_previews(engine, params, args.previews, args.preview_decoder, max(1, args.repeats))
        print(format_preview_cost(preview_cost))
    comparison = None
    if params.cache is not None:  # the same trajectory exact, measured in the same run
        exact = [run_trajectory(engine, replace(params, cache=None), fixed_thoughts=True)
                 for _ in range(max(1, args.repeats))]
        comparison = cache_comparison(best, min(exact, key=lambda r: r.total_seconds))
        print(format_cache_comparison(comparison, params.cache.method))
    if args.json:
        record = {"params": params.to_dict(), "device": str(engine.device), "machine": platform.machine(),
                  "torch": torch.__version__, "stages": rows, "total_seconds": best.total_seconds,
                  "all_totals": [r.total_seconds for r in results], "peak_memory_bytes": best.peak_memory_bytes,
                  "config": cfg.to_dict(), "cache_comparison": comparison, "preview_cost": preview_cost}
        args.json.write_text(json.dumps(record, indent=2), "utf-8")
    return 0


def _image_totals(result: Any) -> dict[str, float]:
    images = [s for s in result.stages if s.stage == "image"]
    return {"seconds": sum(s.seconds for s in images), "steps": sum(s.steps for s in images),
            "model_evaluations": sum(s.model_evaluations for s in images),
            "branch_evaluations": sum(s.branch_evaluations for s in images)}


def cache_comparison(cached: Any, exact: Any) -> dict[str, Any]:
    """The cached run beside the exact one: denoising and total time, model evaluations, speed-ups."""
    c, e = _image_totals(cached), _image_totals(exact)
    return {"cached": dict(c, total_seconds=cached.total_seconds), "exact": dict(e, total_seconds=exact.total_seconds),
            "denoising_speedup": e["seconds"] / c["seconds"] if c["seconds"] else None,
            "total_speedup": exact.total_seconds / cached.total_seconds if cached.total_seconds else None}


def format_cache_comparison(cmp: dict[str, Any], method: str) -> str:
    c, e = cmp["cached"], cmp["exact"]
    lines = [f"step cache {method} vs exact (same trajectory, this run):",
             f"  denoising  {c['seconds']:9.3f} s vs {e['seconds']:9.3f} s  -> {cmp['denoising_speedup']:.2f}x",
             f"  total      {c['total_seconds']:9.3f} s vs {e['total_seconds']:9.3f} s  -> {cmp['total_speedup']:.2f}x",
             f"  model evaluations {c['model_evaluations']} of {e['model_evaluations']} steps "
             f"({100 * c['model_evaluations'] / max(1, e['model_evaluations']):.0f} %), "
             f"branch passes {c['branch_evaluations']} of {e['branch_evaluations']}"]
    return "\n".join(lines)


def measure_previews(engine: Any, params: Any, count: int, decoder: str, repeats: int) -> dict[str, Any]:
    """The same trajectory with and without previews, alternated (`repeats` pairs, best of each); previews are
    encoded (JPEG) as the server's publisher does, so the cost is the whole of it."""
    import time

    from irg_core.trajectory import run_trajectory
    from server.publish import encode_preview

    spent = [0.0]
    sent = [0]

    def sink(event: Any) -> None:
        if event.type == "image.preview":
            start = time.perf_counter()
            encode_preview(event.image)
            spent[0] += time.perf_counter() - start
            sent[0] += 1

    with_p = replace(params, previews=count, preview_decoder=decoder)
    run_trajectory(engine, replace(with_p, steps=min(params.steps, 3), max_think_tokens=4), fixed_thoughts=True)
    on, off = [], []
    for _ in range(repeats):
        off.append(run_trajectory(engine, params, fixed_thoughts=True).total_seconds)
        spent[0], sent[0] = 0.0, 0
        on.append(run_trajectory(engine, with_p, on_event=sink, fixed_thoughts=True).total_seconds)
    best_on, best_off = min(on), min(off)
    # the direct cost, immune to a busy machine's noise: drawing one preview (x0 -> picture) times the count
    import torch

    d = engine.cfg.latent_downsample
    x0 = torch.randn((params.width // d) * (params.height // d), engine.cfg.patch_latent_dim).to(engine.device)
    start = time.perf_counter()
    for _ in range(10):
        engine.preview(x0, params.width, params.height, decoder)
    draw_s = (time.perf_counter() - start) / 10
    direct = sent[0] * draw_s + spent[0]
    return {"previews_per_image": count, "decoder": decoder, "previews_sent": sent[0],
            "with_seconds": best_on, "without_seconds": best_off, "encode_seconds": spent[0],
            "draw_seconds_each": draw_s, "direct_seconds": direct,
            "direct_percent": 100 * direct / best_off if best_off else None,
            "cost_percent": 100 * (best_on - best_off) / best_off if best_off else None,
            "all_with": on, "all_without": off}


def format_preview_cost(c: dict[str, Any]) -> str:
    return "\n".join([
        f"previews ({c['decoder']}, {c['previews_per_image']} per image, {c['previews_sent']} sent), target <= 5 %:",
        f"  whole runs  {c['with_seconds']:9.3f} s with vs {c['without_seconds']:9.3f} s without -> "
        f"{c['cost_percent']:+.1f} %",
        f"  direct      {c['previews_sent']} x {1000 * c['draw_seconds_each']:.2f} ms drawing + "
        f"{1000 * c['encode_seconds']:.1f} ms JPEG = {1000 * c['direct_seconds']:.1f} ms -> "
        f"{c['direct_percent']:.2f} % of the run without"])
