"""`irg serve` (being built)."""

from __future__ import annotations

import argparse

from server.cli.errors import CommandError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="(being built)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("irg serve is not built yet")
