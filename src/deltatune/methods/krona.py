"""KronA and KronA^B_res: Kronecker adapters (Edalati et al., 2022, "KronA: Parameter
Efficient Tuning with Kronecker Adapter", arXiv:2212.10650).

KronA replaces LoRA's low-rank product by a Kronecker product, which is full-rank for
full-rank factors (rank(A kron B) = rank(A) rank(B)):

    h = W0 x + s (A kron B) x        A: a_out x a_in,  B: b_out x b_in,
                                     a_out b_out = d_out,  a_in b_in = d_in

The product is never materialised in the forward pass. With x viewed row-major as an
a_in x b_in matrix X, (A kron B) x = vec(A X B^T) (row-major vec), i.e. the paper's
(A kron B) vec(X) = vec(B X A^T) in column-major notation: two small matmuls.

Factor shapes: given by ``a_shape`` = [a_out, a_in], or chosen from the weight's shape
(each dimension split into its two divisors closest to its square root, the smaller one
for A). Init: A Kaiming-uniform and B = 0, so the model starts as the base model;
``init="gaussian"`` draws both from N(0, ``gaussian_std``^2), the paper's ablation (it
changes the model at step 0). Saved: ``krona_A``, ``krona_B`` per target. Mergeable:
W = W0 + s kron(A, B).

KronA^B_res ("kronab"): one KronA module beside a whole FFN block, plus a learned
scalar residual:

    h <- FFN(h) + s (A kron B) h + lambda_res h

It acts on the block's input and output, not on a weight, so it is NOT mergeable
(``merge()`` raises MergeError naming this). lambda_res starts at ``residual_init``
(default 0, so the model starts as the base model). Default block: the architecture's
FFN module (Llama/GPT-2/NeoX ``mlp``, T5 ``DenseReluDense``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.core.blocks import layout_for, present
from deltatune.core.config import DeltaConfig, TargetedConfig, param
from deltatune.core.errors import HyperparameterError, TargetError
from deltatune.core.layer_method import LayerMethod
from deltatune.core.layers import LayerDelta, WrapperModule, current_row_deltas, layer_dims
from deltatune.core.registry import AttachedDelta, DeltaMethod
from deltatune.core.targets import get_submodule, select_targets, set_submodule


def balanced_factors(n: int) -> tuple[int, int]:
    """Return (p, q) with p * q = n, p <= q, and p the largest divisor of n <= sqrt(n)."""
    p = math.isqrt(n)
    while n % p:
        p -= 1
    return p, n // p


def kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Return (A kron B) x over the last dim of ``x`` without forming A kron B.

    x: (..., a_in * b_in) -> (..., a_out * b_out); x is viewed row-major as (a_in, b_in).
    """
    a_in, b_in = A.shape[1], B.shape[1]
    X = x.reshape(*x.shape[:-1], a_in, b_in)
    Y = torch.matmul(torch.matmul(A, X), B.t())  # (..., a_out, b_out)
    return Y.reshape(*x.shape[:-1], A.shape[0] * B.shape[0])


def factor_shapes(d_out: int, d_in: int, a_shape: list[int] | None, where: str
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return ((a_out, a_in), (b_out, b_in)) for a d_out x d_in weight."""
    if a_shape is None:
        a_out, b_out = balanced_factors(d_out)
        a_in, b_in = balanced_factors(d_in)
        return (a_out, a_in), (b_out, b_in)
    a_out, a_in = a_shape
    if d_out % a_out or d_in % a_in:
        raise HyperparameterError(
            f"a_shape={a_shape} does not divide the {d_out} x {d_in} weight of {where}: a_out "
            f"must divide {d_out} and a_in must divide {d_in}. Leave a_shape=None to choose "
            f"the factors automatically.", field="a_shape")
    return (a_out, a_in), (d_out // a_out, d_in // a_in)


@dataclasses.dataclass(kw_only=True)
class KronAConfig(TargetedConfig):
    """KronA hyperparameters (default targets W_q and W_v)."""

    method = "krona"

    a_shape: list[int] | None = param(None, help="[a_out, a_in] of factor A; None: automatic")
    scale: float = param(1.0, gt=0, help="output scale s")
    init: Literal["zero", "gaussian"] = param(
        "zero", help="zero: A Kaiming-uniform, B = 0; gaussian: both N(0, gaussian_std^2)")
    gaussian_std: float = param(0.02, gt=0, help="std of both factors when init='gaussian'")

    def check(self) -> None:
        super().check()
        if self.a_shape is not None and (len(self.a_shape) != 2 or min(self.a_shape) < 1):
            raise HyperparameterError(f"a_shape must be two positive ints [a_out, a_in], got "
                                      f"{self.a_shape}", field="a_shape")


def init_factors(A: torch.Tensor, B: torch.Tensor, init: str, std: float) -> None:
    """Initialise A and B in place: zero (A Kaiming-uniform, B = 0) or both Gaussian."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(A, std=std)
            nn.init.normal_(B, std=std)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)


