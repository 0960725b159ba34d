"""MAM adapter ("mix-and-match", He et al. 2022, arXiv:2110.04366): one delta, two parts.

He et al. combine the best choice found for each sub-layer in their unified view:

* on the attention heads, prefix tuning with a small prefix (l = 30): trainable keys and
  values P_k, P_v in front of every self-attention layer's own (in the unified view a
  gated parallel modification of the head output, (1 - lambda(x)) h + lambda(x) delta);
* on the FFN, a scaled parallel adapter with a large bottleneck (m = 512, s = 4):
  h <- FFN(x) + s ReLU(x W_down + b_down) W_up + b_up.

The two are one delta: added, activated, saved, loaded and deleted together. The prefix
part is prefix tuning's own module (:mod:`deltatune.methods.prefix`, with its MLP
reparameterisation during training), the FFN part the parallel adapter's
(:mod:`deltatune.methods.parallel_adapter`); this file only composes them.

Saved: the computed prefix (``prefix.prefix``, the MLP is dropped as for prefix tuning)
and W_down, W_up per FFN. Not mergeable. Not the identity at init: the random prefix
changes attention from step 0, as in prefix tuning (the adapter starts at W_up = 0).
Paper: with about 6.7% of the parameters MAM comes close to full fine-tuning on XSum,
WMT en-ro, MNLI and SST-2.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from deltatune.core.config import DeltaConfig, param
from deltatune.core.model_delta import ModelDelta
from deltatune.core.registry import AttachedDelta, DeltaMethod
from deltatune.methods.parallel_adapter import ParallelAdapter, ParallelAdapterConfig
from deltatune.methods.prefix import PrefixTuning, PrefixTuningConfig
from deltatune.methods.unified import Activation

PREFIX_KEY = "prefix."


@dataclasses.dataclass(kw_only=True)
class MamConfig(DeltaConfig):
    """MAM adapter: prefix on attention + scaled parallel adapter on the FFN (paper values)."""

    method = "mam"

    prefix_length: int = param(30, min=1, help="l, prefix vectors per attention layer")
    reparameterize: bool = param(True, help="P = MLP(P') during training (prefix tuning's trick)")
    reparam_hidden: int = param(512, min=1, help="hidden width of the prefix MLP")
    cross_attention: bool = param(False, help="also prefix the decoder's cross-attention")
    bottleneck_size: int = param(512, min=1, help="m of the FFN adapter")
    scaling: float = param(4.0, gt=0, help="s of the FFN adapter")
    activation: Activation | None = param("relu", help="nonlinearity of the FFN adapter")
    adapter_dropout: float = param(0.0, min=0.0, lt=1.0, help="dropout on the adapter input")
    layers: list[int] | None = param(None, help="FFN adapter only in these layers (0-based)")
    site_modules: dict[str, list[str]] | None = param(
        None, help="by-hand FFN location: {'ffn': [first module, last module]}")

    def prefix_config(self) -> PrefixTuningConfig:
        """Return the config of the attention part."""
        return PrefixTuningConfig(prefix_length=self.prefix_length,
                                  reparameterize=self.reparameterize,
                                  reparam_hidden=self.reparam_hidden,
                                  cross_attention=self.cross_attention)

    def adapter_config(self) -> ParallelAdapterConfig:
        """Return the config of the FFN part."""
        return ParallelAdapterConfig(modified_representation=["ffn"],
                                     bottleneck_size=self.bottleneck_size, scaling=self.scaling,
                                     activation=self.activation,
                                     adapter_dropout=self.adapter_dropout, layers=self.layers,
                                     site_modules=self.site_modules)

    def dimensions(self) -> dict[str, dict[str, Any]]:
        """Return the unified view's choices of each part (attention and FFN)."""
        return {
            "attention": {"functional_form": "prefix", "insertion": "parallel",
                          "modified_representation": ["attention heads"],
                          "composition": "gate", "prefix_length": self.prefix_length},
            "ffn": self.adapter_config().dimensions(),
        }

    def check(self) -> None:
        super().check()
        # Build both parts' configs now, so their checks run when this one is made.
        self.prefix_config()
        self.adapter_config()


class Mam(DeltaMethod):
    """MAM adapter: a prefix-tuning part and a parallel-adapter part as one delta."""

    name = "mam"
    config_cls = MamConfig
    identity_at_init = False
    summary = "prefix on attention + scaled parallel FFN adapter, one delta (He et al. 2022)"

    def __init__(self) -> None:
        self.prefix = PrefixTuning()
        self.adapter = ParallelAdapter()

    def _split(self, delta: AttachedDelta) -> tuple[AttachedDelta, AttachedDelta]:
        """Return the delta's prefix part and adapter part as deltas of their own methods."""
        assert isinstance(delta.config, MamConfig)
        prefix = {k: v for k, v in delta.parts.items() if isinstance(v, ModelDelta)}
        adapter = {k: v for k, v in delta.parts.items() if k not in prefix}
        return (AttachedDelta(delta.name, delta.config.prefix_config(), self.prefix, prefix),
                AttachedDelta(delta.name, delta.config.adapter_config(), self.adapter, adapter))

    def attach(self, model: nn.Module, name: str, config: DeltaConfig) -> dict[str, nn.Module]:
        assert isinstance(config, MamConfig)
        prefix_parts = self.prefix.attach(model, name, config.prefix_config())
        try:
            adapter_parts = self.adapter.attach(model, name, config.adapter_config())
        except BaseException:
            self.prefix.detach(model, AttachedDelta(name, config.prefix_config(), self.prefix,
                                                    prefix_parts))
            raise
        return {**prefix_parts, **adapter_parts}

    def detach(self, model: nn.Module, delta: AttachedDelta) -> None:
        prefix, adapter = self._split(delta)
        self.adapter.detach(model, adapter)
        self.prefix.detach(model, prefix)

    def set_active(self, model: nn.Module, delta: AttachedDelta, active: bool) -> None:
        prefix, adapter = self._split(delta)
        self.prefix.set_active(model, prefix, active)
        self.adapter.set_active(model, adapter, active)

    def set_disabled(self, model: nn.Module, delta: AttachedDelta, disabled: bool) -> None:
        prefix, adapter = self._split(delta)
        self.prefix.set_disabled(model, prefix, disabled)
        self.adapter.set_disabled(model, adapter, disabled)

    def saved_tensors(self, model: nn.Module, delta: AttachedDelta) -> dict[str, Any]:
        prefix, adapter = self._split(delta)
        out = {PREFIX_KEY + k: v for k, v in self.prefix.saved_tensors(model, prefix).items()}
        out.update(self.adapter.saved_tensors(model, adapter))
        return out

    def load_saved_tensors(self, model: nn.Module, delta: AttachedDelta,
                           tensors: dict[str, Any]) -> None:
        prefix, adapter = self._split(delta)
        self.prefix.load_saved_tensors(model, prefix, {
            k.removeprefix(PREFIX_KEY): v for k, v in tensors.items() if k.startswith(PREFIX_KEY)})
        self.adapter.load_saved_tensors(model, adapter, {
            k: v for k, v in tensors.items() if not k.startswith(PREFIX_KEY)})

    def saved_config(self, delta: AttachedDelta) -> DeltaConfig:
        # What is saved is P itself, so the saved delta has no MLP (as for prefix tuning).
        assert isinstance(delta.config, MamConfig)
        return delta.config.replace(reparameterize=False)
