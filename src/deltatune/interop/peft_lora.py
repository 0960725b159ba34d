"""LoRA (and rsLoRA) between PEFT's ``peft_type: "LORA"`` and deltatune's ``lora``.

Keys (after PEFT's ``base_model.model.`` prefix):

| PEFT | deltatune | shape |
|---|---|---|
| ``<m>.lora_A.weight`` (linear, Conv1D) | ``<m>.lora_A`` | r x d_in |
| ``<m>.lora_B.weight`` | ``<m>.lora_B`` | d_out x r |
| ``<m>.lora_embedding_A`` (embedding) | ``<m>.lora_A`` | r x vocab |
| ``<m>.lora_embedding_B`` | ``<m>.lora_B`` | dim x r |
| ``<m>.<param>`` for ``m`` in ``modules_to_save`` | ``<m>.<param>`` | as the module |

Both compute ``W0 x + s B A x`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``), so the tensors move unchanged. Targets are read from the tensor keys
(exact module paths), ranks from the tensor shapes, alphas by PEFT's own pattern rule.
Options that change the math in a way deltatune does not implement (DoRA, trained
biases, base-weight-rewriting initialisations, ...) are refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.core.errors import AdapterFileCorrupt, ConfigError
from deltatune.core.registry import AttachedDelta
from deltatune.interop.peft_format import (
    PEFT_PREFIX,
    Converted,
    PeftMapping,
    common_peft_config,
    copy_tensors_to_peft,
    peft_pattern_value,
    peft_targets,
    refuse_options,
    register_mapping,
    split_other_tensors,
)
from deltatune.methods.lora import LoraConfig, _pattern_value

_BASE_CHANGING = "it trains from a rewritten base weight (the residual of W0), so the adapter " \
                 "only reproduces its outputs on that rewritten base"
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_dora": ((), "DoRA (weight-decomposed LoRA) is not implemented in deltatune yet"),
    "bias": (("none",), "bias training saves the base model's bias vectors; use bias='none'"),
    "lora_bias": ((), "LoRA's B bias is not implemented in deltatune"),
    "init_lora_weights": ((True, "gaussian", "eva", "orthogonal"),
                          f"this initialisation ({_BASE_CHANGING}) is not reproducible"),
    "layer_replication": ((), "layer replication changes the model's layer stack"),
    "use_qalora": ((), "QALoRA needs a quantised base model"),
    "alora_invocation_tokens": ((), "activated LoRA (aLoRA) is not implemented"),
    "trainable_token_indices": ((), "trainable tokens are not implemented"),
    "target_parameters": ((), "LoRA on bare nn.Parameters (MoE experts) is not implemented"),
    "megatron_config": ((), "Megatron parallel layers are not supported"),
    "use_bdlora": ((), "BD-LoRA is not implemented"),
    "arrow_config": ((), "Arrow routing is not implemented"),
}
_SUFFIXES = (
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora_embedding_A", "A"), (".lora_embedding_B", "B"),
)


def lora_from_peft(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Converted:
    """Turn a PEFT LoRA config and its (prefix-free) tensors into a deltatune LoRA delta."""
    refuse_options(peft_config, REFUSED, "adapter_config.json")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in key:
            raise ConfigError("the adapter holds DoRA magnitude vectors; DoRA is not "
                              "implemented in deltatune yet", field="use_dora")
        if key.endswith(".lora_B.bias"):
            raise ConfigError("the adapter holds LoRA B biases (lora_bias=True), which "
                              "deltatune does not implement", field="lora_bias")
        for suffix, slot in _SUFFIXES:
            if key.endswith(suffix):
                pairs.setdefault(key[:-len(suffix)], {})[slot] = tensor
                break
        else:
            rest[key] = tensor
    if not pairs:
        raise AdapterFileCorrupt("adapter_model.safetensors", "a LoRA adapter without any "
                                 "lora_A/lora_B tensor")
    r_default = peft_config.get("r", 8)
    alpha_default = peft_config.get("lora_alpha", 8)
    rank_pattern_in = peft_config.get("rank_pattern") or {}
    alpha_pattern_in = peft_config.get("alpha_pattern") or {}
    ours: dict[str, torch.Tensor] = {}
    dims: dict[str, tuple[int, int]] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for loc, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            have = "lora_A" if "A" in pair else "lora_B"
            raise AdapterFileCorrupt("adapter_model.safetensors",
                                     f"module {loc!r} has {have} but not its partner")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFileCorrupt("adapter_model.safetensors",
                                     f"module {loc!r}: lora_A {list(A.shape)} and lora_B "
                                     f"{list(B.shape)} are not r x d_in and d_out x r")
        r = int(A.shape[0])
        r_config = peft_pattern_value(rank_pattern_in, loc, r_default)
        if r_config != r:
            raise AdapterFileCorrupt("adapter_model.safetensors",
                                     f"module {loc!r} has rank {r} in its tensors but "
                                     f"{r_config} in adapter_config.json")
        if r != r_default:
            rank_pattern[loc] = r
        alpha = peft_pattern_value(alpha_pattern_in, loc, alpha_default)
        if alpha != alpha_default:
            alpha_pattern[loc] = float(alpha)
        ours[f"{loc}.lora_A"], ours[f"{loc}.lora_B"] = A, B
        dims[loc] = (int(A.shape[1]), int(B.shape[0]))
    copy_tensors, copies, base_copies = split_other_tensors(rest, peft_config)
    ours.update(copy_tensors)
    config = LoraConfig(
        r=int(r_default), lora_alpha=float(alpha_default),
        lora_dropout=float(peft_config.get("lora_dropout") or 0.0),
        use_rslora=bool(peft_config.get("use_rslora", False)),
        target_modules=sorted(pairs), modules_to_save=copies,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return Converted(config, ours, dims, copies, base_copies)


def lora_to_peft(model: nn.Module, delta: AttachedDelta, tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (adapter_config.json dict, tensors by PEFT key) for an attached LoRA delta."""
    config = delta.config
    assert isinstance(config, LoraConfig)
    copies = list(delta.info.get("copies", []))
    layers = {loc: part for loc, part in delta.parts.items() if loc not in copies}
    out: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    conv1d = False
    for loc, part in layers.items():
        embedding = part.kind == "embedding"
        conv1d = conv1d or part.kind == "conv1d"
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else \
            ("lora_A.weight", "lora_B.weight")
        out[f"{PEFT_PREFIX}{loc}.{names[0]}"] = tensors[f"{loc}.lora_A"]
        out[f"{PEFT_PREFIX}{loc}.{names[1]}"] = tensors[f"{loc}.lora_B"]
        if part.r != config.r:
            rank_pattern[loc] = part.r
        alpha = _pattern_value(config.alpha_pattern, loc, config.lora_alpha)
        if alpha != config.lora_alpha:
            alpha_pattern[loc] = alpha
    out.update(copy_tensors_to_peft(tensors, copies))
    peft_config = {
        **common_peft_config(model, "LORA", copies),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "target_modules": peft_targets(model, list(layers)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return peft_config, out


LORA = register_mapping(PeftMapping("LORA", "lora", lora_from_peft, lora_to_peft))
