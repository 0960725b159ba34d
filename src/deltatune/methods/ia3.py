"""IA3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638; the T-Few recipe).

Three learned vectors per transformer layer rescale activations elementwise:

    attention:  softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V)     l_k, l_v: one entry per k/v unit
    FFN:        (l_ff * act(W_1 x)) W_2                        l_ff: one entry per hidden unit

so l_k and l_v scale the *outputs* of the key and value projections and l_ff scales the
*input* of the FFN's down-projection (its hidden activation). All vectors start at ones,
so the adapted model equals the base model at step 0.

Fused projections: GPT-2's ``c_attn`` and GPT-NeoX's ``query_key_value`` compute q, k
and v in one layer; only the key and value units get a learned entry (the paper leaves
queries alone), and the query units keep scale 1.

Saved: ``ia3_l`` per target. Mergeable: an output scale multiplies the rows of W (and
the bias), an input scale multiplies the columns of W:  W' = diag(l) W, b' = l * b  or
W' = W diag(l_ff). Unmerge restores the kept original bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.core.blocks import LAYOUTS, BlockLayout, model_type_of
from deltatune.core.config import DeltaConfig, TargetedConfig, param
from deltatune.core.errors import ConfigError, TargetError
from deltatune.core.layer_method import LayerMethod
from deltatune.core.layers import LayerDelta, layer_dims
from deltatune.core.targets import iter_candidate_modules

# Roles of a targeted layer: scale its key or value output, the k/v part of a fused
# q/k/v output, its whole output, or (FFN down-projection) its input.
KEY, VALUE, FUSED_KV, OUTPUT, FFN = "key", "value", "fused_kv", "output", "ffn"


@dataclasses.dataclass(kw_only=True)
class IA3Config(TargetedConfig):
    """IA3 hyperparameters. Default targets: keys, values and the FFN down-projection."""

    method = "ia3"

    feedforward_modules: list[str] | None = param(
        None, help="targets whose INPUT is scaled (FFN down-projections); default: the "
                   "architecture's FFN down-projection")
    init_value: float = param(1.0, help="initial value of every scale (the paper: 1.0)")

    def check(self) -> None:
        super().check()
        if isinstance(self.feedforward_modules, list) and not self.feedforward_modules:
            raise ConfigError("feedforward_modules is an empty list; use None for the "
                              "architecture's FFN down-projection", field="feedforward_modules")


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def layout_role(name: str, layout: BlockLayout) -> str | None:
    """Return the role ('key', 'value', 'fused_kv', 'ffn', 'other') of module ``name``.

    The longest matching suffix wins, so BERT's ``attention.output.dense`` (attention
    output) is not mistaken for ``output.dense`` (the FFN down-projection).
    """
    candidates: list[tuple[int, str]] = []
    for role, suffixes in (("query", layout.query), (KEY, layout.key), (VALUE, layout.value),
                           ("attn_out", layout.attn_out), ("ffn_up", layout.ffn_up),
                           (FFN, layout.ffn_down)):
        for s in suffixes:
            if _suffix_match(name, s):
                candidates.append((len(s), role))
    if not candidates:
        return None
    longest = max(length for length, _ in candidates)
    roles = {role for length, role in candidates if length == longest}
    if layout.fused_qkv and roles & {KEY, VALUE}:
        return FUSED_KV
    return sorted(roles)[0] if len(roles) == 1 else FUSED_KV


def fused_kv_index(model_type: str | None, d_out: int, num_heads: int) -> torch.Tensor:
    """Return the output units of a fused q/k/v layer that belong to k and v.

    GPT-2's ``c_attn`` lays out [q | k | v]; GPT-NeoX's ``query_key_value`` interleaves
    per head: [q_h k_h v_h] for every head h.
    """
    if d_out % 3:
        raise TargetError(f"a fused q/k/v layer must have 3*d outputs, this one has {d_out}")
    d = d_out // 3
    if model_type == "gpt_neox":
        head = d // num_heads
        units = torch.arange(d_out).view(num_heads, 3, head)
        return units[:, 1:, :].reshape(-1)
    return torch.arange(d, d_out)


class IA3Delta(LayerDelta):
    """A learned vector that rescales this layer's output (or part of it)."""

    mergeable = True

    def __init__(self, base: nn.Module, size: int, init_value: float,
                 index: torch.Tensor | None = None) -> None:
        super().__init__(base)
        self.ia3_l = nn.Parameter(torch.full((size,), float(init_value)))
        # For fused q/k/v layers: which output units the vector scales (others keep 1).
        self.register_buffer("index", index, persistent=False)

    def scale_vector(self) -> torch.Tensor:
        """Return the full-length scale over this layer's outputs (or inputs, for FFN)."""
        if self.index is None:
            return self.ia3_l
        full = torch.ones(self.d_out, dtype=self.ia3_l.dtype, device=self.ia3_l.device)
        return full.index_copy(0, self.index, self.ia3_l)

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale_vector().to(y.dtype)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        scale = self.scale_vector().float()
        return weight * scale[:, None], (bias * scale if bias is not None else None)


