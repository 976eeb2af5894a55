"""The `irg bench` lines of benchmarks/gpu_check.sh parse with the real command-line parser: a GPU call is rare
and short, and must not be spent on a typo."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bench_lines() -> list[list[str]]:
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    fulls = re.findall(r'full="([^"]+)"', text)
    assert len(fulls) == 2  # the engine part and the official part
    out = []
    for line in text.splitlines():
        if "server.cli bench" not in line:
            continue
        cmd = line.split("server.cli", 1)[1].split("2>&1")[0]
        for full in fulls:
            args = cmd.replace("$full", full)
            for var, value in (("$c", ".carry_official"), ("$attn", "varlen"), ("$n", "4"), ("$OUT", "/tmp/out")):
                args = args.replace(var, value)
            out.append(shlex.split(args))
    return out


def test_every_bench_line_of_the_gpu_check_parses() -> None:
    from server.cli import build_parser

    lines = bench_lines()
    assert len(lines) >= 2 * 5
    parser = build_parser()
    for args in lines:
        ns = parser.parse_args(args)
        assert ns.device == "cuda" and ns.dummy_weights is not None, args
