#!/usr/bin/env python3
"""Ours beside the official code, stage by stage, from the JSON both benchmarks write in one device call.

    python3 benchmarks/compare_official.py OFFICIAL.json OURS_IRG.json [OURS_DIRECT.json]

OFFICIAL.json is what `../shared/bench/bench_official.py` writes (its `headline`, bare modules: `irg/none`,
`direct/none`); the others are `irg bench --json` at the same shapes (1024², 50 timesteps, 256-token thoughts).
Prints the table (official seconds, ours, speed-up) and the issue's targets. No torch needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Work of the denoising stages at the full BAGEL-7B-MoT shapes, 1024², 49 evaluations (../shared/bench/README.md:
# "round 1 ≈ 5.5 PFLOP, round 2 ≈ 10.5 PFLOP").
DENOISE_FLOP = {1: 5.5e15, 2: 10.5e15}
TARGETS = {"irg_s": 28.0, "direct_s": 8.0, "denoise_ceiling_share": 0.75, "peak_gib": 31.0}

# (label, official headline key, our stage, our round)
IRG_STAGES = [
    ("prefill", "prefill_system_prompt_s", "prefill", 0),
    ("thinking", "think1_decode_s", "thinking", 1),
    ("image 1 (denoising)", "image1_denoise_s", "image", 1),
    ("VAE decode 1", "vae_decode1_s", "decode", 1),
    ("re-encode (VAE + ViT)", "reencode_vae_vit_s", "reencode", 1),
    ("reflection", "think2_decode_s", "reflection", 2),
    ("image 2 (denoising)", "image2_denoise_s", "image", 2),
    ("VAE decode 2", "vae_decode2_s", "decode", 2),
]
DIRECT_STAGES = [
    ("prefill", "prefill_prompt_s", "prefill", 0),
    ("image (denoising)", "image_denoise_s", "image", 1),
    ("VAE decode", "vae_decode_s", "decode", 1),
]


def _ours(record: dict, stage: str, round_: int) -> float:
    return sum(s["seconds"] for s in record["stages"] if s["stage"] == stage and s["round"] == round_)


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["total_s"])


def table(official: dict, key: str, ours: dict, stages: list[tuple[str, str, str, int]]) -> list[str]:
    theirs = _best(official["headline"][key])
    lines = [f"{'stage':<24} {'official s':>11} {'ours s':>9} {'speed-up':>9}", "-" * 56]
    for label, their_key, stage, round_ in stages:
        a, b = theirs.get(their_key), _ours(ours, stage, round_)
        ratio = f"{a / b:.2f}x" if a and b else ""
        lines.append(f"{label:<24} {a if a is not None else float('nan'):>11.3f} {b:>9.3f} {ratio:>9}")
    a, b = theirs["total_s"], ours["total_seconds"]
    lines += ["-" * 56, f"{'total':<24} {a:>11.3f} {b:>9.3f} {a / b:>8.2f}x"]
    return lines


def targets(official: dict, irg: dict, direct: dict | None) -> list[str]:
    ceiling = official.get("ceilings", {}).get("matmul_tflops_median")
    lines = [f"IRG total: {irg['total_seconds']:.1f} s (target <= {TARGETS['irg_s']:.0f} s)"]
    if direct is not None:
        lines.append(f"one image: {direct['total_seconds']:.1f} s (target <= {TARGETS['direct_s']:.0f} s)")
    if ceiling:
        for r, flop in DENOISE_FLOP.items():
            seconds = _ours(irg, "image", r)
            if seconds:
                share, aim = flop / seconds / (ceiling * 1e12), 100 * TARGETS["denoise_ceiling_share"]
                lines.append(
                    f"denoising round {r}: {flop / seconds / 1e12:.0f} TFLOP/s = {100 * share:.0f} % of the measured "
                    f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s (target >= {aim:.0f} %)"
                )
    peak = max(r.get("peak_memory_bytes") or 0 for r in (irg, direct) if r is not None) / 2**30
    if peak:
        lines.append(f"peak memory: {peak:.1f} GiB (target <= {TARGETS['peak_gib']:.0f} GiB)")
    return lines


def shape_mismatches(official: dict, ours: dict) -> list[str]:
    """Where our run's shapes differ from the official run's (a comparison across shapes means nothing)."""
    a, p = official.get("args", {}), ours.get("params", {})
    pairs = [
        ("width", a.get("resolution"), p.get("width")),
        ("height", a.get("resolution"), p.get("height")),
        ("timesteps", a.get("timesteps"), p.get("steps")),
    ]
    if p.get("mode") == "irg":
        pairs.append(("thought tokens", a.get("think_tokens"), p.get("max_think_tokens")))
    return [f"{name}: official {x}, ours {y}" for name, x, y in pairs if x != y]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    official, irg = (json.loads(Path(p).read_text("utf-8")) for p in argv[:2])
    direct = json.loads(Path(argv[2]).read_text("utf-8")) if len(argv) == 3 else None
    bad = [m for r in (irg, direct) if r is not None for m in shape_mismatches(official, r)]
    if bad:
        print("the runs have different shapes, no comparison: " + "; ".join(bad), file=sys.stderr)
        return 1
    print("IRG trajectory (official: irg/none, bare modules)")
    print("\n".join(table(official, "irg/none", irg, IRG_STAGES)))
    if direct is not None:
        print("\nOne BAGEL image (official: direct/none)")
        print("\n".join(table(official, "direct/none", direct, DIRECT_STAGES)))
    print()
    print("\n".join(targets(official, irg, direct)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
