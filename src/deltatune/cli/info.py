"""``deltatune info DIR``: what a saved delta holds, read without loading any model."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` subcommand."""
    p = subparsers.add_parser("info", help="show what a saved delta directory holds")
    p.add_argument("directory", help="a delta directory written by deltatune")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--rank-heatmap", metavar="PNG", default=None,
                   help="for deltas that report ranks (AdaLoRA): draw the layer x matrix "
                        "rank heatmap to this PNG file")
    p.set_defaults(handler=run)


def describe(directory: str) -> dict[str, Any]:
    """Return a summary of the delta saved in ``directory`` (checked, not attached)."""
    from deltatune.core.model import read_delta_directory

    saved = read_delta_directory(directory)
    payload, config = saved.payload, saved.config
    method = config.method
    from deltatune.core.registry import get_method

    impl = get_method(method)
    summary: dict[str, Any] = {}
    summarize = getattr(impl, "summarize", None)
    if callable(summarize):
        summary = summarize(config, saved.tensors) or {}
    base = payload.get("base_model") or {}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in saved.tensors.values()})
    return {
        "directory": str(directory),
        "name": payload.get("name"),
        "method": method,
        "library_version": payload.get("library_version"),
        "parameters": sum(t.numel() for t in saved.tensors.values()),
        "base_parameters": payload.get("base_parameters"),
        "tensors": len(saved.tensors),
        "dtype": dtypes,
        "base_model": {k: base.get(k) for k in ("model_type", "class", "architecture")},
        "targets": sorted(base.get("target_shapes", {})),
        "config": config.to_dict(),
        "card": payload.get("card") or {},
        "method_summary": summary,
    }


def run(args: argparse.Namespace) -> int:
    """Print the summary as text (or JSON with --json)."""
    info = describe(args.directory)
    heatmap = getattr(args, "rank_heatmap", None)
    if heatmap:
        ranks = info["method_summary"].get("ranks")
        if not ranks:
            from deltatune.core.errors import DeltaStateError

            raise DeltaStateError(f"delta method {info['method']!r} reports no ranks; "
                                  f"--rank-heatmap needs an AdaLoRA delta")
        from deltatune.plotting.rank_heatmap import plot_rank_heatmap

        plot_rank_heatmap(ranks, heatmap, title=f"{info['name']}: rank kept")
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    base = info["base_parameters"]
    share = f" ({100.0 * info['parameters'] / base:.4f}% of {base:,})" if base else ""
    print(f"delta      {info['name']}  ({info['method']}, deltatune {info['library_version']})")
    print(f"tensors    {info['tensors']} tensors, {info['parameters']:,} parameters{share}, "
          f"dtype {', '.join(info['dtype'])}")
    bm = info["base_model"]
    print(f"base model {bm.get('class')} (type {bm.get('model_type')})")
    targets = info["targets"]
    print(f"targets    {len(targets)} modules" + (f": {', '.join(targets[:6])}"
                                                  + (" ..." if len(targets) > 6 else "")
                                                  if targets else ""))
    fields = {k: v for k, v in info["config"].items()
              if k not in ("method", "schema_version", "min_library_version")}
    print("config     " + ", ".join(f"{k}={v!r}" for k, v in sorted(fields.items())))
    for key, value in (info["card"].get("metrics") or {}).items():
        print(f"metric     {key}: {value}")
    summary = dict(info["method_summary"])
    ranks = summary.pop("ranks", None)
    if ranks:
        from deltatune.plotting.rank_heatmap import format_rank_table

        print("rank kept per layer and matrix:")
        print("  " + format_rank_table(ranks).replace("\n", "\n  "))
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0
