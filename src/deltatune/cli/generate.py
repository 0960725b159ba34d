"""``deltatune generate``: greedy generations from a model with one or several saved deltas.

With several deltas every batch may mix them, one per row (the model's ``delta_names``):
a ``delta`` column in ``--file`` routes each prompt, or ``--each`` runs every prompt
through every delta (and the base model with ``--base-too``) to compare them side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deltatune.core.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    p = subparsers.add_parser("generate", help="generate text with a model and saved deltas")
    p.add_argument("--model", required=True, help="built-in model name or local directory")
    p.add_argument("--delta", action="append", default=[], metavar="[NAME=]DIR",
                   help="delta directory (repeatable; NAME defaults to the saved name); "
                        "omit for the base model")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", help="JSONL/CSV with a 'prompt' column (or 'messages'), and "
                                  "optionally 'delta': the delta for that row (empty: base)")
    p.add_argument("--each", action="store_true",
                   help="run every prompt through every delta (mixed batches)")
    p.add_argument("--base-too", action="store_true",
                   help="with --each: the base model as well")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true",
                   help="draw tokens instead of greedy decoding (implied by the next three)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the nucleus of this probability")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--fast", action="store_true",
                   help="decode with a static KV cache, each step a CUDA graph on a GPU "
                        "(the same steps eagerly elsewhere)")
    p.add_argument("--chat-template", choices=["auto", "true", "false"], default="auto",
                   help="wrap prompts in the tokenizer's chat template (default: if it has one)")
    p.add_argument("--system-prompt", help="system message before every prompt")
    p.add_argument("--check-base", default="strict", choices=["strict", "shapes", "off"])
    p.add_argument("--json", action="store_true",
                   help="print JSON lines {prompt, output} (and delta, with several)")
    p.set_defaults(handler=run)


def _load_deltas(model: Any, specs: list[str], check_base: str) -> tuple[Any, list[str]]:
    """Return (the model with every delta of ``specs`` loaded, their names in order)."""
    from deltatune.core.model import DeltaModel

    if not specs:
        return model, []
    target = DeltaModel(model)
    names: list[str] = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = "", spec
        if name in names:
            raise ConfigError(f"two deltas are named {name!r}: give each its own name with "
                              f"--delta NAME=DIR", field="delta")
        saved = _saved_name(directory)
        if not name and saved in names:
            name = Path(directory).name  # the same saved name twice: the directory's
            if name in names:
                raise ConfigError(f"deltas {directory!r} and another are both named "
                                  f"{saved!r}: give each a name with --delta NAME=DIR",
                                  field="delta")
        loaded = target.load_delta(directory, name or None, activate=len(specs) == 1,
                                   check_base=check_base)
        names.append(loaded)
    return target, names


def _saved_name(directory: str) -> str | None:
    """The name a delta directory was saved under (deltatune format), if it says."""
    config = Path(directory) / "delta_config.json"
    try:
        return json.loads(config.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None


def _routes(args: argparse.Namespace, prompts: list, columns: list, names: list[str]
            ) -> tuple[list, list | None]:
    """Return (prompts, the delta of each or None) after --each / the 'delta' column."""
    if args.each:
        if not names:
            raise ConfigError("--each needs deltas to compare: pass --delta DIR (repeatable)",
                              field="each")
        choices = ([None] if args.base_too else []) + names
        return ([p for p in prompts for _ in choices],
                [c for _ in prompts for c in choices])
    if any(c is not None for c in columns):
        routed = []
        for row, value in enumerate(columns):
            value = value or None
            if value is not None and value not in names:
                raise ConfigError(f"{args.file} row {row + 1}: delta {value!r} is not loaded "
                                  f"(loaded: {', '.join(names) or 'none'}); pass it with "
                                  f"--delta {value}=DIR", field="delta")
            routed.append(value)
        return prompts, routed
    if len(names) > 1:
        raise ConfigError(f"{len(names)} deltas are loaded ({', '.join(names)}): say which "
                          f"one each prompt uses with a 'delta' column in --file, or pass "
                          f"--each to run every prompt through every delta", field="delta")
    return prompts, None


def _sampling(args: argparse.Namespace):
    """The Sampling the flags ask for, or None for greedy decoding."""
    from deltatune.kernels.sampling import Sampling

    given = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                ("top_p", args.top_p)) if v is not None}
    if not (args.sample or given):
        return None
    return Sampling(**given)


def run(args: argparse.Namespace) -> int:
    """Load the model and deltas, generate for each prompt, print the outputs; return 0."""
    from deltatune import data, models
    from deltatune.core.errors import DataError
    from deltatune.tasks import CausalLMSFT

    prompts: list = list(args.prompt)
    columns: list = [None] * len(prompts)
    if args.file:
        for row in data.read(args.file):
            prompts.append(row["messages"] if "messages" in row else row["prompt"])
            columns.append(row.get("delta"))
    if not prompts:
        raise DataError("nothing to generate for: pass --prompt TEXT or --file FILE")
    if args.base_too and not args.each:
        raise ConfigError("--base-too goes with --each", field="base_too")
    model, tokenizer = models.load(args.model, task="causal-lm")
    chat = {"auto": None, "true": True, "false": False}[args.chat_template]
    task = CausalLMSFT(tokenizer, model=model, chat_template=chat,
                       system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens)
    target, names = _load_deltas(model, args.delta, args.check_base)
    prompts, routed = _routes(args, prompts, columns, names)
    examples = [task.encode_prompt(p) for p in prompts]
    sampling = _sampling(args)
    if sampling is not None:
        import torch

        torch.manual_seed(args.seed)
    outputs = task.generate(target, examples, batch_size=args.batch_size, progress=True,
                            delta_names=routed, sampling=sampling, graphs=args.fast)
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        delta = None if routed is None else routed[i] or "base"
        if args.json:
            line = {"prompt": prompt, "output": out}
            if delta is not None:
                line["delta"] = delta
            print(json.dumps(line, ensure_ascii=False))
        else:
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            first = routed is None or i == 0 or prompts[i - 1] is not prompt
            if first:
                print(f"### {shown}")
            print(f"[{delta}] {out}\n" if delta is not None else f"{out}\n")
    return 0
