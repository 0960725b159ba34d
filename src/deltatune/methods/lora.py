"""LoRA: low-rank adaptation (Hu et al., 2021, arXiv:2106.09685).

A frozen weight W0 (d_out x d_in) gets a trainable low-rank change:

    h = W0 x + s * B A dropout(x),    A: r x d_in,  B: d_out x r,  s = alpha / r

(rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r), which keeps the update's scale stable
as r grows.) A starts random (Kaiming-uniform as ``nn.Linear`` does, or Gaussian with
std 1/r) and B starts at zero, so the adapted model equals the base model at step 0.

On an embedding the same idea acts on the one-hot input: A is r x vocab and the
lookup of a token id reads a column of A. Saved: A and B per target. Mergeable:
W = W0 + s B A, and unmerge restores W0 (bit for bit, from the kept original).
The paper adapts W_q and W_v; that is the default here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.core.blocks import layout_for, present
from deltatune.core.config import DeltaConfig, TargetedConfig, param
from deltatune.core.errors import HyperparameterError
from deltatune.core.layer_method import LayerMethod
from deltatune.core.layers import LayerDelta
from deltatune.kernels import fast_path_enabled
from deltatune.kernels.lora_linear import lora_linear
from deltatune.kernels.multi_lora import AdapterBank


@dataclasses.dataclass(kw_only=True)
class LoraConfig(TargetedConfig):
    """LoRA hyperparameters (defaults follow the paper: r=8, alpha=8, W_q and W_v)."""

    method = "lora"

    r: int = param(8, min=1, help="rank of the update")
    lora_alpha: float = param(8.0, gt=0, help="scale numerator: s = alpha / r")
    lora_dropout: float = param(0.0, min=0.0, lt=1.0, help="dropout on the adapter's input")
    use_rslora: bool = param(False, help="rank-stabilised scale s = alpha / sqrt(r)")
    init: Literal["kaiming", "gaussian"] = param("kaiming", help="initialisation of A (B is 0)")
    rank_pattern: dict[str, int] = param(
        default_factory=dict, help="per-module rank: {name suffix or 're:regex': r}")
    alpha_pattern: dict[str, float] = param(
        default_factory=dict, help="per-module alpha: {name suffix or 're:regex': alpha}")

    def check(self) -> None:
        super().check()
        for key, value in {**self.rank_pattern}.items():
            if value < 1:
                raise HyperparameterError(f"rank_pattern[{key!r}] = {value} must be >= 1",
                                          field="rank_pattern")
        for key, value in self.alpha_pattern.items():
            if value <= 0:
                raise HyperparameterError(f"alpha_pattern[{key!r}] = {value} must be > 0",
                                          field="alpha_pattern")


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if key.startswith("re:"):
            if re.fullmatch(key[3:], module_name):
                return value
        elif module_name == key or module_name.endswith("." + key):
            return value
    return default


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """Return LoRA's output scale: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


_SERIALS = itertools.count()


