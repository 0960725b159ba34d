"""Combination: a weighted linear combination of attached LoRA-family deltas as a new delta.

    dm.add("mix", CombinationConfig(weights={"sql": 0.7, "chat": 0.3}))

On every layer that any source adapts, the new delta is

    delta W = sum_i w_i delta W_i

stored as a LoRA delta (A, B with scale 1), built one of two ways:

* ``combination="cat"`` (exact, no approximation): LoRA-family updates are products
  B_i A_i (LoRA: s_i B_i A_i; AdaLoRA: s_i (P_i diag(Lambda_i)) Q_i), so stacking
  A = [A_1; A_2; ...] and B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] gives exactly the weighted
  sum, with rank sum_i r_i; sources of different ranks combine without loss.
* ``combination="svd"``: the weighted sum is formed densely and truncated to rank
  ``svd_rank`` by SVD (B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T): the best rank-k
  approximation in Frobenius norm, exact when k >= rank of the sum. It also accepts
  any mergeable source with a dense ``delta_weight()`` (LoHa, KronA), not only products.

The result is independent of its sources (deleting them keeps it), mergeable, usable
per batch row, and saved as a plain LoRA delta (``saved_config`` writes a ``LoraConfig``
with a per-module rank), so it loads with :class:`~deltatune.methods.lora.LoraConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from deltatune.core.config import DeltaConfig, param
from deltatune.core.errors import ConfigError, DeltaStateError, HyperparameterError
from deltatune.core.layer_method import LayerMethod
from deltatune.core.layers import DeltaLayer, LayerDelta
from deltatune.core.registry import AttachedDelta
from deltatune.core.targets import iter_candidate_modules
from deltatune.methods.lora import Lora, LoraConfig, LoraDelta


@dataclasses.dataclass(kw_only=True)
class CombinationConfig(DeltaConfig):
    """Which attached deltas to combine, with what weights, and how."""

    method = "combination"

    weights: dict[str, float] = param(default_factory=dict,
                                      help="source delta name -> weight w_i")
    combination: Literal["cat", "svd"] = param(
        "cat", help="cat: exact concatenation of factors; svd: weighted sum truncated by SVD")
    svd_rank: int | None = param(None, min=1,
                                 help="rank of the svd result; None: the largest source rank")

    def check(self) -> None:
        super().check()
        if not self.weights:
            raise ConfigError("weights is empty; name the deltas to combine, e.g. "
                              "{'sql': 0.5, 'chat': 0.5}", field="weights")
        if self.modules_to_save:
            raise ConfigError("a combination cannot carry modules_to_save; combine the "
                              "layer deltas and train or copy heads separately",
                              field="modules_to_save")


def lora_factors(delta: LayerDelta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return (B_eff, A) in float32 with delta = B_eff @ A (LoRA layout), or None.

    LoRA: (s B, A); AdaLoRA: (s P diag(Lambda), Q). For embeddings the product is
    (dim, vocab), LoRA's own layout.
    """
    if isinstance(delta, LoraDelta):
        return delta.lora_B.detach().float() * delta.scale, delta.lora_A.detach().float()
    P = getattr(delta, "lora_P", None)
    if P is not None:
        lam, Q = delta.lora_Lambda.detach().float(), delta.lora_Q.detach().float()
        return P.detach().float() * lam * delta.scale, Q
    return None


def dense_update(delta: LayerDelta) -> torch.Tensor:
    """Return the delta as a dense matrix in LoRA's layout (d_out x d_in, or dim x vocab)."""
    factors = lora_factors(delta)
    if factors is not None:
        return factors[0] @ factors[1]
    if delta.mergeable and hasattr(delta, "delta_weight") and delta.kind in ("linear", "conv1d"):
        return delta.delta_weight().detach().float()
    raise HyperparameterError(f"{type(delta).__name__} is not a LoRA-family delta on a linear "
                              f"layer, so it cannot be combined", field="weights")


class Combination(LayerMethod):
    """Builds a LoRA delta equal to a weighted sum of attached deltas (see module doc)."""

    name = "combination"
    config_cls = CombinationConfig
    mergeable = True
    supports_per_row = True
    identity_at_init = False
    supported_types = Lora.supported_types
    summary = "weighted linear combination of LoRA-family deltas as a new LoRA delta"

    def __init__(self) -> None:
        self._built: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def select(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        assert isinstance(config, CombinationConfig)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, DeltaLayer)}
        found = {src: [n for n, m in layers.items() if src in m.deltas] for src in config.weights}
        missing = [src for src, hits in found.items() if not hits]
        if missing:
            known = sorted({d for m in layers.values() for d in m.deltas})
            raise DeltaStateError(f"cannot combine {', '.join(map(repr, missing))}: no such "
                                  f"layer delta is attached (layer deltas here: "
                                  f"{', '.join(known) or 'none'}). Add or load it first.")
        order = {n: i for i, (n, _) in enumerate(iter_candidate_modules(model))}
        names = sorted({n for hits in found.values() for n in hits}, key=order.__getitem__)
        self._built = {n: self._combine(layers[n], config, n) for n in names}
        return names

    def _combine(self, layer: DeltaLayer, config: CombinationConfig, where: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        sources = [(layer.deltas[s], w) for s, w in config.weights.items() if s in layer.deltas]
        if config.combination == "cat":
            Bs, As = [], []
            for delta, w in sources:
                factors = lora_factors(delta)
                if factors is None:
                    raise HyperparameterError(
                        f"{type(delta).__name__} on {where} is not a low-rank product, so "
                        f"combination='cat' cannot stack it; use combination='svd'.",
                        field="combination")
                Bs.append(factors[0] * w)
                As.append(factors[1])
            return torch.cat(Bs, dim=1), torch.cat(As, dim=0)
        total = sum(dense_update(delta) * w for delta, w in sources)
        rank = config.svd_rank
        if rank is None:
            ranks = [lora_factors(d)[1].shape[0] for d, _ in sources if lora_factors(d)]
            if not ranks:
                raise HyperparameterError(f"no source on {where} has a rank; give svd_rank",
                                          field="svd_rank")
            rank = max(ranks)
        rank = min(rank, *total.shape)
        U, S, Vh = torch.linalg.svd(total.double(), full_matrices=False)
        root = S[:rank].sqrt()
        return (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> LoraDelta:
        B, A = self._built[module_name]
        r = A.shape[0]
        try:
            # alpha = r gives scale 1: the combined factors already carry every scale.
            delta = LoraDelta(base, r, float(r), 0.0, False, "kaiming", module_name)
        except HyperparameterError:
            raise HyperparameterError(
                f"the concatenated rank {r} on {module_name} exceeds the layer's "
                f"min(d_in, d_out); use combination='svd' with svd_rank", field="combination"
            ) from None
        with torch.no_grad():
            delta.lora_A.copy_(A)
            delta.lora_B.copy_(B)
        return delta

    def saved_config(self, delta: AttachedDelta) -> DeltaConfig:
        """Return a LoraConfig with per-module ranks, so the result loads as plain LoRA."""
        ranks = {loc: int(part.lora_A.shape[0]) for loc, part in delta.parts.items()}
        return LoraConfig(r=max(ranks.values()), lora_alpha=float(max(ranks.values())),
                          target_modules=sorted(ranks), rank_pattern=dict(ranks),
                          alpha_pattern={k: float(v) for k, v in ranks.items()})
