"""IA3 between PEFT's ``peft_type: "IA3"`` and deltatune's ``ia3``.

Keys (after PEFT's ``base_model.model.`` prefix):

| layer | PEFT ``<m>.ia3_l`` | deltatune ``<m>.ia3_l`` |
|---|---|---|
| output scaled | (d_out, 1) | (d_out,) |
| feed-forward (input scaled) | (1, d_in) | (d_in,) |
| fused q/k/v (GPT-2 ``c_attn``) | (3d, 1) | the 2d key/value entries |

Both compute ``y * l`` (output) or ``base(x * l)`` (feed-forward). PEFT's shape says
which one a vector is, so ``feedforward_modules`` is read from the tensors. On a fused
q/k/v layer PEFT scales the queries too while our IA3 (as the paper) scales keys and
values only: reading needs PEFT's query entries to be 1 (they are, unless trained), and
writing fills them with 1.
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
    peft_targets,
    register_mapping,
    split_other_tensors,
)
from deltatune.methods.ia3 import FFN, FUSED_KV, IA3, IA3Config, fused_kv_index


def ia3_from_peft(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Converted:
    """Turn a PEFT IA3 config and its (prefix-free) tensors into a deltatune IA3 delta."""
    ours: dict[str, torch.Tensor] = {}
    dims: dict[str, tuple[int | None, int | None]] = {}
    feedforward: list[str] = []
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.endswith(".ia3_l"):
            rest[key] = tensor
            continue
        loc = key.removesuffix(".ia3_l")
        if tensor.dim() != 2 or 1 not in tensor.shape:
            raise AdapterFileCorrupt("adapter_model.safetensors", f"IA3 vector of {loc!r} has "
                                     f"shape {list(tensor.shape)}, not (d_out, 1) or (1, d_in)")
        if tensor.shape[0] == 1 and tensor.shape[1] != 1:
            feedforward.append(loc)
            dims[loc] = (int(tensor.shape[1]), None)
        else:
            dims[loc] = (None, int(tensor.shape[0]))
        ours[key] = tensor.reshape(-1)
    if not ours:
        raise AdapterFileCorrupt("adapter_model.safetensors", "an IA3 adapter without any "
                                 "ia3_l tensor")
    copy_tensors, copies, base_copies = split_other_tensors(rest, peft_config)
    ours.update(copy_tensors)
    config = IA3Config(target_modules=sorted(dims), feedforward_modules=sorted(feedforward) or None,
                       modules_to_save=copies)
    return Converted(config, ours, dims, copies, base_copies)


def _roles(model: nn.Module, config: IA3Config) -> dict[str, str]:
    """The role our IA3 gives each target of ``config`` on ``model``."""
    method = IA3()
    method.select(model, config)
    return dict(method._roles)


def ia3_fit_to_model(model: nn.Module, converted: Converted) -> None:
    """Cut PEFT's full-length vectors of fused q/k/v layers down to our k/v entries.

    Refuses what our IA3 cannot express: trained query scales on a fused layer, or an
    output-scaled FFN down-projection when no feed-forward module is listed (our IA3
    would then scale that layer's input).
    """
    config = converted.config
    assert isinstance(config, IA3Config)
    roles = _roles(model, config)
    heads = int(getattr(getattr(model, "config", None), "num_attention_heads", 1) or 1)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    peft_ff = set(config.feedforward_modules or [])
    for loc, role in roles.items():
        key = f"{loc}.ia3_l"
        if role == FFN and loc not in peft_ff:
            raise ConfigError(f"PEFT scales the output of {loc!r}, which deltatune's IA3 "
                              f"takes for a feed-forward down-projection (input scaled); list "
                              f"at least one feed-forward module or load it with peft.",
                              field="feedforward_modules")
        if role == FUSED_KV:
            vector = converted.tensors[key]
            index = fused_kv_index(model_type, vector.numel(), heads)
            queries = torch.ones(vector.numel(), dtype=torch.bool)
            queries[index] = False
            if not torch.allclose(vector[queries].float(), torch.ones(1)):
                raise ConfigError(f"PEFT's IA3 vector of fused layer {loc!r} scales the queries "
                                  f"too (entries other than 1); deltatune's IA3 scales only keys "
                                  f"and values, as the paper does. Load it with peft.",
                                  field="target_modules")
            converted.tensors[key] = vector[index]


def ia3_to_peft(model: nn.Module, delta: AttachedDelta, tensors: dict[str, torch.Tensor]
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (adapter_config.json dict, tensors by PEFT key) for an attached IA3 delta."""
    copies = list(delta.info.get("copies", []))
    layers = {loc: part for loc, part in delta.parts.items() if loc not in copies}
    out: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    conv1d = False
    for loc, part in layers.items():
        vector = tensors[f"{loc}.ia3_l"]
        conv1d = conv1d or part.kind == "conv1d"
        if part.modifies_input:
            feedforward.append(loc)
            out[f"{PEFT_PREFIX}{loc}.ia3_l"] = vector.reshape(1, -1)
            continue
        if part.index is not None:  # fused q/k/v: queries keep scale 1
            full = torch.ones(part.d_out, dtype=vector.dtype)
            vector = full.index_copy(0, part.index.cpu(), vector.cpu())
        out[f"{PEFT_PREFIX}{loc}.ia3_l"] = vector.reshape(-1, 1)
    out.update(copy_tensors_to_peft(tensors, copies))
    targets = peft_targets(model, list(layers))
    ff_targets = _feedforward_names(targets, list(layers), feedforward)
    if ff_targets is None:  # leaf names cannot single out the feed-forward layers
        targets, ff_targets = list(layers), feedforward
    return {
        **common_peft_config(model, "IA3", copies),
        "target_modules": targets,
        "feedforward_modules": ff_targets,
        "fan_in_fan_out": conv1d,
        "init_ia3_weights": True,
    }, out


def _feedforward_names(targets: list[str], layers: list[str],
                       feedforward: list[str]) -> list[str] | None:
    """``feedforward_modules`` in the form of ``targets``, or None if that is not exact.

    PEFT marks a target feed-forward when its name ends with an entry (no dot rule).
    """
    if targets == layers:
        return list(feedforward)
    leaves = sorted({loc.rsplit(".", 1)[-1] for loc in feedforward})
    chosen = {loc for loc in layers if any(loc.endswith(leaf) for leaf in leaves)}
    return leaves if chosen == set(feedforward) else None


IA3_MAPPING = register_mapping(PeftMapping("IA3", "ia3", ia3_from_peft, ia3_to_peft,
                                           ia3_fit_to_model))
