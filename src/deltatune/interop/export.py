"""Writing deltas for other tools: PEFT adapter directories and merged full models.

``save_peft`` writes what ``peft.PeftModel.from_pretrained`` loads (and what serving
engines such as vLLM read: PEFT's keys, ``r``, ``lora_alpha``, ``use_rslora`` and leaf
``target_modules`` when those select exactly the adapted modules). ``export_merged``
folds deltas into the base weights and saves a plain ``transformers`` model directory
(safetensors, sharded above ``max_shard_size``) with its tokenizer: loading it needs
``transformers`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.core import io
from deltatune.core.card import card_defaults, render_card, render_merged_card
from deltatune.core.config import LIBRARY_VERSION
from deltatune.core.errors import NonFiniteError
from deltatune.core.fingerprint import base_fingerprint
from deltatune.interop.peft_format import (
    META_CARD,
    META_FINGERPRINT,
    META_NAME,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    mapping_for_method,
)

DEFAULT_SHARD_SIZE = "2GB"


def save_peft(dm: Any, directory: str | Path, name: str | None = None, *,
              card: dict[str, Any] | None = None) -> Path:
    """Save delta ``name`` of DeltaModel ``dm`` as a PEFT adapter directory; return its path.

    Writes adapter_config.json, adapter_model.safetensors (our base-model fingerprint in
    its metadata), a README.md model card and a manifest, atomically. Raises
    :class:`~deltatune.core.errors.ConfigError` for a method PEFT does not have.
    """
    delta = dm._single(name)
    mapping = mapping_for_method(delta.config.method)
    tensors = dm.delta_state_dict(delta.name)
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"delta {delta.name!r} tensor {key!r} holds NaN/inf; refusing "
                                 f"to save it. Nothing was written.")
    peft_config, peft_tensors = mapping.to_peft(dm.model, delta, tensors)
    fingerprint = base_fingerprint(dm.model, dm._target_weights(delta))
    card = card_defaults(dm.model, card)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()
                     if t.is_floating_point()})
    payload = {
        "format": "peft",
        "library_version": LIBRARY_VERSION,
        "name": delta.name,
        "config": delta.method.saved_config(delta).to_dict(),
        "peft_config": peft_config,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "base_model": fingerprint,
        "parameters": sum(t.numel() for t in tensors.values()),
        "base_parameters": dm.base_parameter_count(),
        "card": card,
    }
    metadata = {"format": "pt", META_FINGERPRINT: json.dumps(fingerprint, sort_keys=True),
                META_NAME: delta.name, META_CARD: json.dumps(card, sort_keys=True)}
    directory = Path(directory)
    with io.atomic_directory(directory) as tmp:
        io.save_tensors(tmp / PEFT_WEIGHTS_FILE, peft_tensors, metadata=metadata)
        io.write_json(tmp / PEFT_CONFIG_FILE, peft_config)
        io.write_bytes_durably(tmp / "README.md", render_card(payload).encode("utf-8"))
    return directory


def serving_notes(peft_config: dict[str, Any]) -> list[str]:
    """Return warnings about parts of a PEFT LoRA config that serving engines may not load."""
    notes = []
    if peft_config.get("modules_to_save"):
        notes.append(f"modules_to_save {peft_config['modules_to_save']} are saved in full; "
                     f"vLLM/TGI LoRA serving does not load them (merge instead)")
    targets = peft_config.get("target_modules") or []
    if any("." in t for t in targets):
        notes.append("target_modules are full module paths (a layer subset); PEFT reads them, "
                     "some serving engines want leaf names")
    return notes


def export_merged(dm: Any, directory: str | Path, *, tokenizer: Any = None,
                  names: tuple[str, ...] = (), max_shard_size: str | int = DEFAULT_SHARD_SIZE,
                  card: dict[str, Any] | None = None, allow_lossy_merge: bool = False) -> Path:
    """Merge deltas ``names`` (default: the active ones) of ``dm`` into the base model and
    save a plain ``transformers`` directory; return its path.

    Weights are safetensors, split into shards above ``max_shard_size`` (with an index
    file); the tokenizer is saved beside them when given; README.md is a model card.
    The directory is replaced atomically. ``dm`` is consumed (its deltas are merged for
    good); pass a fresh one if you need it again. ``allow_lossy_merge`` lets deltas be
    merged into fake-quantized weights; the measured output deviations are written into
    the card.
    """
    reports = {r.name: r for r in dm.parameter_report()}
    merged_names = list(names) or dm.active
    description = [{"name": n, "method": reports[n].method, "parameters": reports[n].parameters}
                   for n in merged_names if n in reports]
    sources = {n: dm.get_delta(n).info.get("source") for n in merged_names}
    model: nn.Module = dm.merge_and_unload(*names, allow_lossy_merge=allow_lossy_merge)
    card = card_defaults(model, card)
    lossy = {n: dm.lossy_merges[n] for n in merged_names if n in dm.lossy_merges}
    if lossy:
        card["lossy_merge"] = lossy
    directory = Path(directory)
    with io.atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        io.write_bytes_durably(tmp / "README.md", render_merged_card(
            model, description, sources, card).encode("utf-8"))
    return directory
