"""The unified view as configuration (He et al. 2022, arXiv:2110.04366).

He et al. describe adapters, LoRA, prefix tuning and their variants as one operation,
a modification of a hidden representation h of a frozen sub-layer:

    h <- h + s * g * f(u)                    (composition: add s=1, scale s, gate g)

fixed by four choices, each a field of :class:`UnifiedConfig`:

* functional form f: ``bottleneck`` = act(u W_down + b_down) W_up + b_up (adapters), or
  ``low_rank`` = u W_down W_up (LoRA's form: no bias, no nonlinearity);
* insertion form: ``sequential`` takes u = h, the sub-layer's own output (Houlsby,
  Pfeiffer); ``parallel`` takes u = x, the sub-layer's input (parallel adapter, LoRA);
* modified representation: the output of the ``attention`` block, of the ``ffn`` block,
  or of a single projection (``query``, ``key``, ``value``);
* composition: ``add`` (s = 1), ``scale`` (fixed s), ``gate`` (g = sigmoid(u w_g + b_g),
  one learned scalar per position, as UniPELT gates its sub-modules).

Blocks are found through the mapping table of :mod:`deltatune.core.blocks`: a block is
the pair (first module, last module); a hook on the first sees x, a wrapper on the
last sees h. ``site_modules`` gives the pair by hand for a layout the table lacks.

Init: ``zero_up`` (W_down as ``nn.Linear`` initialises it, W_up = 0, biases 0: the
model is exactly the base model at step 0; He et al.'s choice) or ``houlsby``
(every weight ~ N(0, init_std^2) truncated at two standard deviations, biases 0:
near-identity, Houlsby et al. 2019). ``train_layer_norms`` adds a zero-initialised
change of every layer norm's scale and shift (Houlsby et al. train the layer norms).

Saved: W_down, W_up (and biases, gate, layer-norm changes). Mergeable only when the
delta is a change of one layer's weights: identity nonlinearity, no gate, sequential
or parallel to a single projection (then it is LoRA, or (I + s W_up W_down) W0).
The presets (Houlsby, Pfeiffer, parallel adapter) are this config with fixed choices.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.blocks import REPRESENTATIONS, block_sites
from deltatune.core.config import DeltaConfig, param
from deltatune.core.errors import ConfigError, TargetError
from deltatune.core.layer_method import LayerMethod
from deltatune.core.layers import DeltaLayer, LayerDelta, current_row_deltas, is_norm, layer_dims
from deltatune.core.registry import AttachedDelta
from deltatune.core.targets import (
    LINEAR_TYPES,
    count_layers,
    get_submodule,
    iter_candidate_modules,
    layer_index,
)

Representation = Literal["attention", "ffn", "query", "key", "value"]
Activation = Literal["relu", "gelu", "tanh", "silu", "identity"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu,
    "identity": lambda t: t,
}
# The four design dimensions of He et al., by field name.
DIMENSIONS = ("functional_form", "insertion", "modified_representation", "composition")


@dataclasses.dataclass(kw_only=True)
class UnifiedConfig(DeltaConfig):
    """A delta described by the unified view's four choices (defaults: He et al.'s
    scaled parallel adapter on the FFN, m = 512, s = 4, ReLU)."""

    method = "unified"
    # Field -> allowed values; a preset fixes the choices that define it.
    fixed: ClassVar[dict[str, tuple[Any, ...]]] = {}

    functional_form: Literal["bottleneck", "low_rank"] = param(
        "bottleneck", help="bottleneck: act(u W_down + b) W_up + b; low_rank: u W_down W_up")
    insertion: Literal["sequential", "parallel"] = param(
        "parallel", help="sequential: f reads the sub-layer's output h; parallel: its input x")
    modified_representation: list[Representation] = param(
        default_factory=lambda: ["ffn"],
        help="which outputs are modified: attention, ffn, query, key, value")
    composition: Literal["add", "scale", "gate"] = param(
        "scale", help="add: h + f; scale: h + s f; gate: h + s sigmoid(u w_g + b_g) f")
    scaling: float = param(4.0, gt=0, help="s of the scale and gate compositions")
    activation: Activation | None = param(
        None, help="nonlinearity of the bottleneck (None: relu; low_rank: identity)")
    bottleneck_size: int = param(512, min=1, help="m, the bottleneck width")
    reduction_factor: float | None = param(
        None, gt=0, help="if set, m = round(d / reduction_factor) instead of bottleneck_size")
    init: Literal["zero_up", "houlsby"] = param(
        "zero_up", help="zero_up: W_up = 0 (exact identity); houlsby: N(0, init_std^2) "
                        "truncated at 2 std for every weight (near identity)")
    init_std: float = param(1e-2, gt=0, help="std of the houlsby init")
    adapter_dropout: float = param(0.0, min=0.0, lt=1.0, help="dropout on the adapter input")
    train_layer_norms: bool = param(False, help="also train every layer norm (as a delta)")
    layers: list[int] | None = param(None, help="keep only these layer indices (0-based)")
    site_modules: dict[str, list[str]] | None = param(
        None, help="by-hand block location: {'ffn': [first module, last module], ...}")

    def check(self) -> None:
        super().check()
        reps = self.modified_representation
        if not reps:
            raise ConfigError("modified_representation is empty; name at least one of "
                              f"{', '.join(REPRESENTATIONS)}", field="modified_representation")
        if len(set(reps)) != len(reps):
            raise ConfigError(f"modified_representation {reps} lists an entry twice",
                              field="modified_representation")
        if self.composition == "add" and self.scaling != 1.0:
            raise ConfigError(f"scaling = {self.scaling} has no effect with composition='add' "
                              f"(s = 1); use composition='scale' or leave scaling at 1.0",
                              field="scaling")
        if self.functional_form == "low_rank" and self.activation not in (None, "identity"):
            raise ConfigError(f"functional_form='low_rank' has no nonlinearity, but activation "
                              f"= {self.activation!r}; use 'bottleneck' for a nonlinear form",
                              field="activation")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"layers must be >= 0, got {self.layers}", field="layers")
        for key, names in (self.site_modules or {}).items():
            if key not in REPRESENTATIONS or not 1 <= len(names) <= 2:
                raise ConfigError(
                    f"site_modules[{key!r}] = {names!r}: keys are {', '.join(REPRESENTATIONS)} "
                    f"and values [first module, last module] (or one module)",
                    field="site_modules")
        for name, allowed in self.fixed.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"{type(self).__name__} fixes {name} to "
                    f"{' or '.join(repr(a) for a in allowed)}, got {value!r}; for another "
                    f"variant use UnifiedConfig(...), which accepts every combination.",
                    field=name)

    # -- the four dimensions ---------------------------------------------------------
    @property
    def resolved_activation(self) -> str:
        """The nonlinearity actually used (identity for the low-rank form)."""
        if self.functional_form == "low_rank":
            return "identity"
        return self.activation or "relu"

    def dimensions(self) -> dict[str, Any]:
        """Return the unified view's four choices (plus s) as a plain dict."""
        out = {name: getattr(self, name) for name in DIMENSIONS}
        out["scaling"] = {"add": 1.0}.get(self.composition, self.scaling)
        return out

    def to_unified(self) -> UnifiedConfig:
        """Return the plain :class:`UnifiedConfig` computing exactly this delta."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return UnifiedConfig(**values)

    @property
    def is_mergeable(self) -> bool:
        """True when the delta is a change of one layer's weights (see module docstring)."""
        single = set(self.modified_representation) <= {"query", "key", "value"}
        return (self.resolved_activation == "identity" and self.composition != "gate"
                and (self.insertion == "sequential" or single))


