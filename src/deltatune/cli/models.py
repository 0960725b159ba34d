"""``deltatune models``: the built-in offline models; one-time preparation of their cache."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand with ``list`` and ``prepare``."""
    p = subparsers.add_parser("models", help="list the built-in models, prepare their cache")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    p_list = sub.add_parser("list", help="built-in models, their package, size and licence")
    p_list.set_defaults(handler=run_list)

    p_prep = sub.add_parser("prepare", help="one-time conversion into the cache (SmolLM2: "
                                            "GGUF -> safetensors)")
    p_prep.add_argument("name", metavar="NAME")
    p_prep.add_argument("--force", action="store_true", help="convert again even if cached")
    p_prep.set_defaults(handler=run_prepare)


def run_list(args: argparse.Namespace) -> int:
    """Print each built-in model with its state (installed / cached) and facts."""
    from deltatune.core.errors import ModelNotAvailableError
    from deltatune.models import cache_dir, list_models, locate

    for info in list_models():
        try:
            locate(info.name)
            state = "installed"
            if info.converted:
                ready = (cache_dir(info.name) / "manifest.json").is_file()
                state += ", converted" if ready else ", not converted yet"
        except ModelNotAvailableError:
            optional = "optional, " if info.optional else ""
            state = f"{optional}not installed: {info.install_command}"
        print(f"{info.name}  ({info.params} parameters; {state})")
        print(f"  {info.description}")
        print(f"  package: {info.package}; size: {info.size}")
        print(f"  tasks: {', '.join(info.tasks)}")
        print(f"  licence: {info.licence}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare one built-in model and print where it loads from and how long it took."""
    from deltatune.models import prepare

    start = time.perf_counter()
    path = prepare(args.name, force=args.force)
    print(f"{args.name} ready in {time.perf_counter() - start:.1f} s: {path}")
    return 0
