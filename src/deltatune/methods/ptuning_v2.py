"""P-tuning v2 (Liu et al., 2022, arXiv:2110.07602): deep prompt tuning for NLU.

Trainable prompts at every layer, as keys and values in front of each self-attention
(the same computation as prefix tuning), with the paper's choices:

* no reparameterisation by default (the paper: an MLP helps some tasks and hurts
  others; ``reparameterize=True`` turns it on);
* a randomly initialised linear head instead of a verbaliser: on the [CLS]/pooled
  output for classification, on every token for sequence labelling (NER with BIO
  tags). The head is the model's own ``classifier`` (BERT/RoBERTa
  ``...ForSequenceClassification``/``...ForTokenClassification``), trained and saved
  with the delta; ``head="none"`` leaves heads alone;
* multi-task: ``share_prompts_with="other"`` builds a delta whose prompts *are*
  delta "other"'s tensors (one set of prompts, a head per task); activate the delta
  of each batch's task and the shared prompts learn from all tasks.

Prompt length: the paper uses 20-100 for simple classification, up to 100+ for hard
sequence labelling. Saved: ``prefix`` (P x n_layers*2*d_kv) plus the head. Not mergeable.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from deltatune.core.config import DeltaConfig, param
from deltatune.core.errors import DeltaStateError, HyperparameterError
from deltatune.core.model_delta import HOLDER, ModelDelta, ModelDeltaMethod, attention_sites
from deltatune.core.registry import AttachedDelta
from deltatune.methods.prefix import PrefixKV


@dataclasses.dataclass(kw_only=True)
class PTuningV2Config(DeltaConfig):
    """P-tuning v2 hyperparameters."""

    method = "ptuning_v2"

    prompt_length: int = param(20, min=1, help="deep prompt length at every layer")
    reparameterize: bool = param(False, help="make the prompts with an MLP while training")
    reparam_hidden: int = param(512, min=1, help="MLP hidden width when reparameterised")
    head: Literal["auto", "none"] = param(
        "auto", help="'auto': train and save the model's `classifier` head if it has one")
    share_prompts_with: str | None = param(
        None, help="name of an attached ptuning_v2 delta whose prompts this one shares")


class PTuningV2(ModelDeltaMethod):
    """Deep prompts (key/value prefixes) at every layer plus a trained linear head."""

    name = "ptuning_v2"
    config_cls = PTuningV2Config
    summary = "deep prompts at every layer, no reparameterisation, linear head (Liu et al. 2022)"

    def build(self, model: nn.Module, config: DeltaConfig) -> ModelDelta:
        assert isinstance(config, PTuningV2Config)
        if config.head == "auto" and not config.modules_to_save and any(
                n == "classifier" for n, _ in model.named_children()):
            # The paper's linear head: the model's classifier, trained with the prompts.
            config.modules_to_save = ["classifier"]
        part = PrefixKV(attention_sites(model), config.prompt_length,
                        reparameterize=config.reparameterize, hidden=config.reparam_hidden)
        if config.share_prompts_with is not None:
            holder = getattr(model, HOLDER, None)
            other = holder[config.share_prompts_with] if (
                holder is not None and config.share_prompts_with in holder) else None
            if not isinstance(other, PrefixKV) or other.reparameterized or part.reparameterized:
                raise DeltaStateError(
                    f"share_prompts_with={config.share_prompts_with!r}: no attached ptuning_v2 "
                    f"delta of that name without reparameterisation; add it first")
            if other.prefix_weight.shape != part.prefix_weight.shape:
                raise HyperparameterError(
                    f"shared prompts have shape {tuple(other.prefix_weight.shape)}, this delta "
                    f"asks for {tuple(part.prefix_weight.shape)}; use the same prompt_length",
                    field="prompt_length")
            part.prefix_weight = other.prefix_weight  # the same tensor, not a copy
        return part

    def saved_config(self, delta: AttachedDelta) -> DeltaConfig:
        config = delta.config
        assert isinstance(config, PTuningV2Config)
        # Saved prompts are plain tensors: no MLP, no link to another delta.
        return config.replace(reparameterize=False, share_prompts_with=None)
