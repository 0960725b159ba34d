"""``deltatune merge``: fold a saved delta into its base model and save a plain model."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``merge`` subcommand."""
    p = subparsers.add_parser(
        "merge", help="merge a delta into its base model and save the result (safetensors)")
    p.add_argument("--model", required=True, help="base model: built-in name or local directory")
    p.add_argument("--delta", required=True, help="delta directory to merge")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--task", default="causal-lm", help="model head (causal-lm, "
                   "sequence-classification, ...); default causal-lm")
    p.add_argument("--check-base", default="strict", choices=["strict", "shapes", "off"],
                   help="how strictly the base model must match the delta's fingerprint")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load, merge, and save the merged model with its tokenizer; return 0."""
    from deltatune import models
    from deltatune.core.model import DeltaModel

    model, tokenizer = models.load(args.model, task=args.task)
    dm = DeltaModel(model)
    name = dm.load_delta(args.delta, check_base=args.check_base)
    merged = dm.merge_and_unload(name)
    out = Path(args.out)
    merged.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    print(f"merged delta {name!r} from {args.delta} into {args.model}; saved to {out}")
    return 0
