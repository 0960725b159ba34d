"""FedPara / LoHa: low-rank Hadamard product (Hyeon-Woo et al., 2022, "FedPara: Low-Rank
Hadamard Product for Communication-Efficient Federated Learning", arXiv:2108.06098).

FedPara writes a weight as the Hadamard (elementwise) product of two rank-r products:

    W1 = X1 Y1^T,  W2 = X2 Y2^T      X: d_out x r,  Y: d_in x r
    delta W = s * (W1 * W2)                                   (fedpara / LoHa)

rank(W1 * W2) <= r^2 while the factors hold only 2r(d_out + d_in) numbers: LoRA with the
same parameters reaches rank 2r. Here it is a *delta* on a frozen weight (the LoHa use of
LyCORIS and HF PEFT); ``s = alpha / r`` when ``alpha`` is given, else 1 (FedPara has no
scale). Init: X1, Y1, X2 Kaiming-uniform and Y2 = 0, so delta W = 0 at step 0 while every
factor still gets a gradient after the first step (zeroing a whole pair X2 and Y2 would
freeze both forever: each one's gradient is proportional to the other).

pFedPara (the paper's personalised variant) splits the factors into a *global* part,
averaged by the server, and a *local* part that never leaves the client:

    delta W = s * W1 * (W2 + 1)          W1 = X1 Y1^T global,  W2 = X2 Y2^T local

with W2 = 0 at the start (Y2 = 0) and, to start from the base model, Y1 = 0 as well.
``LoHaConfig.global_tensor_names()`` says which saved tensors travel.

Targets: ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv2d`` (groups=1; the kernel is
treated as a d_out x (d_in * kh * kw) matrix). Saved: ``hada_X1, hada_Y1, hada_X2,
hada_Y2`` per target. Mergeable; unmerge restores the kept original bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
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

TENSOR_NAMES = ("hada_X1", "hada_Y1", "hada_X2", "hada_Y2")


@dataclasses.dataclass(kw_only=True)
class LoHaConfig(TargetedConfig):
    """FedPara / LoHa hyperparameters (default targets W_q and W_v, as LoRA's)."""

    method = "loha"

    r: int = param(8, min=1, help="rank of each of the two factor products")
    alpha: float | None = param(None, gt=0, help="scale s = alpha / r; None: s = 1 (FedPara)")
    mode: Literal["fedpara", "pfedpara"] = param(
        "fedpara", help="fedpara: s W1*W2; pfedpara: s W1*(W2+1) with W1 global, W2 local")

    def global_tensor_names(self) -> list[str]:
        """Return the per-target tensor names the federated server averages.

        FedPara: every factor; pFedPara: X1 and Y1 (W1), while X2 and Y2 stay local.
        """
        return list(TENSOR_NAMES) if self.mode == "fedpara" else ["hada_X1", "hada_Y1"]

    def local_tensor_names(self) -> list[str]:
        """Return the per-target tensor names that never leave a client."""
        return [n for n in TENSOR_NAMES if n not in self.global_tensor_names()]


def split_global_local(tensors: dict[str, torch.Tensor], config: LoHaConfig
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split saved tensors (``DeltaModel.delta_state_dict()``) into (global, local) dicts."""
    glob = set(config.global_tensor_names())
    out: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    for key, value in tensors.items():
        out[0 if key.rpartition(".")[2] in glob else 1][key] = value
    return out


def _describe(tensors: dict[str, torch.Tensor]) -> str:
    return f"{len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values"


class LoHaDelta(LayerDelta):
    """X1, Y1, X2, Y2 for one linear, Conv1D or Conv2d layer."""

    mergeable = True

    def __init__(self, base: nn.Module, r: int, scale: float, mode: str,
                 module_name: str) -> None:
        super().__init__(base)
        if self.kind == "embedding":
            raise HyperparameterError(f"LoHa does not adapt embeddings ({module_name})")
        if self.kind == "conv2d" and base.groups != 1:
            raise HyperparameterError(f"LoHa supports Conv2d with groups=1 only; "
                                      f"{module_name} has groups={base.groups}. Exclude it.",
                                      field="target_modules")
        if r > min(self.d_in, self.d_out):
            # Each factor product X Y^T has rank <= min(d_in, d_out): a larger r only adds
            # parameters (reliability row 18: checked against the real layer, not at forward).
            raise HyperparameterError(
                f"LoHa rank r={r} is larger than min(d_in, d_out) = min({self.d_in}, "
                f"{self.d_out}) of module {module_name!r}; use r <= {min(self.d_in, self.d_out)}.",
                field="r")
        self.r, self.scale, self.mode = r, scale, mode
        self.conv_shape = tuple(base.weight.shape) if self.kind == "conv2d" else None
        self.conv_args = ((base.stride, base.padding, base.dilation)
                          if self.kind == "conv2d" else None)
        self.hada_X1 = nn.Parameter(torch.empty(self.d_out, r))
        self.hada_Y1 = nn.Parameter(torch.empty(self.d_in, r))
        self.hada_X2 = nn.Parameter(torch.empty(self.d_out, r))
        self.hada_Y2 = nn.Parameter(torch.zeros(self.d_in, r))
        for p in (self.hada_X1, self.hada_Y1, self.hada_X2):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if mode == "pfedpara":
            # W1 = 0 too, so that s * W1 * (W2 + 1) = 0 at the start.
            nn.init.zeros_(self.hada_Y1)

    def delta_weight(self) -> torch.Tensor:
        """Return delta W in float32, (d_out, d_in) (d_out, d_in * kh * kw for Conv2d)."""
        w1 = self.hada_X1.float() @ self.hada_Y1.float().t()
        w2 = self.hada_X2.float() @ self.hada_Y2.float().t()
        if self.mode == "pfedpara":
            w2 = w2 + 1.0
        return w1 * w2 * self.scale

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w1 = self.hada_X1 @ self.hada_Y1.t()
        w2 = self.hada_X2 @ self.hada_Y2.t()
        if self.mode == "pfedpara":
            w2 = w2 + 1.0
        delta = (w1 * w2) * self.scale
        if self.kind == "conv2d":
            stride, padding, dilation = self.conv_args
            out = F.conv2d(x.to(delta.dtype), delta.view(self.conv_shape), None, stride,
                           padding, dilation)
        else:
            out = x.to(delta.dtype) @ delta.t()
        return y + out.to(y.dtype)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + self.delta_weight().view_as(weight), bias


class LoHa(LayerMethod):
    """FedPara / LoHa on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv2d`` layers."""

    name = "loha"
    config_cls = LoHaConfig
    mergeable = True
    supported_types = (nn.Linear, Conv1D, nn.Conv2d)
    summary = "Hadamard product of two low-rank products (FedPara, Hyeon-Woo et al. 2022)"

    def default_targets(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        layout = layout_for(model, what="LoHa's default targets (W_q and W_v)")
        return present(model, tuple(dict.fromkeys(layout.query + layout.value)))

    def summarize(self, config: DeltaConfig, tensors: dict[str, torch.Tensor]
                  ) -> dict[str, object]:
        """Return the mode and the global/local split (for ``deltatune info``)."""
        assert isinstance(config, LoHaConfig)
        glob, local = split_global_local(tensors, config)
        return {"mode": config.mode,
                "global (sent to the server)": _describe(glob),
                "local (stay on the client)": _describe(local)}

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> LoHaDelta:
        assert isinstance(config, LoHaConfig)
        scale = 1.0 if config.alpha is None else config.alpha / config.r
        return LoHaDelta(base, config.r, scale, config.mode, module_name)
