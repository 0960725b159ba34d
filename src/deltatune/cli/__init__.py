"""The ``deltatune`` command. Thin: every subcommand parses flags and calls the library.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``; adding one is a new module plus one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deltatune.core.errors import DeltaTuneError

# module name (in this package) of every subcommand, in --help order
COMMANDS = [
    "demo",
    "methods",
    "info",
    "train",
    "generate",
    "eval",
    "merge",
    "export",
    "compare",
    "sweep",
    "data",
    "models",
    "federate",
]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    from deltatune import __version__

    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning of pretrained transformers.",
    )
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"deltatune.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except DeltaTuneError as exc:
        print(f"deltatune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130
