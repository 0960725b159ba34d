"""BitFit: train the bias terms only (Ben Zaken et al. 2021, arXiv:2106.10199).

Every bias of the model (linear layers, GPT-2's Conv1D, layer norms) is trained; all
other weights stay frozen. The paper adds a task head trained in full: list it in
``modules_to_save``. Here each bias b0 gets a zero-initialised change db,

    y = W0 x + b0 + db,

so the model is exactly the base model at step 0, ``disabled()`` gives the base back,
and several BitFit deltas can live on one model. Saved: db per module (the trained bias
is b0 + db). Mergeable: b = b0 + db; unmerge restores b0 bit for bit.

Models without biases (Llama, T5) have nothing to train: that is an error, unless
``add_missing_biases=True``, which gives each bias-less linear layer a zero-initialised
bias (norms without a bias, such as RMSNorm, are left out: they have no shift to learn).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deltatune.core.config import DeltaConfig, TargetedConfig, param
from deltatune.core.errors import TargetError
from deltatune.core.layer_method import LayerMethod
from deltatune.core.layers import LayerDelta, is_norm
from deltatune.core.targets import LINEAR_TYPES, iter_candidate_modules, select_targets


@dataclasses.dataclass(kw_only=True)
class BitFitConfig(TargetedConfig):
    """BitFit: which biases to train (default: every bias of the model)."""

    method = "bitfit"

    add_missing_biases: bool = param(
        False, help="give bias-less linear layers a zero-initialised bias to train")


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


class BiasDelta(LayerDelta):
    """db for one linear, Conv1D or norm layer: y + db."""

    mergeable = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.bias_delta = nn.Parameter(torch.zeros(self.d_out))

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias_delta.to(y.dtype)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        # A bias-less layer gets the bias it learned (DeltaLayer.merge adds it).
        base_bias = bias if bias is not None else torch.zeros_like(self.bias_delta.float())
        return weight, base_bias + self.bias_delta.float()


class BitFit(LayerMethod):
    """BitFit: zero-initialised changes of the model's bias terms."""

    name = "bitfit"
    config_cls = BitFitConfig
    mergeable = True
    summary = "train the bias terms only (Ben Zaken et al. 2021)"

    def select(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        assert isinstance(config, BitFitConfig)
        candidates = [(n, m) for n, m in iter_candidate_modules(model)
                      if isinstance(m, LINEAR_TYPES) or is_norm(m)]
        if config.target_modules is None:
            names = [n for n, _ in candidates]
            if config.layers is not None or config.exclude_modules:
                names = select_targets(model, names, supported_types=_types(candidates),
                                       method=self.name, layers=config.layers,
                                       exclude_modules=config.exclude_modules)
        else:
            names = select_targets(model, config.target_modules,
                                   supported_types=_types(candidates), method=self.name,
                                   layers=config.layers, exclude_modules=config.exclude_modules)
        # A module trained in full (a task head) already trains its own bias.
        names = [n for n in names
                 if not any(_inside(n, p) for p in config.modules_to_save)]
        modules = dict(candidates)
        with_bias = [n for n in names if _has_bias(modules[n])]
        if config.add_missing_biases:
            with_bias = [n for n in names if _has_bias(modules[n])
                         or isinstance(modules[n], LINEAR_TYPES)]
        if not with_bias:
            raise TargetError(
                f"BitFit found no bias terms to train in {type(model).__name__}: its "
                f"{'selected ' if config.target_modules else ''}linear and norm layers have no "
                f"bias. Set add_missing_biases=True to give the linear layers zero-initialised "
                f"biases and train those.")
        return with_bias

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> BiasDelta:
        return BiasDelta(base)


def _inside(name: str, pattern: str) -> bool:
    """True when module path ``name`` is, or lies inside, a module matched by ``pattern``."""
    dotted = "." + name + "."
    return name == pattern or name.endswith("." + pattern) or f".{pattern}." in dotted


def _types(candidates: list[tuple[str, nn.Module]]) -> tuple[type[nn.Module], ...]:
    return tuple({type(m) for _, m in candidates}) or LINEAR_TYPES
