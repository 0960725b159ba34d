"""``deltatune methods``: list the registered methods with their one-line summaries."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``methods`` subcommand."""
    p = subparsers.add_parser("methods", help="list the delta-tuning methods")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print each method with its flags (mergeable, identity at init)."""
    from deltatune.core.registry import get_method, known_methods

    for name in known_methods():
        method = get_method(name)
        flags = ", ".join(f for f, on in (("mergeable", method.mergeable),
                                          ("per-row", method.supports_per_row)) if on)
        print(f"{name:14s} {method.summary}" + (f"  [{flags}]" if flags else ""))
    return 0
