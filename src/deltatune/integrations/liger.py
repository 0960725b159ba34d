"""Liger-Kernel's Triton kernels for the base model's RMSNorm, RoPE and SwiGLU (optional).

deltatune's own kernels cover what a delta adds (the LoRA linears, the loss through the
output head); the rest of each layer runs as transformers wrote it, unless the layers are
compiled. `Liger-Kernel <https://github.com/linkedin/Liger-Kernel>`_ fuses those parts:
RMSNorm, the rotary embedding and SiLU x up, each one Triton kernel with a hand-written
backward that saves less. On an H200 (1B Llama shape, batch 8 x 2048, LoRA r=16 on every
linear, docs/performance.md) deltatune with Liger's kernels took 0.205 s per step against
0.263 s without, and PEFT with Liger's 0.218 s.

Liger patches the modeling module of the model's architecture (module-level functions and
classes) and the model's modules (their ``forward``). :func:`apply_liger` records what it
changed and returns a function that puts it back; :func:`liger_kernels` does both around a
block. Liger's loss (fused linear + cross-entropy) is off by default (``liger_loss``):
the causal LM task already computes its loss without the logits
(:mod:`deltatune.kernels.head_loss`).

A module that carries a delta itself (a norm tuned by a delta, say) would lose it to
Liger's forward: that is refused before anything stays changed.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from deltatune.core.errors import ConfigError


def _apply_functions() -> dict[str, Callable[..., None]]:
    """Liger's table of model type -> patch function (imported lazily)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ConfigError(f"liger_kernel=True needs the liger-kernel package, which cannot be "
                          f"imported ({e}); install it with `pip install liger-kernel` (its "
                          f"kernels need a GPU and triton), or leave liger_kernel off",
                          field="liger_kernel") from e
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def _inner(model: nn.Module) -> nn.Module:
    from deltatune.core.model import DeltaModel

    return model.model if isinstance(model, DeltaModel) else model


def apply_liger(model: nn.Module, *, rope: bool = True, rms_norm: bool = True,
                swiglu: bool = True, liger_loss: bool = False,
                require_cuda: bool = True) -> Callable[[], None]:
    """Patch ``model`` (a DeltaModel or a Hugging Face model) with Liger's kernels.

    Returns a function that undoes every change (the architecture module's globals and
    the modules' attributes). ``liger_loss`` also lets Liger's fused linear +
    cross-entropy compute the loss the model's forward returns for ``labels`` (for loops
    that use the model's own loss; deltatune's tasks form theirs without it). Raises
    :class:`ConfigError` when liger-kernel is missing, has no kernels for the
    architecture, would replace the forward of a module that carries a delta (then
    nothing stays changed), or, with ``require_cuda``, when the model is not on a CUDA
    GPU (Liger's Triton kernels would fail in its first forward).
    """
    from deltatune.core.layers import DeltaLayer

    functions = _apply_functions()
    lm = _inner(model)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    patch = functions.get(model_type)
    if patch is None:
        raise ConfigError(f"Liger-Kernel has no kernels for model type {model_type!r}; it "
                          f"has: {', '.join(sorted(functions))}. Leave liger_kernel off",
                          field="liger_kernel")
    if require_cuda:
        devices = sorted({p.device.type for p in lm.parameters()})
        if devices != ["cuda"]:
            raise ConfigError(f"liger_kernel=True: Liger-Kernel's Triton kernels run on CUDA "
                              f"GPUs, and this model is on {', '.join(devices) or 'no device'};"
                              f" leave liger_kernel off here", field="liger_kernel")
    modeling = sys.modules[type(lm).__module__]
    globals_before = dict(vars(modeling))
    modules_before = {m: dict(vars(m)) for m in lm.modules()}
    wanted: dict[str, Any] = dict(rope=rope, rms_norm=rms_norm, swiglu=swiglu, model=lm,
                                  cross_entropy=False, fused_linear_cross_entropy=liger_loss)
    accepted = inspect.signature(patch).parameters
    patch(**{k: v for k, v in wanted.items() if k in accepted})

    changed_globals = {k: v for k, v in globals_before.items() if vars(modeling).get(k) is not v}
    added_globals = set(vars(modeling)) - set(globals_before)
    changed_modules: list[tuple[nn.Module, dict[str, Any], set[str]]] = []
    for module, before in modules_before.items():
        now = vars(module)
        old = {k: v for k, v in before.items() if k not in now or now[k] is not v}
        added = set(now) - set(before)
        if old or added:
            changed_modules.append((module, old, added))

    def undo() -> None:
        for key, value in changed_globals.items():
            setattr(modeling, key, value)
        for key in added_globals:
            vars(modeling).pop(key, None)
        for module, old, added in changed_modules:
            for key in added:
                vars(module).pop(key, None)
            vars(module).update(old)

    carrying = [type(m).__name__ for m, _, _ in changed_modules if isinstance(m, DeltaLayer)]
    if carrying:
        undo()
        raise ConfigError(f"Liger-Kernel would replace the forward of {len(carrying)} modules "
                          f"that carry a delta (e.g. a tuned norm); leave liger_kernel off for "
                          f"this method or target other modules", field="liger_kernel")
    return undo


@contextmanager
def liger_kernels(model: nn.Module, **options: bool) -> Iterator[nn.Module]:
    """Within: ``model`` runs Liger's kernels (:func:`apply_liger` with ``options``);
    yields the model and undoes every change on exit."""
    undo = apply_liger(model, **options)
    try:
        yield model
    finally:
        undo()


__all__ = ["apply_liger", "liger_kernels"]
