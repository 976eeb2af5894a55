"""`irg worker` (being built)."""

from __future__ import annotations

import argparse

from server.cli.errors import CommandError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="(being built)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("irg worker is not built yet")
