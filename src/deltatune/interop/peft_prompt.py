"""Prompt tuning and prefix tuning between PEFT and deltatune.

| PEFT ``peft_type`` | PEFT ``prompt_embeddings`` | deltatune method: tensor |
|---|---|---|
| ``PROMPT_TUNING`` | (P * k, e) | ``prompt``: ``prompt`` (1, P, e) |
| ``PREFIX_TUNING`` | (P, L * 2 * kv) | ``prefix``: ``prefix`` (P, L * 2 * kv) |
| ``P_TUNING`` | (P * k, e) | ``ptuning`` (prefix placement): ``prompt`` (P, e) |

Prompt tuning: both prepend P vectors to the input embeddings. PEFT keeps k = 2 blocks
of P rows for encoder-decoder models (``num_transformer_submodules``) and prepends the
first block to the encoder input; we read that block and write it twice.

P-tuning: PEFT saves the prompt encoder's output (the bi-LSTM/MLP is a training device),
as we do, and prepends it; our ``placement="prefix"`` is that layout (templates with
anchor tokens have no PEFT form and are refused on writing).

Module copies (``modules_to_save``, and the classifier PEFT adds itself for ``SEQ_CLS``
and ``TOKEN_CLS``) move both ways as full copies of the module: PEFT's prompt-learning
model saves them as ``base_model.<module>.<param>`` (one level less than the tuner
methods' ``base_model.model.``).

Prefix tuning: both hold, per prefix position, [layer 0 keys, layer 0 values, layer 1
keys, ...] with each block kv_heads x head_dim wide, so the matrix moves unchanged (PEFT
saves the computed prefix, as we do, whether or not it was reparameterised). One
difference in behaviour, not in weights: PEFT hands the prefix to the model as a
key/value cache, which also shifts the real tokens' positions by P; deltatune keeps
positions 0..n-1 (the paper's setting). Pass ``position_ids = arange(P, P + n)`` to
reproduce PEFT's outputs exactly. Encoder-decoder prefixes (PEFT's decoder layout with
cross-attention) are not mapped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.core.errors import AdapterFileCorrupt, BaseModelMismatchError, ConfigError
from deltatune.core.model_delta import attention_sites
from deltatune.core.registry import AttachedDelta
from deltatune.interop.peft_format import (
    Converted,
    PeftMapping,
    common_peft_config,
    copy_tensors_to_peft,
    register_mapping,
    split_other_tensors,
)
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.ptuning import PTuningConfig

KEY = "prompt_embeddings"
PROMPT_PREFIX = "base_model."


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _take(tensors: dict[str, torch.Tensor], what: str) -> tuple[torch.Tensor,
                                                                  dict[str, torch.Tensor]]:
    if KEY not in tensors:
        raise AdapterFileCorrupt("adapter_model.safetensors", f"a {what} adapter without "
                                 f"{KEY!r}")
    # PEFT's prompt-learning model holds the HF model as `base_model` (one level less than
    # the tuner methods), so module copies are saved as `base_model.<module>...`.
    rest = {k.removeprefix(PROMPT_PREFIX): v for k, v in tensors.items() if k != KEY}
    return tensors[KEY], rest


def prompt_from_peft(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]
                     ) -> Converted:
    """Turn a PEFT prompt-tuning adapter into a deltatune ``prompt`` delta."""
    embeddings, rest = _take(tensors, "prompt-tuning")
    length = int(peft_config.get("num_virtual_tokens") or 0)
    if embeddings.dim() != 2 or length < 1 or embeddings.shape[0] % length:
        raise AdapterFileCorrupt("adapter_model.safetensors",
                                 f"{KEY} has shape {list(embeddings.shape)}, not a multiple of "
                                 f"num_virtual_tokens={length} rows")
    copy_tensors, copies, base_copies = split_other_tensors(rest, peft_config)
    config = PromptTuningConfig(prompt_length=length, init="random", modules_to_save=copies)
    ours = {"prompt": embeddings[:length].unsqueeze(0).contiguous(), **copy_tensors}
    return Converted(config, ours, {}, copies, base_copies)


def _check_embedding_width(model: nn.Module, prompt: torch.Tensor, what: str) -> None:
    width = model.get_input_embeddings().embedding_dim
    if prompt.shape[-1] != width:
        raise BaseModelMismatchError(f"the {what} is {prompt.shape[-1]} wide but this model's "
                                     f"embeddings are {width} wide (another hidden size?); "
                                     f"load it onto the base model it was trained on.")


def prompt_fit_to_model(model: nn.Module, converted: Converted) -> None:
    """Check the prompt width against the model's embedding width."""
    _check_embedding_width(model, converted.tensors["prompt"], "soft prompt")


