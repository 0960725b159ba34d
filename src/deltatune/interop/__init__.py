"""Interoperability: Hugging Face PEFT adapter directories both ways, and merged exports.

    dm = deltatune.load_peft("path/to/peft-adapter", model=base)   # PEFT -> deltatune
    dm.save_delta("out", format="peft")                            # deltatune -> PEFT
    export_merged(dm, "merged-model", tokenizer=tok)               # plain transformers dir
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from deltatune.interop.export import export_merged, save_peft, serving_notes
from deltatune.interop.peft_format import (
    MAPPINGS,
    PeftMapping,
    is_peft_directory,
    mapping_for_method,
    mapping_for_peft_type,
    read_peft_directory,
    register_mapping,
)

# PEFT task_type -> deltatune.models task, to load the base model a PEFT config names.
PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq-lm",
              "SEQ_CLS": "sequence-classification", "TOKEN_CLS": "token-classification",
              "FEATURE_EXTRACTION": "base"}


def load_peft(directory: str | Path, model: nn.Module | None = None, *,
              allow_pickle: bool = False, **load_kwargs: Any):
    """Load a Hugging Face PEFT adapter directory; return the :class:`DeltaModel`.

    With ``model`` the adapter goes onto it (wrapped if needed). Without, the base model
    is loaded offline from the config's ``base_model_name_or_path`` (a local directory
    or a deltatune built-in name) for its ``task_type``. ``allow_pickle`` admits a legacy
    ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``, with a warning).
    Other keyword arguments go to :meth:`DeltaModel.load_delta` (name, check_base, ...).
    """
    from deltatune.core.errors import ConfigError
    from deltatune.core.io import read_json
    from deltatune.core.model import DeltaModel

    directory = Path(directory)
    if not is_peft_directory(directory):
        raise ConfigError(f"{directory} is not a PEFT adapter directory (no "
                          f"adapter_config.json); use deltatune.load for deltatune deltas")
    if model is None:
        from deltatune import models

        config = read_json(directory / "adapter_config.json", what="PEFT adapter config")
        base = config.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{directory}/adapter_config.json names no base model "
                              f"(base_model_name_or_path); pass model=...", field="model")
        task = PEFT_TASKS.get(str(config.get("task_type")), "causal-lm")
        model, _tokenizer = models.load(base, task=task)
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    dm.load_delta(directory, allow_pickle=allow_pickle, **load_kwargs)
    return dm


__all__ = [
    "MAPPINGS",
    "PeftMapping",
    "export_merged",
    "is_peft_directory",
    "load_peft",
    "mapping_for_method",
    "mapping_for_peft_type",
    "read_peft_directory",
    "register_mapping",
    "save_peft",
    "serving_notes",
]
