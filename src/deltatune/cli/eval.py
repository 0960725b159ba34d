"""``deltatune eval``: metrics of a model (with or without a delta) on a data file.

``--forgetting GENERAL_FILE`` also reports the perplexity on general text (rows with
``text``) of the base model (before tuning) and with the delta (after): the
forgetting guard's measure. A positive change means the delta forgot some general
language modelling.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", help="evaluate a model / delta on data (and forgetting)")
    p.add_argument("--model", required=True, help="built-in model name or local directory")
    p.add_argument("--delta", help="delta directory (omit for the base model)")
    p.add_argument("--data", help="evaluation file (.jsonl, .csv, .parquet, dataset dir)")
    p.add_argument("--task", default="causal-lm-sft", help="causal-lm-sft or causal-lm")
    p.add_argument("--column", action="append", metavar="OLD=NEW", help="rename a column")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--generate-examples", type=int, help="examples to generate for (ROUGE-L)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--base-too", action="store_true",
                   help="also evaluate the base model (delta disabled) on --data")
    p.add_argument("--forgetting", metavar="GENERAL_FILE",
                   help="perplexity on general text before (base) and after (with the delta)")
    p.add_argument("--check-base", default="strict", choices=["strict", "shapes", "off"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def forgetting(model: Any, tokenizer: Any, rows: Any, *, max_length: int = 512,
               batch_size: int = 8) -> dict[str, float]:
    """Perplexity on general text with the delta disabled (before) and enabled (after).

    ``model`` is a DeltaModel. Returns ``before``, ``after``, ``change`` (after - before)
    and ``relative_change`` ((after - before) / before).
    """
    from deltatune.tasks import LanguageModeling

    lm = LanguageModeling(tokenizer, max_length=max_length)
    examples = lm.encode_rows(rows, "general text")
    model.eval()
    with model.disabled():
        before = lm.evaluate(model, examples, batch_size=batch_size)["perplexity"]
    after = lm.evaluate(model, examples, batch_size=batch_size)["perplexity"]
    return {"before": before, "after": after, "change": after - before,
            "relative_change": (after - before) / before}


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics; return 0."""
    from deltatune import data, models
    from deltatune.core.errors import ConfigError
    from deltatune.core.model import DeltaModel
    from deltatune.tasks import TASKS

    if not args.data and not args.forgetting:
        raise ConfigError("nothing to evaluate: pass --data FILE and/or --forgetting FILE",
                          field="data")
    if args.forgetting and not args.delta:
        raise ConfigError("--forgetting compares the base with the delta: pass --delta DIR",
                          field="delta")
    if args.task not in TASKS:
        raise ConfigError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}",
                          field="task")
    columns = dict(c.split("=", 1) for c in args.column or [])
    rows = data.read(args.data, columns=columns or None) if args.data else None
    general = data.read(args.forgetting) if args.forgetting else None
    model, tokenizer = models.load(args.model, task="causal-lm")
    opts: dict[str, Any] = {"max_length": args.max_length}
    if args.task == "causal-lm-sft":
        opts.update(max_new_tokens=args.max_new_tokens, generate_examples=args.generate_examples,
                    max_truncated=1.0)
    task = TASKS[args.task](tokenizer, model=model, **opts)
    dm = DeltaModel(model)
    if args.delta:
        dm.load_delta(args.delta, check_base=args.check_base)
    dm.eval()
    report: dict[str, Any] = {}
    if rows is not None:
        examples = task.encode_rows(rows, args.data)
        report["with_delta" if args.delta else "base"] = task.evaluate(
            dm, examples, batch_size=args.batch_size, progress=True)
        if args.base_too and args.delta:
            with dm.disabled():
                report["base"] = task.evaluate(dm, examples, batch_size=args.batch_size,
                                               progress=True)
    if general is not None:
        report["forgetting"] = forgetting(dm, tokenizer, general, max_length=args.max_length,
                                          batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for section, values in report.items():
            print(f"{section}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return 0
