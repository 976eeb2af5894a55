"""`irg weights ...`: init-demo, download and verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "bagel-7b-mot"


def register(sub: argparse._SubParsersAction) -> None:
    from weights.fetch import known_models

    p = sub.add_parser("weights", help="create, download or verify model directories")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    demo = wsub.add_parser("init-demo", help="write the tiny random demo checkpoint (official layout)")
    demo.add_argument("dir", type=Path, help="directory to create")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_init_demo)

    dl = wsub.add_parser(
        "download",
        help="download a known model's files from the Hugging Face Hub, then verify",
        description="Download only the files the engine reads (resumable: run it again after "
        "an interruption), then run `irg weights verify DIR`. Honours HF_TOKEN, "
        "HF_ENDPOINT (a mirror) and HF_HUB_OFFLINE.",
    )
    dl.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        choices=sorted(known_models()),
        help=f"which model (default: {DEFAULT_MODEL})",
    )
    dl.add_argument("dir", type=Path, help="model directory to fill (created if needed)")
    dl.add_argument("--revision", help="branch, tag or commit (default: the manifest's)")
    dl.add_argument(
        "--repo",
        metavar="OWNER/NAME",
        help="download the same files from another repository (a copy or fine-tune in the same layout)",
    )
    dl.add_argument("--no-verify", action="store_true", help="skip the verification after the download")
    dl.set_defaults(func=_download, all=False)

    ver = wsub.add_parser(
        "verify",
        help="check configs, tokenizer and safetensors headers against the "
        "architecture (no tensor is loaded); exit code 0 when clean, 1 otherwise",
    )
    ver.add_argument("dir", type=Path, help="model directory in the official BAGEL layout")
    ver.add_argument("--all", action="store_true", help="list every problem (default: at most 20 per file)")
    ver.set_defaults(func=_verify)


def _init_demo(args: argparse.Namespace) -> int:
    from weights.demo import init_demo

    path = init_demo(args.dir, seed=args.seed)
    print(f"demo checkpoint written to {path}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from server.cli.errors import CommandError
    from weights.fetch import DownloadError, download, known_models

    entry = known_models()[args.model]
    try:
        commit = download(
            entry, args.dir, revision=args.revision, repo_id=args.repo, log=lambda line: print(line, file=sys.stderr)
        )
    except DownloadError as e:
        raise CommandError(str(e)) from None
    print(f"{args.model}: {args.repo or entry.repo_id}@{commit} is in {args.dir}")
    return 0 if args.no_verify else _verify(args)


def _verify(args: argparse.Namespace) -> int:
    from weights.verify import format_report, verify

    report = verify(args.dir)
    print(format_report(report, per_file=None if args.all else 20))
    return 0 if report.ok else 1
