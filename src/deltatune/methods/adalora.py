"""AdaLoRA: adaptive budget allocation (Zhang et al., 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning", arXiv:2303.10512).

Each target gets an SVD-shaped update whose singular values are pruned during training:

    h = W0 x + s P diag(Lambda) Q x      P: d_out x r,  Lambda: r,  Q: r x d_in

Lambda starts at 0 and P, Q are Gaussian (std 0.02), so the model starts as the base
model. ``s = lora_alpha / init_r`` when ``lora_alpha`` is given (the official code's and
PEFT's convention), else 1 (the paper's formula).

Training adds three things, all from the paper:

* orthogonality of P and Q: the loss gets gamma * sum_k (||P_k^T P_k - I||_F^2 +
  ||Q_k Q_k^T - I||_F^2), returned by :meth:`AdaLora.extra_loss` (``DeltaModel`` adds it to
  the loss in training mode, under any training loop);
* importance of every triplet (P_{*i}, lambda_i, Q_{i*}): for each entry w, the
  sensitivity I = |w * dL/dw| is smoothed, I_bar <- b1 I_bar + (1-b1) I, and its
  uncertainty U_bar <- b2 U_bar + (1-b2) |I - I_bar|; s(w) = I_bar * U_bar, and the
  triplet's score is s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij);
* a cubic budget schedule of the total rank b(t) over all targets: b(0) = init_r * n for
  the t_i warm-up steps, then b(t) = b(T) + (b(0) - b(T)) (1 - (t - t_i)/(T - t_i - t_f))^3,
  then b(T) = target_r * n for the last t_f steps. Every ``deltaT`` steps the lambdas of
  all but the b(t) highest-scoring triplets are set to 0; in the final phase the mask
  chosen at T - t_f is kept and applied after every step.

These run in :class:`AdaLoraCallback`, a core :class:`StepCallback` called after each
optimizer step (before gradients are zeroed) by deltatune's trainer and by the Hugging
Face ``Trainer`` bridge (:mod:`deltatune.integrations.hf_trainer`).

Saved: ``lora_P``, ``lora_Lambda``, ``lora_Q`` per target; the rank a target keeps is the
number of non-zero lambdas (``deltatune info`` lists it per layer and matrix, and
:func:`deltatune.plotting.rank_heatmap.plot_rank_heatmap` draws it). Mergeable:
W = W0 + s P diag(Lambda) Q.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.core.blocks import layout_for, present
from deltatune.core.callbacks import StepCallback
from deltatune.core.config import DeltaConfig, TargetedConfig, param
from deltatune.core.errors import ConfigError, DeltaStateError, HyperparameterError
from deltatune.core.layer_method import LayerMethod
from deltatune.core.layers import DeltaLayer, LayerDelta
from deltatune.core.registry import AttachedDelta


@dataclasses.dataclass(kw_only=True)
class AdaLoraConfig(TargetedConfig):
    """AdaLoRA hyperparameters (paper defaults: b1 = b2 = 0.85, gamma = 0.1)."""

    method = "adalora"

    init_r: int = param(12, min=1, help="initial rank of every target (b(0) = init_r * n)")
    target_r: int = param(8, min=1, help="average final rank (b(T) = target_r * n)")
    lora_alpha: float | None = param(None, gt=0, help="scale s = lora_alpha / init_r; None: 1")
    lora_dropout: float = param(0.0, min=0.0, lt=1.0, help="dropout on the adapter's input")
    init_std: float = param(0.02, gt=0, help="std of the Gaussian init of P and Q")
    orth_reg_weight: float = param(0.1, min=0.0, help="gamma of the orthogonality regulariser")
    beta1: float = param(0.85, min=0.0, lt=1.0, help="EMA factor of the sensitivity")
    beta2: float = param(0.85, min=0.0, lt=1.0, help="EMA factor of the uncertainty")
    tinit: int = param(0, min=0, help="warm-up steps t_i before any pruning")
    tfinal: int = param(0, min=0, help="final steps t_f with the budget fixed at b(T)")
    deltaT: int = param(1, min=1, help="steps between two maskings in the cubic phase")
    total_step: int | None = param(None, min=1, help="T; None: the trainer's planned steps")

    def check(self) -> None:
        super().check()
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} is above init_r={self.init_r}; AdaLoRA "
                              f"only prunes, so choose target_r <= init_r", field="target_r")
        if self.total_step is not None and self.total_step <= self.tinit + self.tfinal:
            raise ConfigError(f"total_step={self.total_step} leaves no pruning phase after "
                              f"tinit={self.tinit} and tfinal={self.tfinal}; need total_step > "
                              f"tinit + tfinal", field="total_step")


class AdaLoraDelta(LayerDelta):
    """P, Lambda and Q for one linear or Conv1D layer."""

    mergeable = True

    def __init__(self, base: nn.Module, config: AdaLoraConfig, module_name: str) -> None:
        super().__init__(base)
        r = config.init_r
        if r > min(self.d_in, self.d_out):
            raise HyperparameterError(
                f"AdaLoRA init_r={r} is larger than min(d_in, d_out) = {min(self.d_in, self.d_out)}"
                f" of {module_name!r}; use init_r <= {min(self.d_in, self.d_out)}.",
                field="init_r")
        self.scale = 1.0 if config.lora_alpha is None else config.lora_alpha / r
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.lora_P = nn.Parameter(torch.randn(self.d_out, r) * config.init_std)
        self.lora_Lambda = nn.Parameter(torch.zeros(r))
        self.lora_Q = nn.Parameter(torch.randn(r, self.d_in) * config.init_std)

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        P, lam, Q = self.lora_P, self.lora_Lambda, self.lora_Q
        hidden = (self.dropout(x.to(Q.dtype)) @ Q.t()) * lam
        return y + (hidden @ P.t() * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Return s P diag(Lambda) Q in float32, (d_out, d_in)."""
        P, lam, Q = self.lora_P.float(), self.lora_Lambda.float(), self.lora_Q.float()
        return (P * lam) @ Q * self.scale

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + self.delta_weight(), bias

    def orthogonality(self) -> torch.Tensor:
        """Return ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (the paper's R(P, Q))."""
        P, Q = self.lora_P.float(), self.lora_Q.float()
        eye = torch.eye(P.shape[1], device=P.device)
        return ((P.t() @ P - eye) ** 2).sum() + ((Q @ Q.t() - eye) ** 2).sum()

    def rank(self) -> int:
        """Return the number of non-zero singular values (the rank this target keeps)."""
        return int(torch.count_nonzero(self.lora_Lambda.detach()))