class KronADelta(LayerDelta):
    """KronA on one linear or Conv1D layer."""

    mergeable = True

    def __init__(self, base: nn.Module, config: KronAConfig, module_name: str) -> None:
        super().__init__(base)
        a, b = factor_shapes(self.d_out, self.d_in, config.a_shape, module_name)
        self.scale = config.scale
        self.krona_A = nn.Parameter(torch.empty(a))
        self.krona_B = nn.Parameter(torch.empty(b))
        init_factors(self.krona_A, self.krona_B, config.init, config.gaussian_std)

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = kron_apply(x.to(self.krona_A.dtype), self.krona_A, self.krona_B)
        return y + (out * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Return s kron(A, B) in float32, (d_out, d_in)."""
        return torch.kron(self.krona_A.float(), self.krona_B.float()) * self.scale

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + self.delta_weight(), bias


class KronA(LayerMethod):
    """KronA on ``nn.Linear`` and GPT-2 ``Conv1D`` layers."""

    name = "krona"
    config_cls = KronAConfig
    mergeable = True
    supported_types = (nn.Linear, Conv1D)
    summary = "Kronecker-product update W0 + s (A kron B) (Edalati et al. 2022)"

    def default_targets(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        layout = layout_for(model, what="KronA's default targets (W_q and W_v)")
        return present(model, tuple(dict.fromkeys(layout.query + layout.value)))

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> KronADelta:
        assert isinstance(config, KronAConfig)
        return KronADelta(base, config, module_name)


# -- KronA^B_res: beside a whole FFN block ----------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class KronABConfig(KronAConfig):
    """KronA^B_res hyperparameters: target_modules name FFN *blocks* (default: the FFN)."""

    method = "kronab"

    residual_init: float = param(0.0, help="initial value of the learned residual scale")


class KronABDelta(nn.Module):
    """A, B and the residual scale of one KronA^B_res module."""

    def __init__(self, d: tuple[int, int], config: KronABConfig, where: str) -> None:
        super().__init__()
        a, b = factor_shapes(d[1], d[0], config.a_shape, where)
        self.scale = config.scale
        self.krona_A = nn.Parameter(torch.empty(a))
        self.krona_B = nn.Parameter(torch.empty(b))
        init_factors(self.krona_A, self.krona_B, config.init, config.gaussian_std)
        self.krona_residual = nn.Parameter(torch.tensor(float(config.residual_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return s (A kron B) x + lambda_res x (the block's output is added by the caller)."""
        x = x.to(self.krona_A.dtype)
        return kron_apply(x, self.krona_A, self.krona_B) * self.scale + self.krona_residual * x


class ParallelBlock(WrapperModule):
    """A frozen block (an FFN) with named KronA^B_res modules beside it."""

    WRAPPED = "block"

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.deltas = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False


    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.block(x, *args, **kwargs)
        if self.disabled:
            return y
        if current_row_deltas(x.shape[0]) is not None:
            raise HyperparameterError("KronA^B_res cannot be chosen per batch row")
        for n in self.active:
            y = y + self.deltas[n](x).to(y.dtype)
        return y


def block_dims(block: nn.Module, where: str) -> tuple[int, int]:
    """Return (d_in, d_out) of a block: input of its first and output of its last linear."""
    linears = [m for m in block.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not linears:
        raise TargetError(f"{where} holds no linear layer; KronA^B_res needs an FFN block")
    d_in, _ = layer_dims(linears[0])
    _, d_out = layer_dims(linears[-1])
    if d_in != d_out:
        raise TargetError(f"{where} maps {d_in} to {d_out} features; KronA^B_res needs a block "
                          f"whose output has its input's size (a whole FFN block)")
    return d_in, d_out


class KronAB(DeltaMethod):
    """KronA^B_res: a Kronecker adapter in parallel with each FFN block; not mergeable."""

    name = "kronab"
    config_cls = KronABConfig
    mergeable = False
    summary = "KronA^B_res: KronA beside each FFN block + learned residual (Edalati et al. 2022)"

    def _select(self, model: nn.Module, config: KronABConfig) -> list[str]:
        targets = config.target_modules
        if targets is None:
            layout = layout_for(model, what="KronA^B_res's default blocks (the FFN)")
            if len(layout.ffn) != 1:
                raise TargetError(
                    f"the FFN of model type {getattr(model.config, 'model_type', None)!r} is "
                    f"not one module ({', '.join(layout.ffn)}), so KronA^B_res cannot sit "
                    f"beside it; pass target_modules naming a module that maps hidden states "
                    f"to hidden states.")
            targets = present(model, layout.ffn)
        return select_targets(model, targets, supported_types=(nn.Module,), method=self.name,
                              layers=config.layers, exclude_modules=config.exclude_modules)

    def attach(self, model: nn.Module, name: str, config: DeltaConfig) -> dict[str, nn.Module]:
        assert isinstance(config, KronABConfig)
        names = self._select(model, config)
        parts: dict[str, nn.Module] = {}
        for location in names:
            module = get_submodule(model, location)
            block = module.block if isinstance(module, ParallelBlock) else module
            device = next(block.parameters()).device
            parts[location] = KronABDelta(block_dims(block, location), config,
                                          location).to(device)
        for location, delta in parts.items():
            module = get_submodule(model, location)
            if not isinstance(module, ParallelBlock):
                module = ParallelBlock(module)
                set_submodule(model, location, module)
            module.deltas[name] = delta
        return dict(parts)

    def detach(self, model: nn.Module, delta: AttachedDelta) -> None:
        for location in delta.parts:
            holder = get_submodule(model, location)
            del holder.deltas[delta.name]
            if delta.name in holder.active:
                holder.active.remove(delta.name)
            if not len(holder.deltas):
                set_submodule(model, location, holder.block)

    def set_active(self, model: nn.Module, delta: AttachedDelta, active: bool) -> None:
        for location in delta.parts:
            holder = get_submodule(model, location)
            if active and delta.name not in holder.active:
                holder.active.append(delta.name)
            elif not active and delta.name in holder.active:
                holder.active.remove(delta.name)

    def set_disabled(self, model: nn.Module, delta: AttachedDelta, disabled: bool) -> None:
        for location in delta.parts:
            get_submodule(model, location).disabled = disabled
