"""The `irg` command: one sub-command per module, each imported lazily enough that `irg serve --redis`
(API only) never loads torch."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "server.cli.generate",
    "server.cli.understand",
    "server.cli.bench",
    "server.cli.serve",
    "server.cli.worker",
    "weights.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irg", description="IRG Server: interleaving reasoning generation on BAGEL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # expected failures carry a message that names the problem; no traceback
        from server.cli.errors import expected_error

        message = expected_error(e)
        if message is None:
            raise
        print(f"irg {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
