"""A base model's fingerprint, recorded when a delta is saved and checked when it is loaded.

It holds the model type, the architecture numbers of its config, the shape of every
targeted weight, and a few sampled weight values. Same shapes but different values (a
sibling fine-tune, another revision) are caught by the samples, compared within the
rounding of the coarser of the two dtypes, so a model loaded in bf16 still matches
its float32 original.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from deltatune.core.errors import BaseModelMismatchError

ARCH_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim", "n_embd",
    "n_layer", "n_head", "n_inner", "d_model", "d_ff", "d_kv", "num_layers",
    "num_decoder_layers", "num_heads", "encoder_layers", "decoder_layers", "ffn_dim",
    "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads", "word_embed_proj_dim",
    "tie_word_embeddings", "num_labels",
)
SAMPLES_PER_TENSOR = 16
# Every targeted tensor is sampled (up to this many, spread evenly), so a sibling that
# differs in a single targeted layer is caught, not only one differing in 3 of them.
SAMPLED_TENSORS = 256
_EPS = {"float32": 2.0**-20, "float64": 2.0**-20, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    try:
        return cfg.to_dict()
    except Exception:  # a non-HF config object
        return dict(vars(cfg))


def model_type(model: nn.Module) -> str:
    """Return ``config.model_type`` or, for a plain module, its class name."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def architecture(model: nn.Module) -> dict[str, Any]:
    """Return the architecture numbers of the model's config (JSON-ready)."""
    full = _config_dict(model)
    arch = {}
    for key in ARCH_KEYS:
        value = full.get(key)
        if isinstance(value, (int, float, str, bool)):
            arch[key] = value
    return arch


def recorded_weight(module: nn.Module) -> torch.Tensor | None:
    """Return the weight a fingerprint records for ``module``, or None if it has none.

    A weight stored packed or quantized (bitsandbytes 4-bit and 8-bit layers) stands in as
    an empty ``meta`` tensor of the layer's logical (out, in) shape: the storage's shape and
    bytes depend on the backend (bitsandbytes repacks a 4-bit weight on its first CPU
    forward), and an adapter trained on the float model must match the quantized one (and
    the other way round). Its values are not sampled.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    packed = hasattr(weight, "quant_state") or (
        not weight.is_floating_point() and weight.dtype not in (torch.bool,))
    shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if packed and all(isinstance(n, int) for n in shape):
        return torch.empty(shape, device="meta")
    return weight


def _sample(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    idx = torch.linspace(0, n - 1, steps=min(SAMPLES_PER_TENSOR, n)).round().long()
    # float32 positions round past the end above 2**24 elements (an 8B model's MLP weights);
    # clamping keeps every position that fingerprints already saved were sampled at
    idx.clamp_(max=n - 1)
    return [float(v) for v in flat[idx.to(flat.device)].float().cpu()]


def base_fingerprint(model: nn.Module, target_weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Return the fingerprint of ``model`` for a delta on ``target_weights`` (name -> weight)."""
    arch = architecture(model)
    names = sorted(target_weights)
    if len(names) <= SAMPLED_TENSORS:
        picks = names
    else:
        step = (len(names) - 1) / (SAMPLED_TENSORS - 1)
        picks = sorted({names[round(i * step)] for i in range(SAMPLED_TENSORS)})
    dtype = next(iter(target_weights.values())).dtype if target_weights else torch.float32
    return {
        "model_type": model_type(model),
        "class": type(model).__name__,
        "architecture": arch,
        "architecture_sha256": hashlib.sha256(
            json.dumps(arch, sort_keys=True).encode()).hexdigest(),
        "target_shapes": {n: list(target_weights[n].shape) for n in names},
        "weight_dtype": str(dtype).removeprefix("torch."),
        "weight_samples": {n: _sample(target_weights[n]) for n in picks[:SAMPLED_TENSORS]
                           if not target_weights[n].is_meta},
    }


def check_fingerprint(saved: dict[str, Any], model: nn.Module,
                      target_weights: dict[str, torch.Tensor], *, level: str,
                      source: str) -> None:
    """Raise :class:`BaseModelMismatchError` if ``model`` is not the base ``saved`` describes.

    ``level`` is ``"strict"`` (type, architecture, shapes and weight samples),
    ``"shapes"`` (all but the samples) or ``"off"``.
    """
    if level == "off" or not saved:
        return
    fix = ("load it onto the base model it was trained on, or pass check_base='shapes' "
           "(same architecture, different weights) or 'off' if you are sure")
    found_type = model_type(model)
    if saved.get("model_type") not in (None, found_type):
        raise BaseModelMismatchError(
            f"{source}: saved for model type {saved['model_type']!r}, this model is "
            f"{found_type!r}; {fix}.")
    arch = architecture(model)
    for key, expected in (saved.get("architecture") or {}).items():
        if key in arch and arch[key] != expected and key != "num_labels":
            raise BaseModelMismatchError(
                f"{source}: base model config {key} = {arch[key]!r}, but the delta was saved "
                f"for {key} = {expected!r}; {fix}.")
    shapes = saved.get("target_shapes") or {}
    for name, shape in shapes.items():
        if name not in target_weights:
            raise BaseModelMismatchError(
                f"{source}: the delta targets module {name!r}, which this model does not have; "
                f"{fix}.")
        found = list(target_weights[name].shape)
        if found != list(shape):
            raise BaseModelMismatchError(
                f"{source}: module {name!r} has weight shape {found}, the delta expects "
                f"{list(shape)}; {fix}.")
    if level != "strict":
        return
    saved_dtype = str(saved.get("weight_dtype", "float32"))
    for name, values in (saved.get("weight_samples") or {}).items():
        if name not in target_weights or target_weights[name].is_meta:
            continue  # packed quantized weights: shapes only (recorded_weight)
        weight = target_weights[name]
        eps = max(_EPS.get(saved_dtype, 2.0**-7),
                  _EPS.get(str(weight.dtype).removeprefix("torch."), 2.0**-7))
        found_values = _sample(weight)
        for a, b in zip(values, found_values, strict=False):
            if abs(a - b) > eps * max(abs(a), abs(b)) + 1e-12:
                raise BaseModelMismatchError(
                    f"{source}: module {name!r} has the expected shape but different weights "
                    f"(sampled value {b:.6g} where the delta's base had {a:.6g}): this is "
                    f"another checkpoint of the architecture (a sibling fine-tune or a "
                    f"different revision); {fix}.")
