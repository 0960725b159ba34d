"""``deltatune train``: fine-tune a delta on JSONL/CSV/Parquet data, for any task.

    deltatune train --model smollm2-135m-instruct --data train.jsonl --out runs/x \\
        --method lora --r 8 --lora-alpha 16 --target-modules q_proj,v_proj --epochs 1
    deltatune train --model smollm2-135m-instruct --data wordnet-definitions-demo \\
        --set r=8 --set target_modules=all-linear --out runs/defs
    deltatune train --task sequence-classification --model minilm-l6 \\
        --data rotten-tomatoes --out runs/sent --target-modules query,value
    deltatune train --config runs/x/run.yaml --resume          # continue where it stopped

Tasks (``--task``; columns each row needs, renamed from yours with ``--column YOURS=NAME``):
causal-lm-sft (default; prompt + response, or messages), causal-lm (text: raw-text
language modelling), sequence-classification (text [+ text_pair], label; a new head, or
label words through a causal LM with --verbalizer), token-classification (tokens, tags:
BIO), seq2seq (source, target), multiple-choice (prompt, choices, label: rank
classification). A new head is trained in full with the delta (modules_to_save).

Every field of the chosen method's config is a flag (``--lora-alpha``); every field of
:class:`deltatune.train.TrainConfig` too (``--batch-size``, ``--eval-every``,
``--packing``). Values are read as YAML scalars (``--layers "[0, 1]"``); a comma list
fills a list field (``--target-modules q_proj,v_proj``); ``--set KEY=VALUE`` does the
same for any method option. ``--data`` may name a built-in data set (its validation
split then evaluates). ``--config FILE`` reads a run file first; flags given on the
command line win. The run actually made is written to ``OUT/run.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

# Flags of this command that are not TrainConfig or method fields.
OWN_FLAGS = {"model", "data", "eval_data", "out", "config", "method", "set_options", "name",
             "task", "resume",
             "val_fraction", "column", "mix_general", "mix_ratio", "general_column",
             "max_length", "chat_template", "system_prompt", "max_new_tokens",
             "generate_examples", "max_truncated", "labels", "verbalizer", "template", "loss",
             "max_target_length", "fast_generate", "no_progress", "handler", "command"}
# flags that set an option of the task (the same name in the run file's task_options)
TASK_FLAGS = ("max_length", "chat_template", "system_prompt", "max_new_tokens",
              "generate_examples", "max_truncated", "labels", "template", "loss",
              "max_target_length", "fast_generate")
TRAIN_SKIP = {"output_dir", "progress", "handle_signals", "lr_ratios"}


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _method_fields() -> dict[str, list[str]]:
    """Every registered method's config field -> the methods that have it."""
    from deltatune.core.registry import config_class, known_methods

    out: dict[str, list[str]] = {}
    for name in known_methods():
        for f in dataclasses.fields(config_class(name)):
            out.setdefault(f.name, []).append(name)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    from deltatune.train.config import TrainConfig

    p = subparsers.add_parser(
        "train", help="fine-tune a delta on a task (causal-LM SFT by default; --task for "
                      "classification, tagging, seq2seq, multiple choice, raw-text LM)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="RUN.yaml", help="a run file (flags override it)")
    g.add_argument("--model", help="built-in model name or local model directory")
    g.add_argument("--out", help="output directory (checkpoints, delta/, run.yaml, log.jsonl)")
    g.add_argument("--method", help="delta method (default lora)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="set_options",
                   help="a method option, e.g. --set r=8 (repeatable; same as --r 8)")
    g.add_argument("--name", help="name of the delta (default 'default')")
    g.add_argument("--task", help="causal-lm-sft (default), causal-lm, sequence-classification, "
                   "token-classification, seq2seq or multiple-choice")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint in --out (or the one "
                        "given)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="training file (.jsonl, .csv, .tsv, .parquet, dataset dir) "
                   "or a built-in data set name (`deltatune data list`)")
    d.add_argument("--eval-data", help="validation file (default: a built-in data set's "
                   "validation split, else hold out --val-fraction)")
    d.add_argument("--val-fraction", type=float, help="fraction held out for validation when "
                   "no --eval-data is given (default 0.1; 0 = no evaluation)")
    d.add_argument("--column", action="append", metavar="OLD=NEW",
                   help="rename a column of the data to the name the task expects, e.g. "
                        "--column question=prompt (repeatable)")
    d.add_argument("--mix-general", metavar="FILE", help="general text (rows with 'text') "
                   "mixed into training batches (forgetting guard)")
    d.add_argument("--mix-ratio", type=float, help="share of general examples (default 0.1)")
    d.add_argument("--general-column", help="text column of --mix-general (default 'text')")
    t = p.add_argument_group("task")
    t.add_argument("--max-length", type=int, help="tokens per example (default 512)")
    t.add_argument("--chat-template", type=_yaml_value, metavar="true|false",
                   help="use the tokenizer's chat template (default: when it has one)")
    t.add_argument("--system-prompt", help="system message put before every prompt")
    t.add_argument("--max-new-tokens", type=int, help="generation length in evaluation")
    t.add_argument("--generate-examples", type=int,
                   help="evaluation examples to generate for ROUGE-L (default all; 0 = none)")
    t.add_argument("--fast-generate", action="store_true", default=None,
                   help="those generations with a static KV cache, each step a CUDA graph "
                        "on a GPU (the same greedy tokens)")
    t.add_argument("--max-truncated", type=float,
                   help="largest share of examples that may be cut at max-length (0.05)")
    t.add_argument("--labels", type=_comma_list, metavar="A,B,...",
                   help="class names in head order (classification, tagging; default: the "
                        "sorted labels of the training data, 'O' first for tags)")
    t.add_argument("--verbalizer", action="append", metavar="LABEL=WORD",
                   help="sequence classification through a causal LM: the word scoring each "
                        "label, e.g. --verbalizer 'positive= great' (repeatable)")
    t.add_argument("--template", help="verbaliser prompt with {text} (and {text_pair}), e.g. "
                   "'{text} It was'")
    t.add_argument("--loss", help="multiple choice: t-few (default) or lm")
    t.add_argument("--max-target-length", type=int, help="seq2seq: target tokens (128)")
    tr = p.add_argument_group("training (fields of TrainConfig; docs/training.md)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in TRAIN_SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f"(default {f.default!r})" if f.default is not dataclasses.MISSING else None
        if f.type in (bool, "bool"):
            tr.add_argument(flag, dest="train__" + f.name, type=_yaml_value, nargs="?",
                            const=True, metavar="BOOL", help=default)
        else:
            tr.add_argument(flag, dest="train__" + f.name, type=_yaml_value, metavar="V",
                            help=default)
    m = p.add_argument_group("method options (fields of the method's config; "
                             "`deltatune methods` describes them)")
    taken = {a.dest for a in p._actions} | {f.name for f in dataclasses.fields(TrainConfig)}
    for name, owners in _method_fields().items():
        if name in taken or name == "method":
            continue
        m.add_argument("--" + name.replace("_", "-"), dest="method__" + name, type=_yaml_value,
                       metavar="V", help=f"({', '.join(owners)})")
    p.set_defaults(handler=run)


def build_run(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the run file (if any) with the flags given; return the run description."""
    from deltatune.core.errors import ConfigError
    from deltatune.core.registry import config_class
    from deltatune.train.runfile import load_run_file

    run: dict[str, Any] = load_run_file(args.config) if args.config else {}
    run.pop("result", None)
    for key in ("model", "name", "task"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    run.setdefault("task", "causal-lm-sft")
    run.setdefault("name", "default")
    data = dict(run.get("data") or {})
    for key, attr in (("train", "data"), ("eval", "eval_data"), ("val_fraction", "val_fraction"),
                      ("mix_general", "mix_general"), ("mix_ratio", "mix_ratio"),
                      ("general_column", "general_column")):
        if getattr(args, attr) is not None:
            data[key] = getattr(args, attr)
    if args.column:
        cols = dict(data.get("columns") or {})
        for item in args.column:
            old, sep, new = item.partition("=")
            if not sep or not old or not new:
                raise ConfigError(f"--column wants OLD=NEW, got {item!r}", field="column")
            cols[old] = new
        data["columns"] = cols
    run["data"] = data
    opts = dict(run.get("task_options") or {})
    for key in TASK_FLAGS:
        if getattr(args, key, None) is not None:
            opts[key] = getattr(args, key)
    if getattr(args, "verbalizer", None):
        opts["verbalizer"] = parse_verbalizer(args.verbalizer)
    run["task_options"] = opts
    train = dict(run.get("train") or {})
    method = dict(run.get("method") or {})
    for dest, value in vars(args).items():
        if value is None:
            continue
        if dest.startswith("train__"):
            train[dest[7:]] = value
        elif dest.startswith("method__"):
            method[dest[8:]] = value
    for item in args.set_options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}", field="set")
        method[key.strip().replace("-", "_")] = _yaml_value(value)
    if args.out is not None:
        train["output_dir"] = args.out
    if args.no_progress:
        train["progress"] = False
    method["method"] = args.method or method.get("method") or "lora"
    cls = config_class(method["method"])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in list(method.items()):
        if key in fields and isinstance(value, str) and "," in value and \
                "list" in str(fields[key].type):
            method[key] = [_yaml_value(v.strip()) for v in value.split(",") if v.strip()]
    run["method"] = method
    run["train"] = train
    if not run.get("model"):
        raise ConfigError("no model: pass --model NAME_OR_DIR (or 'model:' in --config)",
                          field="model")
    if not data.get("train"):
        raise ConfigError("no training data: pass --data FILE (or data.train in --config)",
                          field="data")
    if not train.get("output_dir"):
        raise ConfigError("no output directory: pass --out DIR", field="out")
    return run


def _comma_list(text: str) -> list[Any]:
    return [_yaml_value(v.strip()) for v in text.split(",") if v.strip()]


def parse_verbalizer(items: list[str]) -> dict[Any, str]:
    """``["positive= great", ...]`` -> ``{"positive": " great"}`` (labels read as YAML)."""
    from deltatune.core.errors import ConfigError

    out: dict[Any, str] = {}
    for item in items:
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word:
            raise ConfigError(f"--verbalizer wants LABEL=WORD, got {item!r}", field="verbalizer")
        out[_yaml_value(label.strip())] = word
    return out


def run(args: argparse.Namespace) -> int:
    """Train as described by the flags / run file; return the exit code."""
    import torch

    from deltatune import __version__, data
    from deltatune.cli import task_setup
    from deltatune.core.errors import ConfigError
    from deltatune.core.model import DeltaModel
    from deltatune.core.registry import config_class, config_from_dict
    from deltatune.tasks import CausalLMBase, Encoded, LanguageModeling
    from deltatune.train import TrainConfig, Trainer, TrainingInterrupted
    from deltatune.train.runfile import RUN_FILE, write_run_file

    run_desc = build_run(args)
    config = TrainConfig.from_dict(run_desc["train"])
    config_from_dict(run_desc["method"])  # a bad method option fails before any loading
    task_name = run_desc["task"]
    opts = task_setup.check_options(task_name, dict(run_desc["task_options"]))
    spec = run_desc["data"]
    columns = spec.get("columns") or None
    # Read (and check) the data before loading the model: a bad file fails fast.
    train_rows = data.read(spec["train"], columns=columns)
    eval_rows = data.read(spec["eval"], columns=columns) if spec.get("eval") else None
    builtin = data.readers._is_builtin(str(spec["train"])) and not Path(spec["train"]).exists()
    if eval_rows is None and builtin and "val_fraction" not in spec:
        eval_rows = data.read(spec["train"], split="validation", columns=columns)
    elif eval_rows is None and float(spec.get("val_fraction", 0.1)) > 0:
        train_rows, eval_rows = data.split(train_rows, validation=float(
            spec.get("val_fraction", 0.1)), seed=config.seed)
    task_setup.check_columns(task_name, opts, train_rows)
    if eval_rows is not None:
        task_setup.check_columns(task_name, opts, eval_rows)
    general_rows = None
    if spec.get("mix_general"):
        if task_name not in ("causal-lm-sft", "causal-lm"):
            raise ConfigError(f"--mix-general mixes raw text into causal-LM training; task "
                              f"{task_name!r} has no place for it", field="mix_general")
        general_rows = data.read(spec["mix_general"])
        task_setup.check_columns("causal-lm", {"text_column": spec.get("general_column",
                                                                         "text")}, general_rows)
    labels = task_setup.label_set(task_name, opts, train_rows)
    if labels is not None:
        opts["labels"] = labels
        run_desc["task_options"]["labels"] = labels

    torch.manual_seed(config.seed)  # a new head's initial weights follow the run's seed
    model, tokenizer = task_setup.load_model(run_desc["model"], task_name, opts)
    method = run_desc["method"]
    heads = task_setup.head_modules(model)
    if heads:
        fields = {f.name for f in dataclasses.fields(config_class(method["method"]))}
        if "modules_to_save" in fields and "modules_to_save" not in method and \
                method["method"] != "full":
            method["modules_to_save"] = heads
            print(f"new head {', '.join(heads)}: trained in full with the delta "
                  f"(modules_to_save)")
    delta_config = config_from_dict(method)
    task = task_setup.build_task(task_name, tokenizer, model, opts)
    dm = DeltaModel(model)
    # The delta's random init (LoRA's A, ...) comes from the run's seed, so one run file
    # always trains the same weights: a resumed run and a fresh one are bit-equal on CPU.
    torch.manual_seed(config.seed)
    dm.add(run_desc["name"], delta_config)
    print(dm.describe_parameters())
    train_data: Any = train_rows
    if general_rows is not None:
        assert isinstance(task, CausalLMBase)
        task_examples = task.encode_rows(train_rows, "training data")
        general = LanguageModeling(tokenizer, max_length=task.max_length,
                                   text_column=spec.get("general_column", "text"))
        general_examples = general.encode_rows(general_rows, spec["mix_general"])
        ratio = float(spec.get("mix_ratio", 0.1))
        train_data = Encoded(data.mix(task_examples, general_examples, ratio, seed=config.seed))
        print(f"forgetting guard: mixed {len(train_data) - len(task_examples)} general-text "
              f"examples into {len(task_examples)} task examples (ratio {ratio})")
    trainer = Trainer(dm, task, train_data, eval_rows, config)
    packed = (f", packed from {trainer.packed_from} examples" if trainer.packed_from
              is not None else "")
    print(f"task {task_name}; training data: {len(trainer.train_examples)} "
          f"{'rows' if packed else 'examples'}{packed}"
          + (f" ({trainer.train_stats.describe()})" if general_rows is None else "")
          + (f"; evaluation: {len(trainer.eval_examples)} examples"
             if trainer.eval_examples is not None else "; no evaluation data"))
    out = Path(config.output_dir)
    run_desc["deltatune_version"] = __version__
    # Written before training, so the resume command below works even after a hard stop.
    write_run_file(out / RUN_FILE, run_desc)
    try:
        result = trainer.fit(resume=args.resume)
    except TrainingInterrupted as exc:
        print(_interrupted_message(exc, out), file=sys.stderr)
        return exc.exit_code
    run_desc["result"] = result.summary()
    write_run_file(out / RUN_FILE, run_desc)
    _print_summary(result)
    print(f"delta saved to {result.delta_dir}; run file {out / RUN_FILE}")
    return 0


def _interrupted_message(exc: Any, out: Path) -> str:
    """What an interrupted run tells the user: the checkpoint and the command to resume."""
    import shlex
    import signal

    from deltatune.train.checkpoint import find_resumable
    from deltatune.train.runfile import RUN_FILE

    resume = f"resume with: deltatune train --config {shlex.quote(str(out / RUN_FILE))} --resume"
    if not exc.immediate:
        return f"\ninterrupted; checkpoint: {exc.checkpoint}\n{resume}"
    # A second signal stopped the run mid-way: name the newest checkpoint that is complete
    # (its manifest checks out), which is what --resume will pick.
    stopped = f"second {signal.Signals(exc.signum).name}: stopped at once, nothing more written"
    last, _ = find_resumable(out)
    if last is None:
        return f"\n{stopped}\nno complete checkpoint; run the same command again to start over"
    return f"\n{stopped}\nlast complete checkpoint: {last}\n{resume}"


def _print_summary(result: Any) -> None:
    losses = [(h["step"], h["loss"]) for h in result.history if "loss" in h]
    if losses:
        picks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4,
                        len(losses) - 1})
        print("loss: " + ", ".join(f"step {losses[i][0]} {losses[i][1]:.4f}" for i in picks))
    if result.final_eval:
        print("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items()))
    if result.best:
        print(f"best {result.best['metric']} {result.best['value']:.4f} at step "
              f"{result.best['step']} (saved in {result.best_dir})")
    if result.skipped_steps:
        print(f"skipped steps: {result.skipped_steps}")
