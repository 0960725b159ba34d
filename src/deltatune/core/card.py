"""The README.md model card written into every saved delta directory."""

from __future__ import annotations

from typing import Any


def _targets(payload: dict[str, Any]) -> list[str]:
    return sorted((payload.get("base_model") or {}).get("target_shapes", {}))


def render_card(payload: dict[str, Any]) -> str:
    """Return the Markdown model card for a saved delta's config payload."""
    config = payload.get("config", {})
    base = payload.get("base_model") or {}
    card = payload.get("card") or {}
    params = payload.get("parameters", 0)
    base_params = payload.get("base_parameters") or 0
    share = f" ({100.0 * params / base_params:.4f}% of the base model's {base_params:,})" \
        if base_params else ""
    targets = _targets(payload)
    lines = [
        f"# {payload.get('name', 'delta')}: a {config.get('method', '?')} delta",
        "",
        f"Made with deltatune {payload.get('library_version', '?')}. Load it with "
        "`deltatune.load(base_model, this_directory)`.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{config.get('method', '?')}` |",
        f"| base model | {card.get('base_model_name', base.get('class', '?'))} "
        f"(type `{base.get('model_type', '?')}`) |",
        f"| trainable parameters | {params:,}{share} |",
        f"| tensor dtype | {payload.get('dtype', '?')} |",
        f"| targets | {len(targets)} modules |",
    ]
    if card.get("training_data"):
        lines.append(f"| training data | {card['training_data']} |")
    for key, value in (card.get("metrics") or {}).items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "## Configuration", "", "```json"]
    import json

    lines.append(json.dumps(config, indent=2, sort_keys=True))
    lines += ["```", ""]
    if targets:
        lines += ["## Targeted modules", ""]
        shown = targets[:64]
        lines += [f"- `{t}`" for t in shown]
        if len(targets) > len(shown):
            lines.append(f"- ... and {len(targets) - len(shown)} more")
        lines.append("")
    if card.get("notes"):
        lines += ["## Notes", "", str(card["notes"]), ""]
    return "\n".join(lines)
