"""The shared attach/detach/merge logic of every method that wraps individual layers.

A layer method (LoRA, AdaLoRA, IA3, LoHa, KronA, BitFit...) only says which modules it
targets by default and how to build its :class:`LayerDelta` for one base layer; this
class selects the targets, wraps them in :class:`DeltaLayer`, and merges atomically
across layers.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from deltatune.core.config import DeltaConfig, TargetedConfig
from deltatune.core.errors import ConfigError, DeltaStateError
from deltatune.core.layers import DeltaLayer, LayerDelta
from deltatune.core.registry import AttachedDelta, DeltaMethod
from deltatune.core.targets import LINEAR_TYPES, get_submodule, select_targets, set_submodule


class LayerMethod(DeltaMethod):
    """Base of methods whose delta is a set of per-layer :class:`LayerDelta` modules."""

    supported_types: ClassVar[tuple[type[nn.Module], ...]] = LINEAR_TYPES
    supports_per_row = True

    def default_targets(self, model: nn.Module, config: DeltaConfig) -> list[str] | str:
        """Return the targets used when ``config.target_modules`` is None."""
        raise ConfigError(f"{self.name} needs target_modules for this model; name the layers "
                          f"to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'.",
                          field="target_modules")

    def make_delta(self, base: nn.Module, config: DeltaConfig, module_name: str) -> LayerDelta:
        """Build this method's delta for one base layer (float32, on the layer's device).

        Raise :class:`~deltatune.core.errors.HyperparameterError` when the config does
        not fit the layer's shape.
        """
        raise NotImplementedError

    def select(self, model: nn.Module, config: DeltaConfig) -> list[str]:
        """Return the module names this config attaches to in ``model``."""
        assert isinstance(config, TargetedConfig)
        targets = config.target_modules
        if targets is None:
            targets = self.default_targets(model, config)
        return select_targets(model, targets, supported_types=self.supported_types,
                              method=self.name, layers=config.layers,
                              exclude_modules=config.exclude_modules)

    def attach(self, model: nn.Module, name: str, config: DeltaConfig) -> dict[str, nn.Module]:
        names = self.select(model, config)
        # Build every delta before touching the model, so a bad layer changes nothing.
        deltas: dict[str, LayerDelta] = {}
        for module_name in names:
            module = get_submodule(model, module_name)
            base = module.base if isinstance(module, DeltaLayer) else module
            if isinstance(module, DeltaLayer) and name in module.deltas:
                raise DeltaStateError(f"layer {module_name} already holds a delta named {name!r}")
            device = base.weight.device
            deltas[module_name] = self.make_delta(base, config, module_name).to(device)
        for module_name, delta in deltas.items():
            module = get_submodule(model, module_name)
            if not isinstance(module, DeltaLayer):
                module = DeltaLayer(module)
                set_submodule(model, module_name, module)
            module.deltas[name] = delta
        return dict(deltas)

    def _layers(self, model: nn.Module, delta: AttachedDelta) -> list[DeltaLayer]:
        return [get_submodule(model, loc) for loc in delta.parts]

    def detach(self, model: nn.Module, delta: AttachedDelta) -> None:
        for location in delta.parts:
            layer = get_submodule(model, location)
            layer.remove(delta.name)
            if not len(layer.deltas):
                set_submodule(model, location, layer.base)

    def set_active(self, model: nn.Module, delta: AttachedDelta, active: bool) -> None:
        for layer in self._layers(model, delta):
            layer.set_active(delta.name, active)

    def set_disabled(self, model: nn.Module, delta: AttachedDelta, disabled: bool) -> None:
        for layer in self._layers(model, delta):
            layer.disabled = disabled

    def merge(self, model: nn.Module, delta: AttachedDelta, *, check: bool,
              keep_original: bool, allow_lossy: bool = False) -> None:
        done: list[DeltaLayer] = []
        try:
            for layer in self._layers(model, delta):
                # Originals are kept until every layer merged, so a failure can be undone.
                layer.merge(delta.name, check=check, keep_original=True,
                            allow_lossy=allow_lossy)
                done.append(layer)
        except BaseException:
            # All layers or none: take back what this call merged.
            for layer in reversed(done):
                layer.unmerge(delta.name)
            raise
        if not keep_original:
            for layer in done:
                layer.forget_original(delta.name)

    def unmerge(self, model: nn.Module, delta: AttachedDelta) -> None:
        for layer in self._layers(model, delta):
            layer.unmerge(delta.name)
