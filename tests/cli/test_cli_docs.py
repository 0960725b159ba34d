"""docs/cli.md documents every subcommand and every flag (regenerate: tools/gen_cli_docs.py)."""

from __future__ import annotations

from pathlib import Path

from deltatune.cli import COMMANDS, build_parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_every_command_and_flag_is_documented():
    text = DOC.read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name in COMMANDS:
        if f"## deltatune {name}" not in text:
            missing.append(name)
            continue
        section = text.split(f"## deltatune {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub.choices[name]._actions:
            missing += [f"{name} {flag}" for flag in action.option_strings
                        if flag.startswith("--") and flag not in section]
    assert not missing, f"docs/cli.md is stale ({missing}); run python tools/gen_cli_docs.py"
