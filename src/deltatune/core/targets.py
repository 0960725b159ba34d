"""Find the modules a delta attaches to: exact names, suffixes, regexes, all-linear, layers.

Rules (the same for every method):

* a list entry is a module name or a name suffix on a ``.`` boundary (``"q_proj"``
  matches ``model.layers.0.self_attn.q_proj``); an entry starting with ``re:`` is a
  regular expression that must match the whole module name;
* a single string is a regular expression matched against whole names, except
  ``"all-linear"``: every linear layer but the output head and task heads;
* every list entry must match at least one module. A typo in one entry of five is an
  error with suggestions, not a silently smaller delta;
* ``layers`` keeps modules whose transformer-layer index (the first number in the
  module path) is listed; an index past the model's last layer is an error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.core.errors import TargetError

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
# Top-level modules that are task or output heads: all-linear never adapts them.
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "cls", "embed_out")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module_name: str) -> int | None:
    """Return the transformer-layer index of a module path (its first number), or None."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def iter_candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) for attachable modules, seeing through deltatune wrappers.

    A wrapped layer is reported under its own name with its base module, so a second
    delta can target the same layer; the wrapper's internals are never candidates.
    """
    from deltatune.core.layers import DeltaLayer, ModuleCopy  # avoid an import cycle

    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (DeltaLayer, ModuleCopy)):
            skip_prefixes.append(name + ".")
            base = module.base if isinstance(module, DeltaLayer) else module.original
            yield name, base
            continue
        if name:
            yield name, module


def count_layers(model: nn.Module) -> int:
    """Return the number of transformer layers (1 + the largest layer index seen)."""
    indices = [layer_index(n) for n, _ in iter_candidate_modules(model)]
    found = [i for i in indices if i is not None]
    return max(found) + 1 if found else 0


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Return module paths of the output head and known task heads (all-linear skips them)."""
    prefixes = set(HEAD_NAMES)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        prefixes.update(n for n, m in model.named_modules() if m is head and n)
    return tuple(sorted(prefixes))


def is_under(name: str, prefixes: Iterable[str]) -> bool:
    """True when module path ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _matches_entry(name: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry)


def _type_names(types: Iterable[type]) -> str:
    return ", ".join(t.__name__ for t in types)


def _weighted_names(modules: Sequence[tuple[str, nn.Module]]) -> list[str]:
    return [n for n, m in modules if getattr(m, "weight", None) is not None]


def _no_match_error(entry: str, modules: Sequence[tuple[str, nn.Module]]) -> TargetError:
    weighted = _weighted_names(modules)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in weighted})
    pool = leaves + weighted
    close = difflib.get_close_matches(entry.removeprefix("re:"), pool, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(leaves[:40]) + (" ..." if len(leaves) > 40 else "")
    return TargetError(
        f"target {entry!r} matched no module.{hint} Modules with a weight here are named: "
        f"{shown}. Fix target_modules (names, suffixes, 're:<regex>' or 'all-linear')."
    )


def select_targets(
    model: nn.Module,
    target_modules: Sequence[str] | str,
    *,
    supported_types: tuple[type[nn.Module], ...],
    method: str,
    layers: Sequence[int] | None = None,
    exclude_modules: Sequence[str] | None = None,
) -> list[str]:
    """Return the names of the modules to attach to, in model order.

    Raises :class:`TargetError` when an entry matches nothing, matches a module type the
    method cannot wrap, or when the layer filter is out of range or leaves nothing.
    """
    modules = list(iter_candidate_modules(model))
    supported = [(n, m) for n, m in modules if isinstance(m, supported_types)]
    selected: set[str] = set()

    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            heads = head_prefixes(model)
            selected = {n for n, m in supported
                        if isinstance(m, LINEAR_TYPES) and not is_under(n, heads)}
            if not selected:
                raise TargetError(f"'all-linear' found no linear layer for {method}; "
                                  f"this model has no nn.Linear or Conv1D outside its heads.")
        else:
            try:
                pattern = re.compile(target_modules)
            except re.error as exc:
                raise TargetError(
                    f"target_modules regex {target_modules!r} is invalid: {exc}") from None
            selected = {n for n, _ in supported if pattern.fullmatch(n)}
            if not selected:
                raise _no_match_error("re:" + target_modules, modules)
    else:
        for entry in target_modules:
            hits = [(n, m) for n, m in modules if _matches_entry(n, entry)]
            if not hits:
                raise _no_match_error(entry, modules)
            wrong = [(n, m) for n, m in hits if not isinstance(m, supported_types)]
            if wrong:
                n, m = wrong[0]
                children = sorted({c.rsplit(".", 1)[-1] for c, cm in supported
                                   if c.startswith(n + ".")})
                inside = f" Its wrappable sub-modules: {', '.join(children)}." if children else ""
                raise TargetError(
                    f"target {entry!r} matched {n} ({type(m).__name__}), which {method} "
                    f"cannot wrap; it supports {_type_names(supported_types)}.{inside}"
                )
            selected.update(n for n, _ in hits)

    if exclude_modules:
        selected = {n for n in selected
                    if not any(_matches_entry(n, e) for e in exclude_modules)}

    if layers is not None:
        total = count_layers(model)
        bad = [i for i in layers if i >= total]
        if bad:
            raise TargetError(f"layers {bad} are out of range: this model has {total} layers "
                              f"(indices 0..{total - 1}).")
        wanted = set(layers)
        selected = {n for n in selected if layer_index(n) in wanted}

    if not selected:
        raise TargetError(f"no module is left for {method} after the exclude and layer "
                          f"filters; widen target_modules, exclude_modules or layers.")
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(selected, key=order.__getitem__)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module at dotted path ``name`` (``""`` is the model itself)."""
    return model.get_submodule(name) if name else model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module at dotted path ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    setattr(parent, child, module)