class LoraDelta(LayerDelta):
    """A and B for one linear, Conv1D or embedding layer."""

    mergeable = True

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float,
                 rslora: bool, init: str, module_name: str) -> None:
        super().__init__(base)
        limit = min(self.d_in, self.d_out)
        if r > limit:
            raise HyperparameterError(
                f"LoRA rank r={r} is larger than min(d_in, d_out) = min({self.d_in}, "
                f"{self.d_out}) = {limit} of module {module_name!r}; a rank above that adds "
                f"parameters but no expressiveness. Use r <= {limit} (rank_pattern can set "
                f"it for this module alone).", field="r")
        self.r = r
        self.scale = lora_scale(alpha, r, rslora)
        # Unique per delta object: caches of stacked adapters (kernels.multi_lora) key on it.
        self.serial = next(_SERIALS)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, r))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A, self.lora_B
        if self.kind == "embedding":
            # Row `id` of A^T is the rank-r code of token `id`.
            hidden = F.embedding(x, A.t())
        else:
            hidden = self.dropout(x.to(A.dtype)) @ A.t()
        return y + (hidden @ B.t() * self.scale).to(y.dtype)

    def _fast_ok(self, base: nn.Module, x: torch.Tensor) -> bool:
        """True when the fused kernels (deltatune.kernels) compute this layer's output."""
        # A subclass that changes the math (post_forward) keeps the plain path.
        return (type(self).post_forward is LoraDelta.post_forward
                and self.kind in ("linear", "conv1d") and fast_path_enabled(x)
                and (isinstance(self.dropout, nn.Identity) or not self.training)
                and x.dtype == base.weight.dtype and x.dtype.is_floating_point
                and not base._forward_hooks and not base._forward_pre_hooks
                # A subclass with its own forward (a fake-quantized QAT layer) is not x W^T + b.
                and type(base).forward in (nn.Linear.forward, Conv1D.forward)
                # Under autocast the plain path lets autocast pick the dtypes.
                and not torch.is_autocast_enabled(x.device.type))

    def fast_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Base output plus the LoRA term through one fused autograd Function, or None."""
        if not self._fast_ok(base, x):
            return None
        weight = base.weight.t() if self.kind == "conv1d" else base.weight
        return lora_linear(x, weight, base.bias, self.lora_A, self.lora_B, self.scale)

    @classmethod
    def _bank(cls, owner: nn.Module) -> AdapterBank:
        bank = owner.__dict__.get("_lora_bank")
        if bank is None:
            bank = owner.__dict__["_lora_bank"] = AdapterBank()
        return bank

    @classmethod
    def fast_forward_rows(cls, owner: nn.Module, deltas: dict[str, LayerDelta],
                          rows: Sequence[str | None], x: torch.Tensor) -> torch.Tensor | None:
        """Mixed-adapter batch with the base matmul in the same kernels (Triton BGMV), or None.

        Only for few tokens outside autograd (decoding); see ``AdapterBank.fused``.
        """
        loras = list(deltas.values())
        first = loras[0]
        base = owner.base
        if not first._fast_ok(base, x) or first.training:
            return None
        weight = base.weight.t() if first.kind == "conv1d" else base.weight
        position = {n: i for i, n in enumerate(deltas)}
        return cls._bank(owner).fused(
            list(deltas), lambda: [d.lora_A for d in loras], lambda: [d.lora_B for d in loras],
            [d.scale for d in loras], [position[n] if n is not None else -1 for n in rows],
            x, weight, base.bias, keys=tuple(d.serial for d in loras))

    @classmethod
    def post_forward_rows(cls, owner: nn.Module, deltas: dict[str, LayerDelta],
                          rows: Sequence[str | None], x: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor | None:
        """Mixed-adapter batch in two batched matmuls (deltatune.kernels.multi_lora)."""
        loras = list(deltas.values())
        first = loras[0]
        # Layer-level conditions are shared; dropout only matters in training mode.
        if not first._fast_ok(owner.base, x) or (first.training and not all(
                isinstance(d.dropout, nn.Identity) for d in loras)):
            return None
        position = {n: i for i, n in enumerate(deltas)}
        return cls._bank(owner).apply(
            list(deltas), lambda: [d.lora_A for d in loras], lambda: [d.lora_B for d in loras],
            [d.scale for d in loras], [position[n] if n is not None else -1 for n in rows],
            x, y, keys=tuple(d.serial for d in loras))

    def delta_weight(self) -> torch.Tensor:
        """Return s * B A in float32: (d_out, d_in), or (vocab, dim) for an embedding."""
        update = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return update.t() if self.kind == "embedding" else update

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + self.delta_weight(), bias


class Lora(LayerMethod):
    """LoRA on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding`` layers."""

    name = "lora"
    config_cls = LoraConfig
    mergeable = True
    supported_types = (nn.Linear, Conv1D, nn.Embedding)
    summary = "low-rank update W0 + (alpha/r) B A on selected weights (Hu et al. 2021)"

    def default_targets(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        layout = layout_for(model, what="LoRA's default targets (W_q and W_v)")
        return present(model, tuple(dict.fromkeys(layout.query + layout.value)))

    def select(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        names = super().select(model, config)
        assert isinstance(config, LoraConfig)
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(config, field_name):
                if not any(_pattern_value({key: 1}, n, None) for n in names):
                    raise HyperparameterError(
                        f"{field_name} key {key!r} matches none of the targeted modules "
                        f"({', '.join(names[:8])}{' ...' if len(names) > 8 else ''}).",
                        field=field_name)
        return names

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> LoraDelta:
        assert isinstance(config, LoraConfig)
        r = _pattern_value(config.rank_pattern, module_name, config.r)
        alpha = _pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        return LoraDelta(base, r, float(alpha), config.lora_dropout, config.use_rslora,
                         config.init, module_name)
