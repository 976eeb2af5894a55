"""GPU checks of the decode step (run by benchmarks/gpu_check.sh on a device; needs CUDA).

1. On the golden checkpoint in bfloat16: the CUDA-graph decode step gives the same greedy tokens as the eager one.
2. At full BAGEL-7B-MoT shapes (dummy weights): ms per decode token at batch 1 and batch 8, and the ratio of
   tokens per second (targets: <= 6 ms per token at batch 1, >= 6x the tokens per second at batch 8).
Prints a table and writes $OUT/decode.json. `--device cpu` with a small `--full` config runs the same flow on a
CPU (eager only: CUDA graphs exist on CUDA alone), which is how the test suite checks this script.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from irg_core.config import BagelConfig
from irg_core.engine import Engine
from irg_core.kv_cache import EMPTY
from irg_core.loader import build_dummy, load_model
from irg_core.steps import DecodeStep, Decoding
from irg_core.tokenizer import Tokenizer


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def greedy(engine: Engine, prompt: str, n: int) -> list[int]:
    ctx = engine.prefill_text(EMPTY, engine.tok.frame(prompt))
    return engine.decode(ctx, n, ignore_eos=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(engine: Engine, batch: int, tokens: int, context: int) -> float:
    """Seconds per decode step for `batch` sequences over contexts of `context` tokens."""
    ids = list(range(1000, 1000 + context))
    ctxs = [engine.prefill_text(EMPTY, ids) for _ in range(batch)]
    seqs = [Decoding(c, tokens + 8) for c in ctxs]
    for _ in range(4):  # warm-up (and graph capture)
        engine.run_decode([DecodeStep(s) for s in seqs])
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(tokens):
        engine.run_decode([DecodeStep(s) for s in seqs])
    sync(engine.device)
    per_step = (time.perf_counter() - start) / tokens
    for s in seqs:
        engine.free_decoding(s)
    for c in ctxs:
        engine.pool.free(c)
    return per_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("golden", type=Path, help="a golden directory (model/ and case.json)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--full", type=Path, default=Path("irg_core/data/bagel_7b_mot.json"), help="config to time")
    p.add_argument("--tokens", type=int, default=64, help="timed decode steps per batch size")
    p.add_argument("--context", type=int, default=512, help="context tokens of each timed sequence")
    p.add_argument("--kv-gb", type=float, default=8.0, help="KV cache of the timed engine")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    golden, out = args.golden, Path(os.environ.get("OUT", "/tmp/irg-out"))
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, object] = {}
    prompt = json.loads((golden / "case.json").read_text())["prompt"]
    loaded = load_model(golden / "model", device, torch.bfloat16)
    eager = greedy(Engine(loaded, cuda_graphs=False, kv_cache_bytes=2**28), prompt, 48)
    graphed_engine = Engine(loaded, cuda_graphs=True, kv_cache_bytes=2**28)
    graphed = greedy(graphed_engine, prompt, 48)
    record["graph_equals_eager"] = graphed == eager
    record["graphs_captured"] = graphed_engine.decoder.captured
    print(
        f"captured decode == eager (48 greedy tokens, golden, bf16): {graphed == eager} "
        f"({graphed_engine.decoder.captured} graph(s) captured)"
    )
    del loaded, graphed_engine
    empty_cache(device)

    cfg = BagelConfig.from_dict(json.loads(args.full.read_text()))
    full = build_dummy(cfg, device, torch.bfloat16, tokenizer=Tokenizer.from_dir(golden / "model"))
    record["config"] = args.full.name
    print(f"{'backend':<8} {'graphs':<6} {'batch':>5} {'ms/step':>8} {'tok/s':>8}")
    for graphs in (True, False) if device.type == "cuda" else (False,):  # graphs exist on CUDA only
        engine = Engine(full, cuda_graphs=graphs, kv_cache_bytes=int(args.kv_gb * 2**30))
        rates = {}
        for batch in (1, 8):
            per_step = time_decode(engine, batch, tokens=args.tokens, context=args.context)
            rates[batch] = batch / per_step
            record[f"decode_ms_batch{batch}_{'graph' if graphs else 'eager'}"] = 1000 * per_step
            print(f"{'sdpa':<8} {str(graphs):<6} {batch:>5} {1000 * per_step:>8.2f} {batch / per_step:>8.1f}")
        record[f"batch8_speedup_{'graph' if graphs else 'eager'}"] = rates[8] / rates[1]
        del engine
        empty_cache(device)
    (out / "decode.json").write_text(json.dumps(record, indent=2))
    captured_ok = record["graphs_captured"] > 0 or device.type != "cuda"  # type: ignore[operator]
    return 0 if record["graph_equals_eager"] and captured_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
