"""``deltatune federate``: federated delta tuning on Flower, communication measured."""

from __future__ import annotations

import argparse
from pathlib import Path

from deltatune.core.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``federate`` subcommand."""
    p = subparsers.add_parser(
        "federate", help="FedAvg of full FT, LoRA, FedPara, pFedPara with Flower; bytes counted",
        description="Split a data set among N clients (IID or Dirichlet non-IID), run R rounds "
                    "of E local epochs + FedAvg of the travelling tensors through Flower's "
                    "client and strategy objects (in-process), and report per round the "
                    "accuracy and the bytes sent up and down (serialised safetensors "
                    "payloads). Data: a synthetic 3-class token task on a tiny random BERT.")
    p.add_argument("--methods", default="full,lora,fedpara,pfedpara",
                   help="comma-separated: full, lora, fedpara, pfedpara")
    p.add_argument("--clients", type=int, default=4, help="number of clients")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--non-iid", type=float, default=None, metavar="ALPHA",
                   help="Dirichlet label-skew alpha (small = more skew); default IID")
    p.add_argument("--rank", type=int, default=4, help="rank r of LoRA / LoHa")
    p.add_argument("--lr", type=float, default=3e-3, help="local AdamW learning rate")
    p.add_argument("--examples", type=int, default=800, help="training examples in total")
    p.add_argument("--seed", type=int, default=0, help="seed of data, split and models")
    p.add_argument("--out", default="lab-runs/federate", help="output directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run each method, print the per-round table; write results.json and the PNG."""
    from deltatune.federated.payload import METHODS
    from deltatune.federated.report import format_table, plot_accuracy_vs_bytes, write_results
    from deltatune.federated.run import run_federated, toy_model, toy_task

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}",
                          field="methods")
    for flag in ("clients", "rounds", "local_epochs", "examples"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1", field=flag)
    train = toy_task(args.examples, seed=args.seed)
    test = toy_task(max(200, args.examples // 4), seed=args.seed + 1000)
    results = {}
    for method in methods:
        records, _ = run_federated(
            method, lambda: toy_model(args.seed), train, test, clients=args.clients,
            rounds=args.rounds, local_epochs=args.local_epochs, non_iid=args.non_iid,
            lr=args.lr, r=args.rank, seed=args.seed, progress=True)
        results[method] = records
    print()
    print(format_table(results))
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k != "handler"}
    print()
    print(f"wrote {write_results(results, settings, out)}")
    print(f"wrote {plot_accuracy_vs_bytes(results, out)}")
    return 0
