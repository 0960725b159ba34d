"""Regenerate docs/cli.md from the argument parser: ``python tools/gen_cli_docs.py``."""

import contextlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width
from deltatune.cli import COMMANDS, build_parser  # noqa: E402

p = build_parser()
sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
out = ["# The command line", "",
       "`deltatune COMMAND --help` prints the same text as below. Every command reads and",
       "writes the formats of [formats.md](formats.md); errors are one line naming the problem",
       "and the fix (exit code 2), Ctrl-C during training writes a checkpoint and prints the",
       "command that resumes (exit code 130).", "",
       "| command | what it does |", "|---|---|"]
helps = {a.dest: a.help for a in sub._choices_actions}
for name in COMMANDS:
    out.append(f"| [`{name}`](#deltatune-{name}) | {helps.get(name, '')} |")
for name in COMMANDS:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        sub.choices[name].print_help()
    out += ["", f"## deltatune {name}", "", "```", buf.getvalue().rstrip(), "```"]
(ROOT / "docs" / "cli.md").open("w").write("\n".join(out) + "\n")
