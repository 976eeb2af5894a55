"""`irg weights ...`: init-demo (download and verify are added alongside)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="create, download or verify model directories")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    demo = wsub.add_parser("init-demo", help="write the tiny random demo checkpoint (official layout)")
    demo.add_argument("dir", type=Path, help="directory to create")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_init_demo)


def _init_demo(args: argparse.Namespace) -> int:
    from weights.demo import init_demo

    path = init_demo(args.dir, seed=args.seed)
    print(f"demo checkpoint written to {path}")
    return 0
