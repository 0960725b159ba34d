"""``deltatune compare``: train several methods on one lab task and print the trade-offs."""

from __future__ import annotations

import argparse

from deltatune.core.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` subcommand."""
    p = subparsers.add_parser(
        "compare", help="train several methods on one task; table + results.json + CSV + PNG",
        description="Train each method with the same data, steps and seeds; print trainable "
                    "parameters, peak memory, throughput, latency, checkpoint size and the "
                    "task metric (mean ± std over seeds). Finished runs in --out are reused.")
    p.add_argument("--task", default="sentiment",
                   help="lab task: sentiment (MiniLM, Rotten Tomatoes), definitions "
                        "(SmolLM2, WordNet), term-spans (MiniLM, BIO spans in WordNet "
                        "examples) or sentiment-lm (SmolLM2, template + verbaliser)")
    p.add_argument("--methods", default="full,bitfit,lora",
                   help="comma-separated methods, e.g. full,bitfit,lora,ia3,houlsby; icl "
                        "(few-shot) and manual (the untrained template) on LM tasks")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--out", default="lab-runs/compare", help="output directory (resumable)")
    p.add_argument("--full", action="store_true",
                   help="the task's full size (for a GPU) instead of the quick default")
    add_budget_and_model_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="learning rate of one method (repeatable), e.g. --lr lora=5e-4")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--stop-on-error", action="store_true",
                   help="stop at the first failing run instead of recording it and going on")
    p.set_defaults(handler=run)


def add_budget_and_model_flags(p: argparse.ArgumentParser) -> None:
    """Add ``--steps`` and ``--model`` (shared by ``compare`` and ``sweep``)."""
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run instead of the size's (a longer or shorter "
                        "budget; part of the resume fingerprint)")
    p.add_argument("--model", default=None,
                   help="another model for the task: a built-in name (deltatune models list; "
                        "e.g. gemma3-270m for the causal-LM tasks) or a local model "
                        "directory with the head the task needs (default: the task's own)")


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0,1,2"`` into a list of ints (a clear error otherwise)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}",
                          field="seeds") from None
    if not seeds:
        raise ConfigError("--seeds is empty", field="seeds")
    return seeds


def parse_lr(items: list[str]) -> dict[str, float]:
    """Parse repeated ``METHOD=LR`` flags into a dict."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--lr takes METHOD=LR, e.g. lora=5e-4; got {item!r}", field="lr")
    return out


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print its table and the files written."""
    from deltatune.lab import compare

    result = compare(args.task, args.methods, seeds=parse_seeds(args.seeds), out=args.out,
                     size="full" if args.full else "default", device=args.device,
                     lr=parse_lr(args.lr), steps=args.steps, model=args.model,
                     plots_too=not args.no_plots, keep_going=not args.stop_on_error)
    print()
    print(result.table)
    print()
    for path in result.files:
        print(f"wrote {path}")
    failed = [r for r in result.summary if r["failed"]]
    return 1 if failed else 0
