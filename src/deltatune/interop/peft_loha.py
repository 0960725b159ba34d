"""LoHa (FedPara) between PEFT's ``peft_type: "LOHA"`` and deltatune's ``loha``.

Keys (after PEFT's ``base_model.model.`` prefix), for a d_out x d_in weight (a Conv2d
kernel flattened to d_out x (d_in * kh * kw)):

| PEFT | deltatune | relation |
|---|---|---|
| ``<m>.hada_w1_a`` (d_out x r) | ``<m>.hada_X1`` (d_out x r) | equal |
| ``<m>.hada_w1_b`` (r x d_in) | ``<m>.hada_Y1`` (d_in x r) | transposed |
| ``<m>.hada_w2_a`` | ``<m>.hada_X2`` | equal |
| ``<m>.hada_w2_b`` | ``<m>.hada_Y2`` | transposed |

PEFT: delta W = (w1_a w1_b) * (w2_a w2_b) * alpha / r; ours: (X1 Y1^T) * (X2 Y2^T) * s
with s = alpha / r, so ``alpha`` carries over. Refused: PEFT's effective-Conv2d (CP)
factors ``hada_t1``/``hada_t2``, per-module ranks or alphas (our LoHa has one rank), and
on writing our pFedPara mode (W1 * (W2 + 1) has no PEFT form). PEFT's rank and module
dropout act in training only; a loaded adapter computes the same outputs without them.
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
    group_by_module,
    peft_pattern_value,
    peft_targets,
    refuse_options,
    register_mapping,
    split_other_tensors,
)
from deltatune.methods.loha import LoHaConfig

# PEFT key suffix -> (our tensor name, transpose?)
KEYS = {"hada_w1_a": ("hada_X1", False), "hada_w1_b": ("hada_Y1", True),
        "hada_w2_a": ("hada_X2", False), "hada_w2_b": ("hada_Y2", True)}
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_effective_conv2d": ((), "effective-Conv2d (CP-decomposed) LoHa factors are not "
                                 "implemented in deltatune"),
}


def loha_from_peft(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Converted:
    """Turn a PEFT LoHa config and its (prefix-free) tensors into a deltatune LoHa delta."""
    refuse_options(peft_config, REFUSED, "adapter_config.json")
    for key in tensors:
        if key.rpartition(".")[2] in ("hada_t1", "hada_t2"):
            raise ConfigError("the adapter holds effective-Conv2d LoHa factors (hada_t1/t2), "
                              "which deltatune does not implement", field="use_effective_conv2d")
    groups, rest = group_by_module(tensors, KEYS, "a LoHa")
    r = int(peft_config.get("r", 8))
    alpha = peft_config.get("alpha", 8)
    ours: dict[str, torch.Tensor] = {}
    dims: dict[str, tuple[int | None, int | None]] = {}
    for loc, group in sorted(groups.items()):
        if set(group) != set(KEYS):
            raise AdapterFileCorrupt("adapter_model.safetensors", f"module {loc!r} lacks "
                                     f"{', '.join(sorted(set(KEYS) - set(group)))}")
        ranks = {group["hada_w1_a"].shape[1], group["hada_w1_b"].shape[0],
                 group["hada_w2_a"].shape[1], group["hada_w2_b"].shape[0]}
        if ranks != {r}:
            raise ConfigError(f"module {loc!r} has LoHa rank(s) {sorted(ranks)}, the config "
                              f"r={r}; per-module ranks (rank_pattern) are not supported by "
                              f"deltatune's LoHa", field="rank_pattern")
        if peft_pattern_value(peft_config.get("alpha_pattern") or {}, loc, alpha) != alpha:
            raise ConfigError(f"module {loc!r} has its own alpha (alpha_pattern); per-module "
                              f"alphas are not supported by deltatune's LoHa",
                              field="alpha_pattern")
        for leaf, (name, transpose) in KEYS.items():
            tensor = group[leaf]
            ours[f"{loc}.{name}"] = tensor.t().contiguous() if transpose else tensor
        dims[loc] = (int(group["hada_w1_b"].shape[1]), int(group["hada_w1_a"].shape[0]))
    copy_tensors, copies, base_copies = split_other_tensors(rest, peft_config)
    ours.update(copy_tensors)
    config = LoHaConfig(r=r, alpha=float(alpha), target_modules=sorted(groups),
                        modules_to_save=copies)
    return Converted(config, ours, dims, copies, base_copies)


def loha_to_peft(model: nn.Module, delta: AttachedDelta, tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (adapter_config.json dict, tensors by PEFT key) for an attached LoHa delta."""
    config = delta.config
    assert isinstance(config, LoHaConfig)
    if config.mode != "fedpara":
        raise ConfigError(f"LoHa mode {config.mode!r} (W1 * (W2 + 1)) has no Hugging Face PEFT "
                          f"form; save it with format='deltatune'.", field="mode")
    copies = list(delta.info.get("copies", []))
    layers = [loc for loc in delta.parts if loc not in copies]
    for loc in layers:
        if delta.parts[loc].kind == "conv1d":
            raise ConfigError(f"PEFT's LoHa does not wrap GPT-2 Conv1D layers ({loc}); save "
                              f"it with format='deltatune'.", field="target_modules")
    out: dict[str, torch.Tensor] = {}
    for loc in layers:
        for leaf, (name, transpose) in KEYS.items():
            tensor = tensors[f"{loc}.{name}"]
            out[f"{PEFT_PREFIX}{loc}.{leaf}"] = tensor.t().contiguous() if transpose else tensor
    out.update(copy_tensors_to_peft(tensors, copies))
    # PEFT's scale is alpha / r; ours is 1 when alpha is None, i.e. alpha = r.
    alpha = config.alpha if config.alpha is not None else float(config.r)
    return {
        **common_peft_config(model, "LOHA", copies),
        "r": config.r,
        "alpha": alpha,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "target_modules": peft_targets(model, layers),
        "init_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }, out


LOHA = register_mapping(PeftMapping("LOHA", "loha", loha_from_peft, loha_to_peft))