def _init_weight(weight: torch.Tensor, how: str, std: float) -> None:
    if how == "houlsby":
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class AdapterDelta(LayerDelta):
    """One adapter on the output of one layer (the last module of a block).

    ``x_dim`` is the width of the adapter's input u: the layer's output width for
    sequential insertion, the block's input width for parallel insertion.
    """

    def __init__(self, base: nn.Module, config: UnifiedConfig, x_dim: int,
                 same_module: bool) -> None:
        super().__init__(base)
        self.sequential = config.insertion == "sequential"
        self.same_module = same_module
        u_dim = self.d_out if self.sequential else x_dim
        m = config.bottleneck_size
        if config.reduction_factor is not None:
            m = round(u_dim / config.reduction_factor)
            if m < 1:
                warnings.warn(f"reduction_factor {config.reduction_factor:g} on width {u_dim} "
                              f"gives a bottleneck below 1; using m = 1", stacklevel=2)
                m = 1
        if m > u_dim:
            # Policy (reliability row 18): allowed, since a wide nonlinear adapter is still
            # well defined, but never silently: it is no longer a bottleneck.
            warnings.warn(f"adapter bottleneck m = {m} is wider than the representation it "
                          f"adapts ({u_dim}); it is no longer a bottleneck and costs "
                          f"{2 * m * u_dim:,} parameters per adapter", stacklevel=2)
        bias = config.functional_form == "bottleneck"
        self.m = m
        self.activation = config.resolved_activation
        self.scale = {"add": 1.0}.get(config.composition, config.scaling)
        self.dropout = nn.Dropout(config.adapter_dropout) if config.adapter_dropout else None
        self.down = nn.Linear(u_dim, m, bias=bias)
        self.up = nn.Linear(m, self.d_out, bias=bias)
        self.gate = nn.Linear(u_dim, 1) if config.composition == "gate" else None
        with torch.no_grad():
            for layer in (self.down, self.up):
                if layer.bias is not None:
                    layer.bias.zero_()
            if config.init == "zero_up":
                self.up.weight.zero_()
            else:
                _init_weight(self.down.weight, "houlsby", config.init_std)
                _init_weight(self.up.weight, "houlsby", config.init_std)
            if self.gate is not None:
                # sigmoid(0) = 1/2: the gate starts half open and learns from there.
                self.gate.weight.zero_()
                self.gate.bias.zero_()
        self.mergeable = config.is_mergeable
        # Set by the method: the delta's name (per-row routing) and the block input.
        self.delta_name: str | None = None
        self.captured: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the block's first module: keep the block input x.

        Only while this delta will run, so an inactive delta holds no activations.
        """
        x = args[0]
        layer = self.__dict__.get("_layer")
        rows = current_row_deltas(x.shape[0]) if x.dim() > 0 else None
        if layer is None:
            live = True
        elif rows is not None:  # a per-row batch runs the deltas it names, active or not
            live = not layer.disabled and self.delta_name in rows
        else:
            live = not layer.disabled and self.delta_name in layer.active
        self.captured = x if live else None

    def _block_input(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.sequential:
            return y
        if self.same_module:
            return x
        u, self.captured = self.captured, None  # used once: do not keep activations alive
        if u is None:
            raise RuntimeError("parallel adapter ran before its block's input was seen")
        if u.shape[0] != y.shape[0]:
            # A per-row batch: this call sees only the rows routed to this delta.
            rows = current_row_deltas(u.shape[0]) or ()
            idx = [i for i, n in enumerate(rows) if n == self.delta_name]
            u = u[torch.tensor(idx, device=u.device)]
        return u

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = self._block_input(x, y).to(self.down.weight.dtype)
        inner = self.dropout(u) if self.dropout is not None else u
        change = self.up(ACTIVATIONS[self.activation](self.down(inner)))
        if self.gate is not None:
            change = torch.sigmoid(self.gate(u)) * change
        return y + (change * self.scale).to(y.dtype)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        # f(u) = M u + c with M = W_up W_down, c = W_up b_down + b_up.
        M = self.up.weight.float() @ self.down.weight.float()
        c = None
        if self.down.bias is not None:
            c = self.up.weight.float() @ self.down.bias.float() + self.up.bias.float()
        s = self.scale
        if self.sequential:
            # h + s f(h) with h = W0 x + b0: (I + s M) W0 x + (I + s M) b0 + s c.
            new_w = weight + s * M @ weight
            new_b = bias + s * M @ bias if bias is not None else None
        else:
            new_w, new_b = weight + s * M, bias
        if c is not None:
            new_b = (new_b if new_b is not None else torch.zeros_like(c)) + s * c
        return new_w, new_b


class NormDelta(LayerDelta):
    """A zero-initialised change of a norm layer's scale (and shift): w + dw, b + db."""

    mergeable = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.norm_weight_delta = nn.Parameter(torch.zeros(base.weight.shape))
        bias = getattr(base, "bias", None)
        self.norm_bias_delta = (nn.Parameter(torch.zeros(bias.shape))
                                if isinstance(bias, torch.Tensor) else None)
        # The frozen norm itself, kept outside the module tree so it is not saved twice.
        self.__dict__["_norm"] = base

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        norm = self.__dict__["_norm"]
        params = {"weight": norm.weight + self.norm_weight_delta.to(norm.weight.dtype)}
        if self.norm_bias_delta is not None:
            params["bias"] = norm.bias + self.norm_bias_delta.to(norm.bias.dtype)
        # Norm classes differ (RMSNorm, (1 + w) scales...): run the module itself with
        # the changed tensors and add the difference, so other deltas here still compose.
        changed = torch.func.functional_call(norm, params, (x,))
        return y + (changed - norm(x))

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        new_b = bias + self.norm_bias_delta.float() if self.norm_bias_delta is not None else bias
        return weight + self.norm_weight_delta.float(), new_b


