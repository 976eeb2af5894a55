"""`irg bench`: time a trajectory stage by stage with fixed thought lengths, and print where the time goes.

`--concurrency N` also runs N trajectories one at a time and then N at once through the scheduler, in the same
run, and prints throughput (trajectories per minute, decode tokens per second), per-job latency and how full
the shared forwards were. `--count-ops` counts the aten operations of one decode token and one denoising step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="also run N trajectories one at a time and N at once, and compare throughput",
    )
    p.add_argument("--count-ops", action="store_true", help="count aten ops per decode token and denoising step")
    p.add_argument("--json", type=Path, help="also write the measurements to this file")
    p.add_argument(
        "--previews",
        type=int,
        default=0,
        metavar="N",
        help="also time the trajectory with N previews per image (encoded as the server sends them) "
        "against none, interleaved in this run, and print the cost",
    )
    p.add_argument("--preview-decoder", choices=("fast", "vae"), default="fast")
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
            say(
                f"{self.label}: image {data['round']} step {data['step']}/{data['steps']} at "
                f"{time.perf_counter() - self.start:.2f} s"
            )
        if event.type.endswith(".done"):
            stage = event.type.removesuffix(".done")
            what = f"{data['tokens']} tokens" if "tokens" in data else data.get("kind", "")
            say(
                f"{self.label}: {stage} {data.get('round', '')} done ({what}) at "
                f"{time.perf_counter() - self.start:.2f} s"
            )


def _rows(result: Any) -> list[dict[str, Any]]:
    rows = []
    for s in result.stages:
        rate = ""
        if s.tokens:
            rate = f"{s.tokens / s.seconds:.1f} tok/s, {1000 * s.seconds / s.tokens:.2f} ms/tok"
        elif s.steps:
            rate = f"{s.steps / s.seconds:.2f} steps/s, {s.seconds / s.steps:.3f} s/step"
        rows.append(
            {
                "stage": s.stage,
                "round": s.round,
                "seconds": s.seconds,
                "tokens": s.tokens,
                "steps": s.steps,
                "rate": rate,
            }
        )
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


class _Forwards:
    """What the scheduler reports after every forward: rows per kind, and the time spent in decode forwards."""

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}

    def __call__(self, kind: str, rows: int) -> None:
        self.rows.setdefault(kind, []).append(rows)


def run_batch(engine: Any, params: Any, n: int, at_once: bool) -> dict[str, Any]:
    """n trajectories (seeds params.seed .. + n - 1): all submitted at once, or one after the other."""
    from irg_core.programs import prepare
    from irg_core.scheduler import DONE, Scheduler

    forwards = _Forwards()
    s = Scheduler(engine, max_active=n if at_once else 1, on_forward=forwards)
    decode_seconds = 0.0
    original = engine.run_decode

    def timed_decode(steps):  # the host waits for each decode step's tokens, so wall time is device time
        nonlocal decode_seconds
        t0 = time.perf_counter()
        out = original(steps)
        decode_seconds += time.perf_counter() - t0
        return out

    engine.run_decode = timed_decode
    try:
        start = time.perf_counter()
        jobs = [
            s.submit(*prepare(engine, replace(params, seed=params.seed + i), fixed_thoughts=True)) for i in range(n)
        ]
        s.run(jobs)
        wall = time.perf_counter() - start
    finally:
        del engine.run_decode
    bad = [j for j in jobs if j.status != DONE]
    if bad:
        raise RuntimeError(f"a benchmark trajectory did not finish: {bad[0].status} ({bad[0].error})")
    latencies = sorted(j.finished - j.submitted for j in jobs)
    tokens = sum(r.tokens for j in jobs for r in j.result.stages)
    decode = forwards.rows.get("decode", [])
    denoise = forwards.rows.get("denoise", [])
    return {
        "jobs": n,
        "at_once": at_once,
        "wall_seconds": wall,
        "trajectories_per_minute": 60 * n / wall,
        "decode_tokens": tokens,
        "decode_seconds": decode_seconds,
        "decode_tokens_per_second": tokens / decode_seconds if decode_seconds else 0.0,
        "latency_p50": statistics.median(latencies),
        "latency_p95": latencies[min(n - 1, round(0.95 * (n - 1)))],
        "mean_decode_batch": sum(decode) / len(decode) if decode else 0.0,
        "mean_denoise_rows": sum(denoise) / len(denoise) if denoise else 0.0,
        "forwards": {k: len(v) for k, v in forwards.rows.items()},
    }


def count_ops(engine: Any, params: Any) -> dict[str, int]:
    """aten operations dispatched for one decode token (batch 1) and one packed denoising step."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from irg_core.kv_cache import EMPTY
    from irg_core.steps import DecodeStep, Decoding, DenoiseLoop, DenoiseStep

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    e = engine
    ctx = e.prefill_text(EMPTY, e.tok.frame(params.prompt))
    seq = Decoding(ctx, 8)
    try:
        e.run_decode([DecodeStep(seq)])  # warm: buffers allocated, key slots filled
        with Counter() as c:
            e.run_decode([DecodeStep(seq)])
        decode = c.n
    finally:
        e.free_decoding(seq)
    d = e.cfg.latent_downsample
    loop = DenoiseLoop([ctx, EMPTY, ctx], params.height // d, params.width // d)  # cond, no_text, no_img
    x = torch.randn(loop.tokens, e.cfg.patch_latent_dim, device=e.device, dtype=e.dtype)
    t = torch.tensor(0.5, device=e.device)
    try:
        e.run_denoise([DenoiseStep(loop, x, t, 3)])
        with Counter() as c:
            e.run_denoise([DenoiseStep(loop, x, t, 3)])
        denoise = c.n
    finally:
        e.free_loop(loop)
        e.pool.free(ctx)
    return {"ops_per_decode_token": decode, "ops_per_denoise_step": denoise}


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
    print(
        f"irg bench: mode {params.mode}, {params.width}x{params.height}, {params.steps} timesteps "
        f"({params.steps - 1} evaluations), "
        + (f"{params.max_think_tokens}-token thoughts, " if params.mode != "direct" else "")
        + f"best of {len(results)}"
    )
    print(
        f"model: hidden {cfg.llm.hidden_size} x {cfg.llm.num_hidden_layers} layers, device {engine.device}, "
        f"dtype {str(engine.dtype).removeprefix('torch.')}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, attention {engine.backend.name}"
        + (", CUDA-graph decode" if engine.decoder.cuda_graphs else "")
        + (", compiled decode" if engine.decoder.compiled else "")
    )
    print(format_table(rows, best.total_seconds, best.peak_memory_bytes))
    tokens = sum(r["tokens"] for r in rows)
    decode_s = sum(r["seconds"] for r in rows if r["tokens"])
    record: dict[str, Any] = {
        "params": params.to_dict(),
        "device": str(engine.device),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "stages": rows,
        "total_seconds": best.total_seconds,
        "all_totals": [r.total_seconds for r in results],
        "peak_memory_bytes": best.peak_memory_bytes,
        "config": cfg.to_dict(),
        "attention": engine.backend.name,
        "cuda_graphs": engine.decoder.cuda_graphs,
        "compiled_decode": engine.decoder.compiled,
        "trajectories_per_minute": 60.0 / best.total_seconds,
        "decode_tokens_per_second": tokens / decode_s if decode_s else 0.0,
    }
    if args.concurrency > 1:
        n = args.concurrency
        say(f"{n} trajectories one at a time")
        serial = run_batch(engine, params, n, at_once=False)
        say(f"{n} trajectories at once")
        batched = run_batch(engine, params, n, at_once=True)
        print(format_concurrency(serial, batched))
        record.update(
            concurrency=n,
            serial=serial,
            batched=batched,
            trajectories_per_minute=batched["trajectories_per_minute"],
            decode_tokens_per_second=batched["decode_tokens_per_second"],
            speedup_trajectories=batched["trajectories_per_minute"] / serial["trajectories_per_minute"],
            speedup_decode=batched["decode_tokens_per_second"] / serial["decode_tokens_per_second"],
        )
    if args.count_ops:
        ops = count_ops(engine, params)
        print(
            f"aten ops: {ops['ops_per_decode_token']} per decode token (batch 1, "
            f"{cfg.llm.num_hidden_layers} layers), {ops['ops_per_denoise_step']} per denoising step (3 branches)"
        )
        record.update(ops)
    if args.previews > 0:
        record["preview_cost"] = measure_previews(
            engine, params, args.previews, args.preview_decoder, max(1, args.repeats)
        )
        print(format_preview_cost(record["preview_cost"]))
    if params.cache is not None:  # the same trajectory exact, measured in the same run
        exact = [
            run_trajectory(engine, replace(params, cache=None), fixed_thoughts=True)
            for _ in range(max(1, args.repeats))
        ]
        record["cache_comparison"] = cache_comparison(best, min(exact, key=lambda r: r.total_seconds))
        print(format_cache_comparison(record["cache_comparison"], params.cache.method))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2), "utf-8")
    return 0