class IA3InputDelta(IA3Delta):
    """l_ff: rescales the input of the FFN's down-projection (its hidden activation)."""

    modifies_input = True

    def pre_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.to(x.dtype)

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        # (l * x) W^T = x (W diag(l))^T; the bias is added after, unscaled.
        return weight * self.ia3_l.float()[None, :], bias


class IA3(LayerMethod):
    """IA3 on ``nn.Linear`` and GPT-2 ``Conv1D`` layers of any architecture in the table."""

    name = "ia3"
    config_cls = IA3Config
    mergeable = True
    supported_types = (nn.Linear, Conv1D)
    summary = "learned vectors rescaling keys, values and FFN hidden units (Liu et al. 2022)"

    def __init__(self) -> None:
        self._roles: dict[str, str] = {}
        self._model_type: str | None = None
        self._num_heads = 1

    def default_targets(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        layout = self._layout(model)
        if layout is None:
            raise TargetError(f"IA3 does not know where keys, values and the FFN live in model "
                              f"type {model_type_of(model)!r}; pass target_modules (and "
                              f"feedforward_modules for the FFN down-projections).")
        names = [n for n, m in iter_candidate_modules(model)
                 if isinstance(m, self.supported_types)
                 and layout_role(n, layout) in (KEY, VALUE, FUSED_KV, FFN)]
        if not names:
            raise TargetError("IA3 found no key, value or FFN down-projection layer; pass "
                              "target_modules by hand.")
        return names

    @staticmethod
    def _layout(model: nn.Module) -> BlockLayout | None:
        return LAYOUTS.get(model_type_of(model) or "")

    def select(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        assert isinstance(config, IA3Config)
        names = super().select(model, config)
        layout = self._layout(model)
        self._model_type = model_type_of(model)
        cfg = getattr(model, "config", None)
        self._num_heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        ff = config.feedforward_modules
        if ff is not None:
            for entry in ff:
                if not any(_suffix_match(n, entry) for n in names):
                    raise TargetError(f"feedforward_modules entry {entry!r} matches none of the "
                                      f"IA3 targets; every feed-forward module must also be in "
                                      f"target_modules.")
        for n in names:
            if ff is not None:
                role = FFN if any(_suffix_match(n, e) for e in ff) else None
                if role is None and layout is not None:
                    role = layout_role(n, layout)
                    role = None if role == FFN else role
            else:
                role = layout_role(n, layout) if layout is not None else None
            self._roles[n] = role if role in (KEY, VALUE, FUSED_KV, FFN) else OUTPUT
        return names

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> IA3Delta:
        assert isinstance(config, IA3Config)
        role = self._roles.get(module_name, OUTPUT)
        d_in, d_out = layer_dims(base)
        if role == FFN:
            return IA3InputDelta(base, d_in, config.init_value)
        if role == FUSED_KV:
            index = fused_kv_index(self._model_type, d_out, self._num_heads)
            return IA3Delta(base, index.numel(), config.init_value, index)
        return IA3Delta(base, d_out, config.init_value)