def norm_modules(model: nn.Module, layers: list[int] | None) -> list[str]:
    """Return the names of the model's norm layers (only those in ``layers`` if given)."""
    names = [n for n, m in iter_candidate_modules(model) if is_norm(m)]
    if layers is not None:
        names = [n for n in names if layer_index(n) in set(layers)]
    return names


class UnifiedAdapter(LayerMethod):
    """Any adapter of the unified view: bottleneck or low-rank, sequential or parallel."""

    name = "unified"
    config_cls = UnifiedConfig
    supports_per_row = True
    summary = ("a delta given by the unified view's four choices (He et al. 2022); "
               "default: scaled parallel FFN adapter")

    def select(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        assert isinstance(config, UnifiedConfig)
        if config.layers is not None:
            total = count_layers(model)
            bad = [i for i in config.layers if i >= total]
            if bad:
                raise TargetError(f"layers {bad} are out of range: this model has {total} "
                                  f"layers (indices 0..{total - 1}).")
        self._sites: dict[str, str] = {}
        self._input_dims: dict[str, int] = {}
        for rep in config.modified_representation:
            for first, last in block_sites(model, rep, by_hand=config.site_modules):
                if config.layers is not None and layer_index(last) not in config.layers:
                    continue
                for module_name in (first, last):
                    module = get_submodule(model, module_name)
                    module = module.base if isinstance(module, DeltaLayer) else module
                    if not isinstance(module, LINEAR_TYPES):
                        raise TargetError(
                            f"{module_name} ({type(module).__name__}) is not a linear layer; "
                            f"{self.name} reads and writes block outputs through linear "
                            f"layers. Name linear modules in site_modules.")
                self._sites.setdefault(last, first)
                base_first = get_submodule(model, first)
                base_first = base_first.base if isinstance(base_first, DeltaLayer) else base_first
                self._input_dims.setdefault(last, layer_dims(base_first)[0])
        if not self._sites:
            raise TargetError(f"no module is left for {self.name} after the layer filter "
                              f"{config.layers}; widen layers.")
        self._norms = norm_modules(model, config.layers) if config.train_layer_norms else []
        return list(self._sites) + self._norms

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> LayerDelta:
        assert isinstance(config, UnifiedConfig)
        if module_name in self._norms:
            return NormDelta(base)
        return AdapterDelta(base, config, self._input_dims[module_name],
                            same_module=self._sites[module_name] == module_name)

    def attach(self, model: nn.Module, name: str, config: DeltaConfig) -> dict[str, nn.Module]:
        assert isinstance(config, UnifiedConfig)
        # The instance, created per delta, states this config's contract.
        self.mergeable = config.is_mergeable
        parts = super().attach(model, name, config)
        self._hooks = []
        for location, delta in parts.items():
            if not isinstance(delta, AdapterDelta):
                continue
            delta.delta_name = name
            # The wrapper that runs this delta (outside the module tree: no cycle).
            delta.__dict__["_layer"] = get_submodule(model, location)
            if not delta.sequential and not delta.same_module:
                first = get_submodule(model, self._sites[location])
                first = first.base if isinstance(first, DeltaLayer) else first
                self._hooks.append(first.register_forward_pre_hook(delta.capture))
        return parts

    def release(self, model: nn.Module, delta: AttachedDelta) -> None:
        """Remove the block-input hooks (a merged delta no longer reads x)."""
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []

    def detach(self, model: nn.Module, delta: AttachedDelta) -> None:
        self.release(model, delta)
        super().detach(model, delta)