def format_concurrency(serial: dict[str, Any], batched: dict[str, Any]) -> str:
    n = batched["jobs"]
    lines = [
        f"\n{n} trajectories: one at a time vs at once",
        "-" * 64,
        f"{'':<28} {'one at a time':>15} {'at once':>12} {'ratio':>7}",
    ]
    for key, label, fmt in (
        ("trajectories_per_minute", "trajectories / minute", ".2f"),
        ("decode_tokens_per_second", "decode tokens / s", ".1f"),
        ("wall_seconds", "wall seconds", ".2f"),
        ("latency_p50", "job latency p50 (s)", ".2f"),
        ("latency_p95", "job latency p95 (s)", ".2f"),
        ("mean_decode_batch", "rows per decode forward", ".2f"),
        ("mean_denoise_rows", "rows per denoise forward", ".0f"),
    ):
        a, b = serial[key], batched[key]
        ratio = f"{b / a:.2f}x" if a else ""
        lines.append(f"{label:<28} {a:>15{fmt}} {b:>12{fmt}} {ratio:>7}")
    return "\n".join(lines)


def _image_totals(result: Any) -> dict[str, float]:
    images = [s for s in result.stages if s.stage == "image"]
    return {
        "seconds": sum(s.seconds for s in images),
        "steps": sum(s.steps for s in images),
        "model_evaluations": sum(s.model_evaluations for s in images),
        "branch_evaluations": sum(s.branch_evaluations for s in images),
    }


