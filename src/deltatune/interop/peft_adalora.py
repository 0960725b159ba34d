"""AdaLoRA between PEFT's ``peft_type: "ADALORA"`` and deltatune's ``adalora``.

Keys (after PEFT's ``base_model.model.`` prefix):

| PEFT | deltatune | shape |
|---|---|---|
| ``<m>.lora_A`` | ``<m>.lora_Q`` | r x d_in |
| ``<m>.lora_B`` | ``<m>.lora_P`` | d_out x r |
| ``<m>.lora_E`` | ``<m>.lora_Lambda`` | PEFT (r, 1), ours (r,) |

PEFT computes ``(x (A * E)^T B^T) * lora_alpha / (ranknum + 1e-5)`` with ``ranknum`` =
``init_r`` (fixed, not saved); ours ``s P diag(Lambda) Q x`` with ``s = lora_alpha /
init_r``. PEFT's 1e-5 is folded into Lambda (times ``init_r / (init_r + 1e-5)`` on
reading, the inverse on writing), so outputs agree to float precision. After training PEFT
saves only the kept triplets of each module and their positions in ``rank_pattern``
(``{"<m>.lora_E": [True, False, ...]}``, length ``init_r``); we put them back at those
positions with zero singular values elsewhere, which computes exactly the same. Writing
keeps the full ``init_r`` triplets (pruned ones have Lambda = 0) and no ``rank_pattern``.
The schedule fields (``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``,
``beta2``, ``orth_reg_weight``, ``total_step``) carry over by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.core.errors import AdapterFileCorrupt
from deltatune.core.registry import AttachedDelta
from deltatune.interop.peft_format import (
    PEFT_PREFIX,
    Converted,
    PeftMapping,
    common_peft_config,
    copy_tensors_to_peft,
    group_by_module,
    peft_targets,
    refuse_options,
    register_mapping,
    split_other_tensors,
)
from deltatune.methods.adalora import AdaLoraConfig

KEYS = {"lora_A": "lora_Q", "lora_B": "lora_P", "lora_E": "lora_Lambda"}
PEFT_RANK_EPS = 1e-5  # PEFT divides by (ranknum + 1e-5)


def _eps_factor(init_r: int) -> float:
    """Ours = PEFT's Lambda times this factor (PEFT's scale is alpha / (init_r + 1e-5))."""
    return init_r / (init_r + PEFT_RANK_EPS)
SCHEDULE = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
            "total_step", "lora_dropout")
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_dora": ((), "AdaLoRA with DoRA does not exist in deltatune"),
    "bias": (("none",), "bias training saves the base model's bias vectors"),
}


def _rank_masks(peft_config: dict[str, Any]) -> dict[str, list[bool]]:
    masks = {}
    for key, mask in (peft_config.get("rank_pattern") or {}).items():
        loc = key.removesuffix(".default").removesuffix(".lora_E")
        masks[loc] = [bool(m) for m in mask]
    return masks


def adalora_from_peft(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]
                      ) -> Converted:
    """Turn a PEFT AdaLoRA config and its (prefix-free) tensors into a deltatune delta."""
    refuse_options(peft_config, REFUSED, "adapter_config.json")
    init_r = int(peft_config.get("init_r", 12))
    masks = _rank_masks(peft_config)
    groups, rest = group_by_module(tensors, KEYS, "an AdaLoRA")
    ours: dict[str, torch.Tensor] = {}
    dims: dict[str, tuple[int | None, int | None]] = {}
    for loc, group in sorted(groups.items()):
        if set(group) != set(KEYS):
            raise AdapterFileCorrupt("adapter_model.safetensors", f"module {loc!r} lacks "
                                     f"{', '.join(sorted(set(KEYS) - set(group)))}")
        Q, P, E = group["lora_A"], group["lora_B"], group["lora_E"].reshape(-1)
        kept = Q.shape[0]
        if P.shape[1] != kept or E.numel() != kept:
            raise AdapterFileCorrupt("adapter_model.safetensors", f"module {loc!r}: lora_A "
                                     f"{list(Q.shape)}, lora_B {list(P.shape)} and lora_E "
                                     f"{list(group['lora_E'].shape)} disagree on the rank")
        mask = masks.get(loc, [True] * init_r)
        if len(mask) != init_r or sum(mask) != kept:
            raise AdapterFileCorrupt("adapter_model.safetensors",
                                     f"module {loc!r} keeps {kept} triplets but rank_pattern "
                                     f"marks {sum(mask)} of {len(mask)} (init_r={init_r})")
        positions = torch.tensor([i for i, m in enumerate(mask) if m], dtype=torch.long)
        full_Q = Q.new_zeros(init_r, Q.shape[1]).index_copy(0, positions, Q)
        full_P = P.new_zeros(P.shape[0], init_r).index_copy(1, positions, P)
        full_E = E.new_zeros(init_r).index_copy(0, positions, E * _eps_factor(init_r))
        ours[f"{loc}.lora_Q"], ours[f"{loc}.lora_P"], ours[f"{loc}.lora_Lambda"] = \
            full_Q, full_P, full_E
        dims[loc] = (int(Q.shape[1]), int(P.shape[0]))
    copy_tensors, copies, base_copies = split_other_tensors(rest, peft_config)
    ours.update(copy_tensors)
    alpha = peft_config.get("lora_alpha", 8)
    schedule = {k: peft_config[k] for k in SCHEDULE if peft_config.get(k) is not None}
    schedule["lora_dropout"] = float(schedule.get("lora_dropout", 0.0))
    for key in ("beta1", "beta2", "orth_reg_weight"):
        if key in schedule:
            schedule[key] = float(schedule[key])
    config = AdaLoraConfig(init_r=init_r,
                           lora_alpha=float(alpha) if alpha and alpha > 0 else None,
                           target_modules=sorted(groups), modules_to_save=copies, **schedule)
    return Converted(config, ours, dims, copies, base_copies)


def adalora_to_peft(model: nn.Module, delta: AttachedDelta, tensors: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (adapter_config.json dict, tensors by PEFT key) for an attached AdaLoRA delta."""
    config = delta.config
    assert isinstance(config, AdaLoraConfig)
    copies = list(delta.info.get("copies", []))
    layers = [loc for loc in delta.parts if loc not in copies]
    out: dict[str, torch.Tensor] = {}
    conv1d = False
    for loc in layers:
        conv1d = conv1d or delta.parts[loc].kind == "conv1d"
        out[f"{PEFT_PREFIX}{loc}.lora_A"] = tensors[f"{loc}.lora_Q"]
        out[f"{PEFT_PREFIX}{loc}.lora_B"] = tensors[f"{loc}.lora_P"]
        out[f"{PEFT_PREFIX}{loc}.lora_E"] = (tensors[f"{loc}.lora_Lambda"]
                                             / _eps_factor(config.init_r)).reshape(-1, 1)
    out.update(copy_tensors_to_peft(tensors, copies))
    # PEFT divides by init_r; with our lora_alpha=None (s = 1) that is alpha = init_r.
    alpha = config.lora_alpha if config.lora_alpha is not None else float(config.init_r)
    # PEFT insists on a positive total_step; any value past tinit + tfinal is valid here.
    total = config.total_step or config.tinit + config.tfinal + 1
    return {
        **common_peft_config(model, "ADALORA", copies),
        "init_r": config.init_r,
        "target_r": config.target_r,
        "lora_alpha": alpha,
        "lora_dropout": config.lora_dropout,
        "tinit": config.tinit,
        "tfinal": config.tfinal,
        "deltaT": config.deltaT,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "total_step": total,
        "rank_pattern": None,
        "target_modules": peft_targets(model, layers),
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "init_lora_weights": True,
    }, out


ADALORA = register_mapping(PeftMapping("ADALORA", "adalora", adalora_from_peft,
                                       adalora_to_peft))
