"""``deltatune demo``: the end-to-end LoRA demo that ``make demo`` runs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    from deltatune.demo import DemoSettings

    d = DemoSettings()
    p = subparsers.add_parser(
        "demo", help="fine-tune SmolLM2-135M with LoRA on WordNet definitions, before/after")
    p.add_argument("--out", default=d.output_dir, help=f"run directory (default {d.output_dir})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps ({d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"examples per step ({d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate ({d.lr})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank ({d.rank})")
    p.add_argument("--words", type=int, default=d.rouge_words,
                   help=f"held-out words scored by ROUGE-L ({d.rouge_words})")
    p.add_argument("--restart", action="store_true",
                   help="delete the run directory first instead of resuming an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the given settings; return 0."""
    from deltatune.demo import DemoSettings, run_demo

    run_demo(DemoSettings(output_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, rank=args.rank, rouge_words=args.words,
                          restart=args.restart, progress=not args.no_progress))
    return 0
