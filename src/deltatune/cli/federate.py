"""``deltatune federate``: federated delta tuning on Flower, communication measured."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deltatune.core.errors import ConfigError

# Local AdamW learning rates of the real tasks per method: the lab's defaults for the same
# model (full fine-tuning 1e-4; LoRA and LoHa 1e-3). The toy task keeps one rate for all.
REAL_LR = {"full": 1e-4, "lora": 1e-3, "fedpara": 1e-3, "pfedpara": 1e-3}
TOY_LR = 3e-3
MODES = ("in-process", "process", "simulation", "deployment")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``federate`` subcommand."""
    p = subparsers.add_parser(
        "federate", help="FedAvg of full FT, LoRA, FedPara, pFedPara with Flower; bytes counted",
        description="Split a data set among N clients (IID or Dirichlet non-IID), run R rounds "
                    "of E local epochs + FedAvg of the travelling tensors through Flower's "
                    "client and strategy objects (in one process, as gRPC processes, in "
                    "Flower's simulation engine or on its deployment runtime: --mode), and "
                    "report per round the "
                    "accuracy (server and per client) and the bytes sent up and down "
                    "(serialised safetensors payloads). Tasks: sentiment (Rotten Tomatoes, "
                    "MiniLM-L6), tweets (3-class tweet sentiment, MiniLM-L6), toy (synthetic, "
                    "tiny random BERT). Sizes left out take the task's defaults. Resumes: "
                    "methods already in OUT/results.json with the same settings are reused.")
    p.add_argument("--task", default="sentiment", choices=["sentiment", "tweets", "toy"],
                   help="data set and model (default sentiment)")
    p.add_argument("--methods", default="full,lora,fedpara,pfedpara",
                   help="comma-separated: full, lora, fedpara, pfedpara")
    p.add_argument("--clients", type=int, default=None,
                   help="number of clients (sentiment/tweets 8, toy 4)")
    p.add_argument("--rounds", type=int, default=None,
                   help="federated rounds (sentiment/tweets 6, toy 3)")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--non-iid", type=float, default=None, metavar="ALPHA",
                   help="Dirichlet label-skew alpha (small = more skew); default IID")
    p.add_argument("--rank", type=int, default=4, help="rank r of LoRA / LoHa")
    p.add_argument("--lr", type=float, default=None,
                   help="local AdamW learning rate for every method (default: real tasks "
                        "full 1e-4, lora/fedpara/pfedpara 1e-3; toy 3e-3)")
    p.add_argument("--examples", type=int, default=None,
                   help="training examples in total (sentiment 480, tweets 600, toy 800)")
    p.add_argument("--test-examples", type=int, default=None,
                   help="server test examples (sentiment 160, tweets 180, toy 200)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (sentiment 32, tweets 40, toy 16)")
    p.add_argument("--batch-size", type=int, default=16, help="local batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, heads and order")
    p.add_argument("--mode", default="in-process", choices=MODES,
                   help="in-process: one Python loop calls Flower's client and strategy "
                        "objects (fastest); process: a Flower server and one process per "
                        "client over gRPC on localhost (Flower's legacy start functions); "
                        "simulation: Flower's simulation engine (needs Ray: pip install "
                        "'deltatune[simulation]'); deployment: Flower's deployment runtime "
                        "on localhost (a SuperLink, one SuperNode per client, flwr run). "
                        "All four give the same numbers for the same seeds")
    p.add_argument("--out", default="lab-runs/federate", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def _settings(args: argparse.Namespace) -> dict:
    from deltatune.federated.tasks import DEFAULTS

    d = DEFAULTS[args.task]
    not_settings = ("handler", "no_progress", "out", "mode")
    out = {k: v for k, v in vars(args).items() if k not in not_settings}
    for key in ("clients", "rounds", "examples", "test_examples", "max_length"):
        if out[key] is None:
            out[key] = getattr(d, key)
    return out


def _lr(args: argparse.Namespace, method: str) -> float:
    if args.lr is not None:
        return args.lr
    return TOY_LR if args.task == "toy" else REAL_LR[method]


def _federate(args: argparse.Namespace, task, settings: dict, method: str, out: Path,
              on_round) -> list:
    """Run one method's federation in the chosen mode; return its round records."""
    common = dict(clients=settings["clients"], rounds=settings["rounds"],
                  local_epochs=args.local_epochs, non_iid=args.non_iid, lr=_lr(args, method),
                  r=args.rank, batch_size=args.batch_size, seed=args.seed, on_round=on_round)
    sizes = dict(examples=settings["examples"], test_examples=settings["test_examples"],
                 max_length=settings["max_length"])
    if args.mode == "process":
        from deltatune.federated.process import federate_in_processes

        return federate_in_processes(method, args.task, out=out / "processes" / method,
                                     progress=not args.no_progress, **sizes, **common).records
    if args.mode == "simulation":
        from deltatune.federated.simulation import simulate

        return simulate(method, args.task, **sizes, **common).records
    if args.mode == "deployment":
        from deltatune.federated.deployment import federate_deployment

        return federate_deployment(method, args.task, out=out / "deployment" / method,
                                   progress=not args.no_progress, **sizes, **common).records
    from deltatune.federated.run import run_federated

    return run_federated(method, task.make_model, task.train, task.test,
                         progress=not args.no_progress, **common)[0]


def _reusable(out: Path, settings: dict) -> tuple[dict, dict[str, float]]:
    """Return the methods already finished in ``out/results.json`` under the same settings.

    Also returns their recorded wall-clock seconds. Anything else (no file, other
    settings, an unreadable file) means nothing is reused.
    """
    from deltatune.federated.run import RoundRecord

    path = out / "results.json"
    if not path.is_file():
        return {}, {}
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, {}
    keep = {k: v for k, v in settings.items() if k != "methods"}
    old = {k: v for k, v in body.get("settings", {}).items() if k in keep}
    if old != keep:
        return {}, {}
    done = {m: [RoundRecord(**r) for r in recs] for m, recs in body.get("methods", {}).items()
            if len(recs) == settings["rounds"]}
    seconds = {m: s["seconds"] for m, s in body.get("summary", {}).items()
               if m in done and "seconds" in s}
    return done, seconds


def run(args: argparse.Namespace) -> int:
    """Run each method, print the per-round table; write results.json and the PNG."""
    from deltatune.federated.payload import METHODS
    from deltatune.federated.report import format_table, plot_accuracy_vs_bytes, write_results
    from deltatune.federated.tasks import load_task

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}",
                          field="methods")
    settings = _settings(args)
    for flag in ("clients", "rounds", "local_epochs", "examples", "test_examples",
                 "max_length", "batch_size"):
        if settings[flag] < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1", field=flag)
    if args.mode == "simulation":
        from deltatune.federated.simulation import available

        if not available():
            raise ConfigError("--mode simulation needs Flower's simulation engine (Ray): "
                              "pip install 'deltatune[simulation]', or use --mode process",
                              field="mode")
    out = Path(args.out)
    # the four modes give the same numbers (tests/federated), so a finished method is
    # reused whichever mode made it: the mode is not part of the settings compared
    done, seconds = _reusable(out, settings)
    task = load_task(args.task, examples=settings["examples"],
                     test_examples=settings["test_examples"],
                     max_length=settings["max_length"], seed=args.seed)
    results = {}
    for method in methods:
        if method in done:
            print(f"{method}: reusing the finished run in {out / 'results.json'}")
            results[method] = done[method]
            continue
        start = time.perf_counter()

        def save_progress(so_far, method=method):
            # an unfinished method is saved too (not reused on resume: too few rounds)
            write_results({**results, method: so_far}, settings, out, seconds=seconds,
                          lrs={m: _lr(args, m) for m in [*results, method]})

        records = _federate(args, task, settings, method, out, save_progress)
        seconds[method] = time.perf_counter() - start
        results[method] = records
        # written after every method, so an interrupted comparison resumes from here
        write_results(results, settings, out, seconds=seconds,
                      lrs={m: _lr(args, m) for m in results})
    print()
    print(task.description)
    print(format_table(results))
    print()
    path = write_results(results, settings, out, seconds=seconds,
                         lrs={m: _lr(args, m) for m in results})
    print(f"wrote {path}")
    print(f"wrote {plot_accuracy_vs_bytes(results, out)}")
    return 0
