"""The README.md model card written into every saved delta directory (and merged export).

Cards open with Hugging Face Hub YAML front matter (``library_name``, ``base_model``,
``tags``, ``datasets``, ``license``, ``language``, ``pipeline_tag``, ``model-index`` with
the metrics when known), then a table: method, base model, targets, trainable
parameters, training data and metrics.

Free information comes from the ``card`` dict given to ``save_delta`` (keys:
``base_model_name``, ``training_data`` (text), ``datasets`` (list of Hub ids),
``metrics`` ({name: value}), ``license``, ``language``, ``notes``, ``task``).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

# Hub pipeline tags for the PEFT task types and our task names.
_PIPELINE = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation",
             "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification",
             "causal-lm": "text-generation", "seq2seq-lm": "text2text-generation",
             "sequence-classification": "text-classification",
             "token-classification": "token-classification", "masked-lm": "fill-mask"}


def card_defaults(model: Any, card: dict[str, Any] | None) -> dict[str, Any]:
    """Return ``card`` with ``base_model_name`` filled from the model's ``name_or_path``."""
    out = dict(card or {})
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if name and "base_model_name" not in out:
        out["base_model_name"] = str(name)
    return out


def _targets(payload: dict[str, Any]) -> list[str]:
    return sorted((payload.get("base_model") or {}).get("target_shapes", {}))


def _front_matter(*, library_name: str, base_model: str | None, tags: list[str],
                  card: dict[str, Any], pipeline: str | None, model_name: str) -> str:
    meta: dict[str, Any] = {"library_name": library_name}
    if base_model:
        meta["base_model"] = base_model
    meta["tags"] = list(dict.fromkeys(tags))
    for key in ("license", "language"):
        if card.get(key):
            meta[key] = card[key]
    datasets = card.get("datasets")
    if isinstance(datasets, str):
        datasets = [datasets]
    if datasets:
        meta["datasets"] = list(datasets)
    if pipeline:
        meta["pipeline_tag"] = pipeline
    metrics = card.get("metrics") or {}
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))
               and not isinstance(v, bool)}
    if numeric:
        result: dict[str, Any] = {"metrics": [{"type": k, "value": v, "name": k}
                                              for k, v in numeric.items()]}
        if pipeline:
            result["task"] = {"type": pipeline}
        if datasets:
            result["dataset"] = {"name": datasets[0], "type": datasets[0]}
        meta["model-index"] = [{"name": model_name, "results": [result]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _base_line(card: dict[str, Any], base: dict[str, Any]) -> str:
    kind = f"type `{base['model_type']}`" if base.get("model_type") else ""
    name = card.get("base_model_name") or base.get("class") or "?"
    return f"{name} ({kind})" if kind else str(name)


def render_card(payload: dict[str, Any]) -> str:
    """Return the Markdown model card (with Hub front matter) for a saved delta's payload.

    ``payload["format"] == "peft"`` gives PEFT's ``library_name`` and loading lines.
    """
    config = payload.get("config", {})
    method = config.get("method", "?")
    base = payload.get("base_model") or {}
    card = payload.get("card") or {}
    params = payload.get("parameters", 0)
    base_params = payload.get("base_parameters") or 0
    share = f" ({100.0 * params / base_params:.4f}% of the base model's {base_params:,})" \
        if base_params else ""
    targets = _targets(payload)
    peft = payload.get("format") == "peft"
    peft_config = payload.get("peft_config") or {}
    name = payload.get("name", "delta")
    tags = ["deltatune", method, "peft" if peft else "delta-tuning"]
    if peft and card.get("base_model_name"):
        tags.insert(0, f"base_model:adapter:{card['base_model_name']}")
    pipeline = _PIPELINE.get(str(card.get("task") or peft_config.get("task_type")))
    lines = [
        _front_matter(library_name="peft" if peft else "deltatune",
                      base_model=card.get("base_model_name"), tags=tags, card=card,
                      pipeline=pipeline, model_name=name),
        f"# {name}: a {method} delta",
        "",
    ]
    if peft:
        lines += [
            f"Made with deltatune {payload.get('library_version', '?')} in Hugging Face PEFT's "
            f"adapter format (`peft_type` {peft_config.get('peft_type', '?')}). Load it with "
            "`peft.PeftModel.from_pretrained(base_model, this_directory)` or "
            "`deltatune.load_peft(this_directory, model=base_model)`.",
        ]
    else:
        lines += [
            f"Made with deltatune {payload.get('library_version', '?')}. Load it with "
            "`deltatune.load(base_model, this_directory)`.",
        ]
    lines += [
        "",
        "| | |",
        "|---|---|",
        f"| method | `{method}` |",
        f"| base model | {_base_line(card, base)} |",
        f"| trainable parameters | {params:,}{share} |",
        f"| tensor dtype | {payload.get('dtype', '?')} |",
        f"| targets | {len(targets)} modules |",
    ]
    if card.get("training_data"):
        lines.append(f"| training data | {card['training_data']} |")
    if card.get("datasets"):
        datasets = card["datasets"]
        listed = [datasets] if isinstance(datasets, str) else datasets
        lines.append(f"| datasets | {', '.join(listed)} |")
    for key, value in (card.get("metrics") or {}).items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "## Configuration", "", "```json",
              json.dumps(config, indent=2, sort_keys=True), "```", ""]
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


def render_merged_card(model: Any, deltas: list[dict[str, Any]], sources: dict[str, Any],
                       card: dict[str, Any]) -> str:
    """Return the model card of a merged export: base model plus the deltas folded in."""
    methods = sorted({d["method"] for d in deltas})
    cls = type(model).__name__
    pipeline = _PIPELINE.get(str(card.get("task") or ""))
    lines = [
        _front_matter(library_name="transformers", base_model=card.get("base_model_name"),
                      tags=["deltatune", "merged", *methods], card=card, pipeline=pipeline,
                      model_name=cls),
        f"# {cls} with merged deltas",
        "",
        "A plain `transformers` model: the deltas below were folded into the base weights by "
        "deltatune, so it loads with `AutoModel*.from_pretrained(this_directory)` and needs "
        "no deltatune.",
        "",
        "| delta | method | parameters merged | source |",
        "|---|---|---|---|",
    ]
    for d in deltas:
        lines.append(f"| {d['name']} | `{d['method']}` | {d['parameters']:,} | "
                     f"{sources.get(d['name']) or '-'} |")
    lines += ["", f"Base model: {card.get('base_model_name') or cls}.", ""]
    if card.get("training_data"):
        lines += [f"Training data: {card['training_data']}.", ""]
    for key, value in (card.get("metrics") or {}).items():
        lines.append(f"- {key}: {value}")
    lossy = card.get("lossy_merge") or {}
    if lossy:
        lines += ["", "## Lossy merge", "",
                  "These deltas were merged into quantized weights (`allow_lossy_merge=True`): "
                  "the layer re-quantizes the merged weight, so its output differs from the "
                  "unmerged model. Measured per layer on a probe batch:", "",
                  "| delta | layer | max abs deviation | mean abs deviation | max relative |",
                  "|---|---|---|---|---|"]
        for name, layers in lossy.items():
            for layer, dev in layers.items():
                lines.append(f"| {name} | `{layer}` | {dev['max_abs']:.4g} | "
                             f"{dev['mean_abs']:.4g} | {dev['max_rel']:.4%} |")
    return "\n".join(lines) + "\n"
