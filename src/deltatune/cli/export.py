"""``deltatune export``: write a delta for other tools.

``--format peft`` writes a Hugging Face PEFT adapter directory, ``--format deltatune``
our own format (e.g. from a PEFT adapter), ``--format merged`` a full ``transformers``
model with the delta folded in (safetensors, sharded above ``--max-shard-size``) and its
tokenizer. The delta may be a deltatune directory or a PEFT adapter directory.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export", help="convert a delta to PEFT's format, ours, or a merged full model")
    p.add_argument("--model", required=True,
                   help="base model: built-in name or local directory (checked against the "
                        "delta before anything is written)")
    p.add_argument("--delta", required=True, help="delta directory (deltatune or PEFT format)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--format", default="peft", choices=["peft", "deltatune", "merged"],
                   help="what to write (default: peft)")
    p.add_argument("--task", default="causal-lm", help="model head (causal-lm, seq2seq-lm, "
                   "sequence-classification, ...); default causal-lm")
    p.add_argument("--max-shard-size", default="2GB",
                   help="merged format: largest weight file before sharding (e.g. 500MB)")
    p.add_argument("--check-base", default="strict", choices=["strict", "shapes", "off"],
                   help="how strictly the base model must match the delta")
    p.add_argument("--allow-pickle", action="store_true",
                   help="admit a legacy PEFT adapter_model.bin (torch.load weights_only=True); "
                        "only for files you trust")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and the delta, write the requested format; return 0."""
    from deltatune import models
    from deltatune.core.model import DeltaModel
    from deltatune.interop import export_merged, serving_notes

    model, tokenizer = models.load(args.model, task=args.task)
    dm = DeltaModel(model)
    name = dm.load_delta(args.delta, check_base=args.check_base, allow_pickle=args.allow_pickle)
    card = dm.get_delta(name).info.get("card") or {}
    if args.format == "merged":
        out = export_merged(dm, args.out, tokenizer=tokenizer, names=(name,),
                            max_shard_size=args.max_shard_size, card=card)
        print(f"merged delta {name!r} into {args.model}; saved a transformers model to {out}")
        return 0
    out = dm.save_delta(args.out, name, card=card, format=args.format)
    print(f"saved delta {name!r} in {args.format} format to {out}")
    if args.format == "peft":
        from deltatune.core.io import read_json

        for note in serving_notes(read_json(out / "adapter_config.json")):
            print(f"note: {note}")
    return 0