def cache_comparison(cached: Any, exact: Any) -> dict[str, Any]:
    """The cached run beside the exact one: denoising and total time, model evaluations, speed-ups."""
    c, e = _image_totals(cached), _image_totals(exact)
    return {
        "cached": dict(c, total_seconds=cached.total_seconds),
        "exact": dict(e, total_seconds=exact.total_seconds),
        "denoising_speedup": e["seconds"] / c["seconds"] if c["seconds"] else None,
        "total_speedup": exact.total_seconds / cached.total_seconds if cached.total_seconds else None,
    }


def format_cache_comparison(cmp: dict[str, Any], method: str) -> str:
    c, e = cmp["cached"], cmp["exact"]
    lines = [
        f"step cache {method} vs exact (same trajectory, this run):",
        f"  denoising  {c['seconds']:9.3f} s vs {e['seconds']:9.3f} s  -> {cmp['denoising_speedup']:.2f}x",
        f"  total      {c['total_seconds']:9.3f} s vs {e['total_seconds']:9.3f} s  -> {cmp['total_speedup']:.2f}x",
        f"  model evaluations {c['model_evaluations']} of {e['model_evaluations']} steps "
        f"({100 * c['model_evaluations'] / max(1, e['model_evaluations']):.0f} %), "
        f"branch passes {c['branch_evaluations']} of {e['branch_evaluations']}",
    ]
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
    return {
        "previews_per_image": count,
        "decoder": decoder,
        "previews_sent": sent[0],
        "with_seconds": best_on,
        "without_seconds": best_off,
        "encode_seconds": spent[0],
        "draw_seconds_each": draw_s,
        "direct_seconds": direct,
        "direct_percent": 100 * direct / best_off if best_off else None,
        "cost_percent": 100 * (best_on - best_off) / best_off if best_off else None,
        "all_with": on,
        "all_without": off,
    }


def format_preview_cost(c: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"previews ({c['decoder']}, {c['previews_per_image']} per image, {c['previews_sent']} sent), "
            "target <= 5 %:",
            f"  whole runs  {c['with_seconds']:9.3f} s with vs {c['without_seconds']:9.3f} s without -> "
            f"{c['cost_percent']:+.1f} %",
            f"  direct      {c['previews_sent']} x {1000 * c['draw_seconds_each']:.2f} ms drawing + "
            f"{1000 * c['encode_seconds']:.1f} ms JPEG = {1000 * c['direct_seconds']:.1f} ms -> "
            f"{c['direct_percent']:.2f} % of the run without",
        ]
    )