def budget_at(step: int, *, init_budget: int, target_budget: int, total: int, tinit: int,
              tfinal: int, deltaT: int) -> tuple[int, bool]:
    """Return (b(step), whether to mask at this step) of the paper's cubic schedule."""
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    progress = 1.0 - (step - tinit) / (total - tinit - tfinal)
    budget = int(target_budget + (init_budget - target_budget) * progress ** 3)
    return budget, (step - tinit) % deltaT == 0


class AdaLoraCallback(StepCallback):
    """Importance scores, budget schedule and masking of one AdaLoRA delta."""

    def __init__(self, deltas: dict[str, AdaLoraDelta], config: AdaLoraConfig) -> None:
        self.deltas = deltas
        self.config = config
        self.total: int | None = config.total_step
        self.ipt: dict[str, torch.Tensor] = {}   # smoothed sensitivity I_bar per tensor
        self.unc: dict[str, torch.Tensor] = {}   # smoothed uncertainty U_bar per tensor
        self.final_mask: dict[str, torch.Tensor] | None = None
        self.budgets: list[tuple[int, int]] = []  # (step, b(step)) at every masking
        self.last_step = 0
        n = len(deltas)
        self.init_budget = config.init_r * n
        self.target_budget = config.target_r * n

    # -- hooks ---------------------------------------------------------------------------
    def on_train_begin(self, model: Any, total_steps: int) -> None:
        if self.config.total_step is None:
            self.total = int(total_steps)
        cfg = self.config
        if self.total is None or self.total <= cfg.tinit + cfg.tfinal:
            raise ConfigError(f"AdaLoRA needs more training steps ({self.total}) than tinit + "
                              f"tfinal = {cfg.tinit + cfg.tfinal}; lower them or train longer",
                              field="total_step")

    def on_optimizer_step(self, model: Any, step: int) -> None:
        if self.total is None:
            raise DeltaStateError("AdaLoRA's callback needs on_train_begin(model, total_steps) "
                                  "before the first step (it sets T of the budget schedule)")
        cfg = self.config
        self.last_step = step
        with torch.no_grad():
            if self.final_mask is not None:
                self._apply(self.final_mask)
                return
            self.update_importance()
            budget, mask_now = budget_at(step, init_budget=self.init_budget,
                                         target_budget=self.target_budget, total=self.total,
                                         tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.deltaT)
            if not mask_now:
                return
            mask = self.mask_to_budget(budget)
            self.budgets.append((step, budget))
            if step > self.total - cfg.tfinal:
                # Final phase: the allocation chosen now is kept until the end.
                self.final_mask = mask

    # -- the paper's importance and masking -------------------------------------------------
    def update_importance(self) -> None:
        """Update I_bar and U_bar of every P, Lambda and Q entry from the current gradients."""
        b1, b2 = self.config.beta1, self.config.beta2
        for location, delta in self.deltas.items():
            for pname in ("lora_P", "lora_Lambda", "lora_Q"):
                p = getattr(delta, pname)
                if p.grad is None:
                    continue
                key = f"{location}.{pname}"
                sensitivity = (p.detach() * p.grad.detach()).abs().float()
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(sensitivity)
                    self.unc[key] = torch.zeros_like(sensitivity)
                self.ipt[key].mul_(b1).add_(sensitivity, alpha=1 - b1)
                self.unc[key].mul_(b2).add_((sensitivity - self.ipt[key]).abs(), alpha=1 - b2)

    def scores(self) -> dict[str, torch.Tensor]:
        """Return the importance S_i of every triplet, per target (length init_r each)."""
        out = {}
        for location, delta in self.deltas.items():
            def s(pname: str, delta: AdaLoraDelta = delta, location: str = location
                  ) -> torch.Tensor:
                key = f"{location}.{pname}"
                if key not in self.ipt:
                    return torch.zeros_like(getattr(delta, pname), dtype=torch.float32)
                return self.ipt[key] * self.unc[key]
            out[location] = s("lora_Lambda") + s("lora_P").mean(0) + s("lora_Q").mean(1)
        return out

    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Keep the ``budget`` highest-scoring triplets overall; zero the other lambdas.

        Returns the keep-mask per target.
        """
        scores = self.scores()
        locations = list(scores)
        flat = torch.cat([scores[loc].to("cpu") for loc in locations])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        mask, start = {}, 0
        for loc in locations:
            n = scores[loc].numel()
            mask[loc] = keep[start:start + n]
            start += n
        self._apply(mask)
        return mask

    def _apply(self, mask: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for loc, keep in mask.items():
                lam = self.deltas[loc].lora_Lambda
                lam.masked_fill_(~keep.to(lam.device), 0.0)

    def ranks(self) -> dict[str, int]:
        """Return the rank each target keeps now (non-zero lambdas)."""
        return {loc: d.rank() for loc, d in self.deltas.items()}

    # -- resumable state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "ipt": dict(self.ipt), "unc": dict(self.unc),
                "final_mask": self.final_mask, "budgets": list(self.budgets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["total"]
        self.ipt, self.unc = dict(state["ipt"]), dict(state["unc"])
        self.final_mask = state["final_mask"]
        self.budgets = [tuple(b) for b in state["budgets"]]


class AdaLora(LayerMethod):
    """AdaLoRA on ``nn.Linear`` and GPT-2 ``Conv1D`` layers."""

    name = "adalora"
    config_cls = AdaLoraConfig
    mergeable = True
    supported_types = (nn.Linear, Conv1D)
    summary = "SVD-shaped update P diag(Lambda) Q with importance-based rank pruning (2023)"

    def default_targets(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        layout = layout_for(model, what="AdaLoRA's default targets")
        return present(model, tuple(dict.fromkeys(
            layout.query + layout.key + layout.value + layout.attn_out + layout.ffn_up
            + layout.ffn_down)))

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> AdaLoraDelta:
        assert isinstance(config, AdaLoraConfig)
        return AdaLoraDelta(base, config, module_name)

    def _deltas(self, model: nn.Module, delta: AttachedDelta) -> dict[str, AdaLoraDelta]:
        # Module copies (modules_to_save) share delta.parts; only wrapped layers count.
        return {loc: layer.deltas[delta.name]
                for loc, layer in zip(delta.parts, self._layers(model, delta))
                if isinstance(layer, DeltaLayer)}

    def extra_loss(self, model: nn.Module, delta: AttachedDelta) -> Any:
        assert isinstance(delta.config, AdaLoraConfig)
        gamma = delta.config.orth_reg_weight
        if gamma == 0:
            return None
        return gamma * sum(d.orthogonality() for d in self._deltas(model, delta).values())

    def training_callbacks(self, model: nn.Module, delta: AttachedDelta) -> list[Any]:
        # One callback per delta for its whole life, so its EMAs survive repeated asks.
        if "adalora_callback" not in delta.info:
            assert isinstance(delta.config, AdaLoraConfig)
            delta.info["adalora_callback"] = AdaLoraCallback(self._deltas(model, delta),
                                                             delta.config)
        return [delta.info["adalora_callback"]]

    def summarize(self, config: DeltaConfig, tensors: dict[str, torch.Tensor]
                  ) -> dict[str, Any]:
        """Return the rank kept per target (for ``deltatune info``), from saved tensors."""
        assert isinstance(config, AdaLoraConfig)
        ranks = saved_ranks(tensors)
        return {"ranks": ranks,
                "total rank": f"{sum(ranks.values())} of {len(ranks) * config.init_r} "
                              f"(target {len(ranks) * config.target_r})"}


def saved_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Return {target location: rank kept} from saved AdaLoRA tensors (non-zero lambdas)."""
    return {key.removesuffix(".lora_Lambda"): int(torch.count_nonzero(t))
            for key, t in sorted(tensors.items()) if key.endswith(".lora_Lambda")}
