"""``deltatune eval``: metrics of a model (with or without a delta) on a data file, any task.

    deltatune eval --model smollm2-135m-instruct --delta runs/x/adapter --data val.jsonl
    deltatune eval --model minilm-l6 --delta runs/sent/adapter --data test.jsonl \\
        --task sequence-classification
    deltatune eval --model smollm2-135m-instruct --delta runs/x/adapter \\
        --forgetting general.jsonl

The task and its options (labels, verbaliser, max length, ...) default to those of the
run file ``deltatune train`` wrote next to the delta (``runs/x/run.yaml`` for
``runs/x/adapter`` or ``runs/x/best``); flags override them; without a run file the task
is causal-lm-sft. Metrics per task: causal-lm-sft loss, perplexity, ROUGE-L;
causal-lm loss, perplexity; sequence-classification loss, accuracy, macro-F1;
token-classification loss, word accuracy, span F1; seq2seq loss, perplexity, ROUGE-L,
BLEU, exact match; multiple-choice loss, accuracy (rank classification).

``--forgetting GENERAL_FILE`` also reports the perplexity on general text (rows with
``text``) of the base model (before tuning) and with the delta (after): the
forgetting guard's measure. A positive change means the delta forgot some general
language modelling.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# eval flags that set a task option (None = not given)
TASK_FLAGS = ("max_length", "max_new_tokens", "generate_examples", "labels", "template",
              "loss", "max_target_length", "chat_template", "system_prompt", "fast_generate")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    from deltatune.cli.train import _comma_list, _yaml_value

    p = subparsers.add_parser(
        "eval", help="evaluate a model / delta on data for any task (and forgetting)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="built-in model name or local directory")
    p.add_argument("--delta", help="delta directory (omit for the base model)")
    p.add_argument("--data", help="evaluation file (.jsonl, .csv, .parquet, dataset dir) or a "
                   "built-in data set name (its --split)")
    p.add_argument("--split", default="validation", help="split of a built-in data set "
                   "(default validation)")
    p.add_argument("--task", help="causal-lm-sft, causal-lm, sequence-classification, "
                   "token-classification, seq2seq or multiple-choice (default: the run "
                   "file's next to --delta, else causal-lm-sft)")
    p.add_argument("--column", action="append", metavar="OLD=NEW",
                   help="rename a column of the data to the name the task expects")
    p.add_argument("--max-length", type=int, help="tokens per example")
    p.add_argument("--max-new-tokens", type=int, help="generation length (SFT, seq2seq)")
    p.add_argument("--generate-examples", type=int,
                   help="examples to generate for (ROUGE-L etc.; default all, 0 = none)")
    p.add_argument("--labels", type=_comma_list, metavar="A,B,...",
                   help="class names in head order (default: the run file's, else the sorted "
                        "labels of --data)")
    p.add_argument("--verbalizer", action="append", metavar="LABEL=WORD",
                   help="sequence classification through a causal LM (repeatable)")
    p.add_argument("--template", help="verbaliser prompt with {text}")
    p.add_argument("--loss", help="multiple choice: t-few or lm")
    p.add_argument("--max-target-length", type=int, help="seq2seq target tokens")
    p.add_argument("--chat-template", type=_yaml_value, metavar="true|false",
                   help="SFT: use the tokenizer's chat template (default: when it has one)")
    p.add_argument("--system-prompt", help="SFT: system message before every prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fast-generate", action="store_true", default=None,
                   help="SFT: generate (ROUGE-L) with a static KV cache, each step a CUDA "
                        "graph on a GPU (the same greedy tokens)")
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


def task_settings(args: argparse.Namespace) -> tuple[str, dict[str, Any], str | None]:
    """The task name and options: the run file's next to the delta, then the flags.

    Returns (task name, options, the run file used or None).
    """
    from deltatune.cli import task_setup
    from deltatune.cli.train import parse_verbalizer
    from deltatune.train.runfile import load_run_file

    near = task_setup.run_file_near(args.delta)
    saved = load_run_file(near) if near is not None else {}
    name = args.task or saved.get("task") or task_setup.DEFAULT_TASK
    task_setup.task_class(name)  # an unknown name fails here, before any loading
    opts: dict[str, Any] = dict(saved.get("task_options") or {}) if \
        saved.get("task", task_setup.DEFAULT_TASK) == name else {}
    for key in TASK_FLAGS:
        if getattr(args, key, None) is not None:
            opts[key] = getattr(args, key)
    if args.verbalizer:
        opts["verbalizer"] = parse_verbalizer(args.verbalizer)
    if name == "causal-lm-sft":
        opts["max_truncated"] = 1.0  # evaluation keeps every example, cut or not
    return name, task_setup.check_options(name, opts), str(near) if near else None


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics; return 0."""
    from deltatune import data
    from deltatune.cli import task_setup
    from deltatune.core.errors import ConfigError
    from deltatune.core.model import DeltaModel

    if not args.data and not args.forgetting:
        raise ConfigError("nothing to evaluate: pass --data FILE and/or --forgetting FILE",
                          field="data")
    if args.forgetting and not args.delta:
        raise ConfigError("--forgetting compares the base with the delta: pass --delta DIR",
                          field="delta")
    name, opts, run_file = task_settings(args)
    if args.forgetting and task_setup.model_task(name, opts) != "causal-lm":
        raise ConfigError(f"--forgetting measures language-model perplexity; task {name!r} "
                          f"does not load a causal LM", field="forgetting")
    columns = dict(c.split("=", 1) for c in args.column or [])
    rows = None
    if args.data:
        rows = data.read(args.data, columns=columns or None, split=args.split)
        task_setup.check_columns(name, opts, rows)
        labels = task_setup.label_set(name, opts, rows)
        if labels is not None:
            opts["labels"] = labels
    general = data.read(args.forgetting) if args.forgetting else None
    model, tokenizer = task_setup.load_model(args.model, name, opts)
    task = task_setup.build_task(name, tokenizer, model, opts)
    dm = DeltaModel(model)
    if args.delta:
        dm.load_delta(args.delta, check_base=args.check_base)
    dm.eval()
    report: dict[str, Any] = {}
    if rows is not None:
        examples = task.encode_rows(rows, args.data)
        report["with_delta" if args.delta else "base"] = task.evaluate(
            dm, examples, batch_size=args.batch_size, progress=not args.json)
        if args.base_too and args.delta:
            with dm.disabled():
                report["base"] = task.evaluate(dm, examples, batch_size=args.batch_size,
                                               progress=not args.json)
    if general is not None:
        report["forgetting"] = forgetting(dm, tokenizer, general,
                                          max_length=opts.get("max_length", 512),
                                          batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"task": name, "run_file": run_file, **report}, indent=2,
                         sort_keys=True))
    else:
        print(f"task {name}" + (f" (settings from {run_file})" if run_file else ""))
        for section, values in report.items():
            print(f"{section}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return 0
