"""Full fine-tuning as a method: the baseline row of every comparison.

Every parameter of the base model is trained in place; nothing is added, so the
forward pass is the model's own. The "delta" is the whole model: saved as its full
state dict in safetensors (tied weights once, keys as in the plain model, other
deltas' wrappers left out), loaded back by copying into a fresh base.

With ``keep_original`` (the default) a CPU copy of the pretrained tensors is kept, so
that ``disabled()``, deactivation and ``delete`` give the base model back, as for every
other delta; this costs one model's size in CPU memory. Without it the base is gone
once training starts and those operations are refused. ``merge`` is a no-op (the
weights already are the model); ``merge_and_unload`` returns the trained model.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.core.config import DeltaConfig, param
from deltatune.core.errors import DeltaStateError
from deltatune.core.layers import WrapperModule
from deltatune.core.model_delta import HOLDER
from deltatune.core.registry import AttachedDelta, DeltaMethod


@dataclasses.dataclass(kw_only=True)
class FullConfig(DeltaConfig):
    """Full fine-tuning: train every parameter of the base model."""

    method = "full"

    keep_original: bool = param(
        True, help="keep a CPU copy of the pretrained tensors, so disable/delete restore them")


def plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's persistent tensors under their plain names, tied ones once.

    deltatune wrappers are seen through (a wrapped layer reports its base layer's
    tensors under the layer's own name), so the keys are those of the bare model.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        # Every deltatune wrapper (DeltaLayer, ModuleCopy, KronA's ParallelBlock...) names
        # the module it wraps; other deltas attached later must not rename base tensors.
        while isinstance(module, WrapperModule):
            module = module._modules[module.WRAPPED]
        tensors = list(module._parameters.items()) + [
            (k, b) for k, b in module._buffers.items()
            if k not in module._non_persistent_buffers_set]
        for key, tensor in tensors:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out[prefix + key] = tensor
        for key, child in module._modules.items():
            if child is not None and key != HOLDER:  # model-level deltas' own tensors
                walk(child, f"{prefix}{key}.")

    walk(model, "")
    return out


class FullModel(nn.Module):
    """Stands for the whole model among a delta's parts without owning its tensors.

    Its parameters and state dict are the model's own (see :func:`plain_tensors`);
    having no tensors of its own, dtype casts of delta parts leave the model alone.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__dict__["_model"] = model

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for tensor in plain_tensors(self.__dict__["_model"]).values():
            if isinstance(tensor, nn.Parameter):
                yield tensor

    def state_dict(self, *args: Any, keep_vars: bool = False, **kwargs: Any) -> dict[str, Any]:
        tensors = plain_tensors(self.__dict__["_model"])
        return tensors if keep_vars else {k: v.detach() for k, v in tensors.items()}


class FullFineTune(DeltaMethod):
    """Full fine-tuning: every base parameter is trainable; the whole model is saved."""

    name = "full"
    config_cls = FullConfig
    mergeable = True
    trains_base = True
    summary = "full fine-tuning: every parameter trained, saved as a full state dict"

    # State: ``_on`` says whether the model holds the trained tensors. While off they
    # wait in ``_stash``; a stash of None means "equal to the pretrained ones" (the
    # state right after attach, before any training), so switching on is then free.
    def attach(self, model: nn.Module, name: str, config: DeltaConfig) -> dict[str, nn.Module]:
        assert isinstance(config, FullConfig)
        self._original = ({k: t.detach().to("cpu", copy=True)
                           for k, t in plain_tensors(model).items()}
                          if config.keep_original else None)
        self._stash: dict[str, torch.Tensor] | None = None
        self._on = False
        self._off_for_disable = False
        return {"": FullModel(model)}

    def _copy_in(self, model: nn.Module, source: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, tensor in plain_tensors(model).items():
                tensor.copy_(source[key].to(tensor.device, tensor.dtype))

    def _switch(self, model: nn.Module, on: bool) -> None:
        """Put the trained tensors in (on) or the pretrained ones back (off)."""
        if on == self._on:
            return
        if on:
            if self._stash is not None:
                self._copy_in(model, self._stash)
            self._stash = None
        else:
            if self._original is None:
                raise DeltaStateError(
                    "this full fine-tuning delta was added with keep_original=False, so the "
                    "pretrained weights are gone and it cannot be switched off; reload the base "
                    "model instead.")
            self._stash = {k: t.detach().to("cpu", copy=True)
                           for k, t in plain_tensors(model).items()}
            self._copy_in(model, self._original)
        self._on = on

    def set_active(self, model: nn.Module, delta: AttachedDelta, active: bool) -> None:
        self._switch(model, active)

    def set_disabled(self, model: nn.Module, delta: AttachedDelta, disabled: bool) -> None:
        # Only an active full delta changes the forward pass; an inactive one is off already.
        if disabled and self._on:
            self._switch(model, False)
            self._off_for_disable = True
        elif not disabled and self._off_for_disable:
            self._switch(model, True)
            self._off_for_disable = False

    def detach(self, model: nn.Module, delta: AttachedDelta) -> None:
        if self._original is not None:
            self._switch(model, False)
        else:
            warnings.warn("deleting a full fine-tuning delta added with keep_original=False "
                          "leaves the trained weights in the model", stacklevel=3)
        for p in model.parameters():
            p.requires_grad_(False)
        self._original = self._stash = None

    def load_saved_tensors(self, model: nn.Module, delta: AttachedDelta,
                           tensors: dict[str, Any]) -> None:
        if self._on:
            self._copy_in(model, tensors)
        else:
            self._stash = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}

    def saved_tensors(self, model: nn.Module, delta: AttachedDelta) -> dict[str, Any]:
        if not self._on and self._stash is not None:
            return dict(self._stash)  # inactive: the trained tensors wait in the stash
        return plain_tensors(model)

    def merge(self, model: nn.Module, delta: AttachedDelta, *, check: bool,
              keep_original: bool, allow_lossy: bool = False) -> None:
        # The trained weights already are the model's; nothing to fold in.
        if not keep_original:
            self._original = None

    def unmerge(self, model: nn.Module, delta: AttachedDelta) -> None:
        """Nothing was folded in, so nothing comes out."""
