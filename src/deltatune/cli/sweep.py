"""``deltatune sweep``: the papers' ablations (LoRA rank/targets, prefix length, ...)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    from deltatune.cli.compare import add_budget_and_model_flags

    p = subparsers.add_parser("sweep", help="run one of the papers' ablations (see --list)",
                              description="Run an ablation as a set of variants; writes the "
                                          "comparison files plus sweep.png.")
    p.add_argument("name", nargs="?", help="sweep name (see --list)")
    p.add_argument("--list", action="store_true", help="list the sweeps and their claims")
    p.add_argument("--task", default=None, help="override the sweep's default task")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--out", default=None, help="output directory (default lab-runs/sweep-NAME)")
    p.add_argument("--full", action="store_true", help="the task's full (GPU) size")
    add_budget_and_model_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.add_argument("--only", default=None, help="comma-separated variant labels to run")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                   help="learning rate by method or variant label (repeatable), e.g. "
                        "--lr lora=5e-3")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """List the sweeps, or run one and print its table."""
    from deltatune.cli.compare import parse_lr, parse_seeds
    from deltatune.core.errors import ConfigError
    from deltatune.lab.sweeps import SWEEPS, missing_methods, run_sweep

    if args.list or not args.name:
        for sweep in SWEEPS.values():
            missing = missing_methods(sweep)
            state = f"  [needs {', '.join(missing)}: not available yet]" if missing else ""
            print(f"{sweep.name:20s} task {sweep.task:12s} {sweep.claim}{state}")
        if not args.list:
            raise ConfigError("name a sweep to run (listed above)", field="name")
        return 0
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    result = run_sweep(args.name, task=args.task, seeds=parse_seeds(args.seeds), out=args.out,
                       size="full" if args.full else "default", device=args.device, only=only,
                       lr=parse_lr(args.lr), steps=args.steps, model=args.model)
    print()
    print(result.table)
    print()
    for path in result.files:
        print(f"wrote {path}")
    return 1 if any(r["failed"] for r in result.summary) else 0