def prompt_to_peft(model: nn.Module, delta: AttachedDelta, tensors: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (adapter_config.json dict, tensors) for an attached prompt-tuning delta."""
    config = delta.config
    assert isinstance(config, PromptTuningConfig)
    prompt = tensors["prompt"]
    if prompt.shape[0] != 1:
        raise ConfigError(f"a prompt ensemble (num_prompts={prompt.shape[0]}) has no PEFT form; "
                          f"save it with format='deltatune'.", field="num_prompts")
    blocks = 2 if _is_encoder_decoder(model) else 1
    copies, out = _copies_to_peft(delta, tensors)
    out[KEY] = prompt[0].repeat(blocks, 1).contiguous()
    return {
        **_prompt_config(model, "PROMPT_TUNING", copies),
        "num_virtual_tokens": int(prompt.shape[1]),
        "prompt_tuning_init": "RANDOM",
        **_FILLED_BY_PEFT,
    }, out


# PEFT fills these from the model when it loads the adapter.
_FILLED_BY_PEFT = {"token_dim": None, "num_layers": None, "num_attention_heads": None,
                   "num_transformer_submodules": None}


def _prompt_config(model: nn.Module, peft_type: str, copies: list[str]) -> dict[str, Any]:
    config = common_peft_config(model, peft_type, copies)
    config.pop("exclude_modules")  # a field of the tuner methods only
    return config


def prefix_from_peft(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]
                     ) -> Converted:
    """Turn a PEFT prefix-tuning adapter into a deltatune ``prefix`` delta."""
    if peft_config.get("task_type") == "SEQ_2_SEQ_LM" or \
            (peft_config.get("num_transformer_submodules") or 1) > 1:
        raise ConfigError("PEFT prefix tuning of encoder-decoder models is not mapped to "
                          "deltatune (its decoder layout differs); load it with peft.",
                          field="task_type")
    embeddings, rest = _take(tensors, "prefix-tuning")
    length = int(peft_config.get("num_virtual_tokens") or 0)
    if embeddings.dim() != 2 or embeddings.shape[0] != length:
        raise AdapterFileCorrupt("adapter_model.safetensors",
                                 f"{KEY} has shape {list(embeddings.shape)}, expected "
                                 f"num_virtual_tokens={length} rows")
    copy_tensors, copies, base_copies = split_other_tensors(rest, peft_config)
    config = PrefixTuningConfig(prefix_length=length, reparameterize=False,
                                modules_to_save=copies)
    return Converted(config, {"prefix": embeddings, **copy_tensors}, {}, copies, base_copies)


def prefix_fit_to_model(model: nn.Module, converted: Converted) -> None:
    """Check the prefix width against the model's attention layers."""
    if _is_encoder_decoder(model):
        raise ConfigError("PEFT prefix tuning of encoder-decoder models is not mapped to "
                          "deltatune; load it with peft.", field="task_type")
    sites = attention_sites(model)
    width = sum(2 * s.kv_dim for s in sites)
    found = converted.tensors["prefix"].shape[-1]
    if found != width:
        raise BaseModelMismatchError(
            f"the prefix is {found} wide but this model's {len(sites)} attention layers need "
            f"{width} (2 x {sites[0].kv_dim} each); load it onto the base model it was "
            f"trained on.")


def prefix_to_peft(model: nn.Module, delta: AttachedDelta, tensors: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (adapter_config.json dict, tensors) for an attached prefix-tuning delta."""
    config = delta.config
    assert isinstance(config, PrefixTuningConfig)
    if config.mode != "prefix" or config.cross_attention or _is_encoder_decoder(model):
        raise ConfigError("only decoder-only prefix tuning in 'prefix' mode has a PEFT form; "
                          "save it with format='deltatune'.", field="mode")
    copies, out = _copies_to_peft(delta, tensors)
    prefix = tensors["prefix"]
    return {
        **_prompt_config(model, "PREFIX_TUNING", copies),
        "num_virtual_tokens": int(prefix.shape[0]),
        "prefix_projection": False,
        "encoder_hidden_size": None,
        **_FILLED_BY_PEFT,
    }, {**out, KEY: prefix}


def _copies_to_peft(delta: AttachedDelta, tensors: dict[str, torch.Tensor]
                    ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The delta's module copies (``modules_to_save``) and their tensors under PEFT's
    prompt-learning keys (``base_model.<module>.<param>``)."""
    copies = sorted(delta.info.get("copies", []))
    return copies, copy_tensors_to_peft(tensors, copies, prefix=PROMPT_PREFIX)


def ptuning_from_peft(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]
                      ) -> Converted:
    """Turn a PEFT P-tuning adapter into a deltatune ``ptuning`` delta (prefix placement)."""
    converted = prompt_from_peft(peft_config, tensors)
    length = converted.config.prompt_length
    converted.config = PTuningConfig(prompt_length=length, encoder="none", placement="prefix",
                                     modules_to_save=converted.copies)
    converted.tensors = {**converted.tensors, "prompt": converted.tensors["prompt"][0]}
    return converted


def ptuning_fit_to_model(model: nn.Module, converted: Converted) -> None:
    """Check the prompt width against the model's embedding width."""
    _check_embedding_width(model, converted.tensors["prompt"], "P-tuning prompt")


def ptuning_to_peft(model: nn.Module, delta: AttachedDelta, tensors: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (adapter_config.json dict, tensors) for an attached P-tuning delta."""
    config = delta.config
    assert isinstance(config, PTuningConfig)
    if config.placement != "prefix":
        raise ConfigError("a P-tuning template (prompts among anchor tokens) has no PEFT form: "
                          "PEFT prepends the prompts. Use placement='prefix' or save it with "
                          "format='deltatune'.", field="placement")
    copies, out = _copies_to_peft(delta, tensors)
    prompt = tensors["prompt"]
    blocks = 2 if _is_encoder_decoder(model) else 1
    return {
        **_prompt_config(model, "P_TUNING", copies),
        "num_virtual_tokens": int(prompt.shape[0]),
        "encoder_reparameterization_type": "MLP",
        "encoder_hidden_size": int(prompt.shape[1]),
        "encoder_num_layers": 2,
        "encoder_dropout": 0.0,
        **_FILLED_BY_PEFT,
    }, {**out, KEY: prompt.repeat(blocks, 1).contiguous()}


PTUNING = register_mapping(PeftMapping("P_TUNING", "ptuning", ptuning_from_peft,
                                       ptuning_to_peft, ptuning_fit_to_model))
PROMPT = register_mapping(PeftMapping("PROMPT_TUNING", "prompt", prompt_from_peft,
                                      prompt_to_peft, prompt_fit_to_model))
PREFIX = register_mapping(PeftMapping("PREFIX_TUNING", "prefix", prefix_from_peft,
                                      prefix_to_peft, prefix_fit_to_model))
