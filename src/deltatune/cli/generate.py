"""``deltatune generate``: greedy (or sampled) generations from a model with a saved delta."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    p = subparsers.add_parser("generate", help="generate text with a model and a saved delta")
    p.add_argument("--model", required=True, help="built-in model name or local directory")
    p.add_argument("--delta", help="delta directory (omit for the base model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", help="JSONL/CSV with a 'prompt' column (or 'messages')")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat-template", choices=["auto", "true", "false"], default="auto",
                   help="wrap prompts in the tokenizer's chat template (default: if it has one)")
    p.add_argument("--system-prompt", help="system message before every prompt")
    p.add_argument("--check-base", default="strict", choices=["strict", "shapes", "off"])
    p.add_argument("--json", action="store_true", help="print JSON lines {prompt, output}")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load model (+ delta), generate for each prompt, print the outputs; return 0."""
    from deltatune import data, models
    from deltatune.core.errors import DataError
    from deltatune.core.model import DeltaModel
    from deltatune.tasks import CausalLMSFT

    prompts: list = list(args.prompt)
    if args.file:
        for row in data.read(args.file):
            prompts.append(row["messages"] if "messages" in row else row["prompt"])
    if not prompts:
        raise DataError("nothing to generate for: pass --prompt TEXT or --file FILE")
    model, tokenizer = models.load(args.model, task="causal-lm")
    chat = {"auto": None, "true": True, "false": False}[args.chat_template]
    task = CausalLMSFT(tokenizer, model=model, chat_template=chat,
                       system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens)
    target = model
    if args.delta:
        target = DeltaModel(model)
        target.load_delta(args.delta, check_base=args.check_base)
    examples = [task.encode_prompt(p) for p in prompts]
    outputs = task.generate(target, examples, batch_size=args.batch_size, progress=True)
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "output": out}, ensure_ascii=False))
        else:
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            print(f"### {shown}\n{out}\n")
    return 0
