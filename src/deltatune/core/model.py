"""DeltaModel: named deltas on any ``transformers`` model or plain ``nn.Module``.

    dm = DeltaModel(model)
    dm.add("sql", LoraConfig(r=8))          # attach, activate, make trainable
    dm(**batch).loss.backward()              # forward passes straight through
    dm.save_delta("out/sql")                 # JSON config + safetensors of the delta only
    dm.merge(); dm.unmerge()                 # fold into / take out of the base weights
    dm.generate(ids, delta_names=["sql", None])   # one delta per batch row

Only deltas change: the base model's parameters are frozen when it is wrapped, and
every operation here leaves them bit-identical (merge keeps the originals to restore).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.core import io, model_delta
from deltatune.core.config import LIBRARY_VERSION, DeltaConfig
from deltatune.core.errors import (
    AdapterFileCorrupt,
    ConfigError,
    DeltaStateError,
    MergeError,
    NonFiniteError,
    StrictLoadError,
    TargetError,
)
from deltatune.core.fingerprint import base_fingerprint, check_fingerprint, recorded_weight
from deltatune.core.layers import DeltaLayer, LayerDelta, ModuleCopy, WrapperModule, row_deltas
from deltatune.core.payload import check_payload
from deltatune.core.registry import AttachedDelta, config_from_dict, get_method
from deltatune.core.targets import get_submodule, iter_candidate_modules, set_submodule

CONFIG_FILE = "delta_config.json"
WEIGHTS_FILE = "delta.safetensors"
CARD_FILE = "README.md"
FORMAT_NAME = "deltatune.delta"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")


def check_delta_name(name: str) -> str:
    """Return ``name`` if it is a safe delta name (letters, digits, '_' and '-')."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # match() would accept "x\n"
        raise ConfigError(f"delta name {name!r} is not allowed: use 1-64 letters, digits, '_' "
                          f"or '-', starting with a letter, digit or '_'.", field="name")
    return name


@dataclass
class LoadReport:
    """What a load found: tensors extra in the file, missing from it, or of another shape."""

    extra: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    casts: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when every expected tensor was found with the right shape and nothing else."""
        return not (self.extra or self.missing or self.mismatched)

    def describe(self) -> str:
        """Return a human-readable multi-line summary."""
        lines = []
        for title, items in (("extra keys (in the file, not in the delta)", self.extra),
                             ("missing keys (in the delta, not in the file)", self.missing),
                             ("shape or dtype mismatches", self.mismatched),
                             ("casts", self.casts)):
            if items:
                lines.append(f"{title}:")
                lines.extend(f"  {item}" for item in items)
        return "\n".join(lines) or "all tensors loaded"


@dataclass
class DeltaParameters:
    """Parameter counts of one delta."""

    name: str
    method: str
    parameters: int
    percent_of_base: float
    active: bool
    trainable: bool


class DeltaModel(WrapperModule):
    """A base model plus named deltas. Forward, ``generate`` and attributes pass through."""

    WRAPPED = "model"

    def __init__(self, model: nn.Module, *, freeze_base: bool = True) -> None:
        super().__init__()
        if isinstance(model, DeltaModel):
            raise DeltaStateError("the model is already a DeltaModel; add deltas to it directly")
        self.model = model
        self._deltas: dict[str, AttachedDelta] = {}
        self._active: list[str] = []
        self._disabled = False
        # delta name -> {layer: output deviation} of merges into quantized weights.
        self.lossy_merges: dict[str, dict[str, dict[str, float]]] = {}
        if freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)

    # -- attribute pass-through ------------------------------------------------------

    # -- inspection ------------------------------------------------------------------
    @property
    def delta_names(self) -> list[str]:
        """Names of all attached deltas, in the order they were added."""
        return list(self._deltas)

    @property
    def active(self) -> list[str]:
        """Names of the deltas used in forward, in composition order."""
        return list(self._active)

    def get_delta(self, name: str) -> AttachedDelta:
        """Return the attached delta called ``name``."""
        try:
            return self._deltas[name]
        except KeyError:
            known = ", ".join(self._deltas) or "none"
            raise DeltaStateError(f"no delta named {name!r}; attached deltas: {known}") from None

    def _single(self, name: str | None) -> AttachedDelta:
        if name is not None:
            return self.get_delta(name)
        if len(self._active) == 1:
            return self._deltas[self._active[0]]
        if len(self._deltas) == 1:
            return next(iter(self._deltas.values()))
        raise DeltaStateError(f"several deltas are attached ({', '.join(self._deltas)}); name "
                              f"the one to use")

    # -- adding and removing ---------------------------------------------------------
    def add(self, name: str, config: DeltaConfig, *, activate: bool = True,
            trainable: bool = True, dtype: torch.dtype | None = None) -> AttachedDelta:
        """Attach a new delta called ``name`` built from ``config``; return it.

        With ``activate`` (the default) it becomes the one active delta. Its tensors are
        created in the dtype of the weights they sit on unless ``dtype`` is given (e.g.
        ``torch.float32`` for an fp32 master copy on a bf16 model).
        """
        check_delta_name(name)
        if name in self._deltas:
            raise DeltaStateError(f"a delta named {name!r} already exists; delete it first or "
                                  f"choose another name")
        if not isinstance(config, DeltaConfig):
            raise ConfigError(f"expected a DeltaConfig, got {type(config).__name__}")
        config.validate()
        method = get_method(config.method)
        parts = method.attach(self.model, name, config)
        try:
            copies = self._attach_copies(name, config.modules_to_save)
        except BaseException:
            method.detach(self.model, AttachedDelta(name, config, method, parts))
            raise
        for location, part in parts.items():
            part.to(dtype=dtype or _base_dtype(self.model, location, part))
            # New modules start in training mode; follow the model's mode instead, so a
            # delta added to a model in eval() does not run dropout (reliability row 9).
            part.train(self.model.training)
            holder = get_submodule(self.model, location) if location else None
            if isinstance(holder, (DeltaLayer, ModuleCopy)):
                holder.training = self.model.training
        parts.update(copies)
        delta = AttachedDelta(name=name, config=config, method=method, parts=parts,
                              trainable=trainable, info={"copies": sorted(copies)})
        self._deltas[name] = delta
        for p in delta.parameters():
            p.requires_grad_(False)
        if activate:
            self.activate(name)
        return delta

    def _attach_copies(self, name: str, patterns: Sequence[str]) -> dict[str, nn.Module]:
        copies: dict[str, nn.Module] = {}
        if not patterns:
            return copies
        modules = dict(iter_candidate_modules(self.model))
        for pattern in patterns:
            hits = [n for n in modules if n == pattern or n.endswith("." + pattern)]
            hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
            if not hits:
                raise TargetError(f"modules_to_save entry {pattern!r} matched no module; "
                                  f"top-level modules: {', '.join(self._top_level())}")
            for location in hits:
                module = get_submodule(self.model, location)
                if isinstance(module, DeltaLayer):
                    raise TargetError(f"{location} already carries a delta; it cannot also be "
                                      f"listed in modules_to_save")
                if not isinstance(module, ModuleCopy):
                    module = ModuleCopy(module)
                    set_submodule(self.model, location, module)
                copies[location] = module.add(name)
        return copies

    def _top_level(self) -> list[str]:
        return [n for n, _ in self.model.named_children()]

    def delete(self, name: str) -> None:
        """Remove delta ``name`` from the model (unmerging it first if needed)."""
        delta = self.get_delta(name)
        if delta.merged:
            self.unmerge(name)
        if name in self._active:
            self._set_active_flags(delta, False)
            self._active.remove(name)
        delta.method.detach(self.model, AttachedDelta(
            delta.name, delta.config, delta.method,
            {k: v for k, v in delta.parts.items() if k not in delta.info["copies"]}))
        for location in delta.info["copies"]:
            holder = get_submodule(self.model, location)
            del holder.copies[name]
            if name in holder.active:
                holder.active.remove(name)
            if not len(holder.copies):
                set_submodule(self.model, location, holder.original)
        del self._deltas[name]

    # -- activation --------------------------------------------------------------------
    def _layer_parts(self, delta: AttachedDelta) -> AttachedDelta:
        return AttachedDelta(delta.name, delta.config, delta.method,
                             {k: v for k, v in delta.parts.items()
                              if k not in delta.info["copies"]})

    def _set_active_flags(self, delta: AttachedDelta, active: bool) -> None:
        delta.method.set_active(self.model, self._layer_parts(delta), active)
        for location in delta.info["copies"]:
            holder = get_submodule(self.model, location)
            if active and delta.name not in holder.active:
                holder.active.append(delta.name)
            elif not active and delta.name in holder.active:
                holder.active.remove(delta.name)
        for p in delta.parameters():
            p.requires_grad_(active and delta.trainable)

    def activate(self, *names: str) -> None:
        """Make exactly ``names`` the active deltas, composed in the given order.

        Active deltas with ``trainable=True`` have ``requires_grad`` on; every other
        delta's tensors are frozen. ``activate()`` with no names deactivates all.
        """
        for n in names:
            self.get_delta(n)
        for n in list(self._active):
            if n not in names:
                if self._deltas[n].merged:
                    raise DeltaStateError(f"delta {n!r} is merged; unmerge it before "
                                          f"deactivating it")
                self._set_active_flags(self._deltas[n], False)
                self._active.remove(n)
        for n in names:
            if n not in self._active:
                self._active.append(n)
            self._set_active_flags(self._deltas[n], True)

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        """Allow (or stop) training of delta ``name`` while it is active."""
        delta = self.get_delta(name)
        delta.trainable = trainable
        for p in delta.parameters():
            p.requires_grad_(trainable and name in self._active)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the context the model computes exactly the base model's outputs.

        Merged deltas are taken out for the duration (bit for bit) and put back after.
        """
        if self._disabled:
            yield
            return
        merged = [n for n in self._active if self._deltas[n].merged]
        for n in reversed(merged):
            self.unmerge(n)
        self._disabled = True
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(False)
            self._disabled = False
            for n in merged:
                self.merge(n)

    def _set_disabled(self, disabled: bool) -> None:
        for delta in self._deltas.values():
            delta.method.set_disabled(self.model, self._layer_parts(delta), disabled)
        for module in self.model.modules():
            if isinstance(module, (DeltaLayer, ModuleCopy)):
                module.disabled = disabled

    # -- merging --------------------------------------------------------------------
    def merge(self, *names: str, check: bool = True, keep_original: bool = True,
              allow_lossy_merge: bool = False) -> None:
        """Fold deltas (default: the active ones) into the base weights.

        ``check`` refuses non-finite results and compares merged with unmerged outputs
        on a probe batch; on any failure nothing changes. ``keep_original`` keeps a CPU
        copy of each changed tensor so :meth:`unmerge` restores the base bit for bit.
        Merging into fake-quantized weights is refused (the error gives the measured
        output deviation) unless ``allow_lossy_merge``; the deviation per layer then goes
        to ``get_delta(name).info["lossy_merge"]`` and :attr:`lossy_merges`.
        """
        targets = self._mergeable(names)
        for n in targets:
            if self._deltas[n].info["copies"]:
                raise MergeError(f"delta {n!r} carries trainable module copies "
                                 f"({', '.join(self._deltas[n].info['copies'])}); use "
                                 f"merge_and_unload()")
        for n in targets:
            self._merge_one(n, check=check, keep_original=keep_original,
                            allow_lossy=allow_lossy_merge)

    def _mergeable(self, names: Sequence[str]) -> list[str]:
        targets = list(names) or list(self._active)
        if not targets:
            raise DeltaStateError("no delta to merge: none is active")
        for n in targets:
            delta = self.get_delta(n)
            if not delta.method.mergeable:
                raise MergeError(f"delta {n!r} ({delta.config.method}) cannot be merged into the "
                                 f"base weights: its computation is not a change of weights")
        return targets

    def _merge_one(self, name: str, *, check: bool, keep_original: bool,
                   allow_lossy: bool = False) -> None:
        delta = self._deltas[name]
        if delta.merged:
            warnings.warn(f"delta {name!r} is already merged; merge() did nothing", stacklevel=3)
            return
        self._refuse_tied(delta)
        if name not in self._active:
            self.activate(*self._active, name)
        delta.method.merge(self.model, self._layer_parts(delta), check=check,
                           keep_original=keep_original, allow_lossy=allow_lossy)
        delta.merged = True
        lossy = {loc: dict(module.lossy[name]) for loc in self._layer_parts(delta).parts
                 if isinstance(module := get_submodule(self.model, loc) if loc else None,
                               DeltaLayer) and name in module.lossy}
        if lossy:
            delta.info["lossy_merge"] = lossy
            self.lossy_merges[name] = lossy
            worst = max(lossy.items(), key=lambda kv: kv[1]["max_rel"])
            warnings.warn(f"lossy merge of delta {name!r} into quantized weights: output "
                          f"deviation on a probe batch up to {worst[1]['max_abs']:.3g} "
                          f"({worst[1]['max_rel']:.2%} of the largest output) at {worst[0]}, "
                          f"over {len(lossy)} layer(s); recorded in lossy_merges",
                          stacklevel=3)

    def _refuse_tied(self, delta: AttachedDelta) -> None:
        """Refuse to merge into a weight another module shares (tied embeddings and heads).

        Folding a delta into GPT-2's ``wte`` would change ``lm_head`` too: the merged
        model would silently compute something else than the unmerged one.
        """
        owners: dict[int, list[str]] = {}
        for pname, p in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(pname)
        for location, part in self._layer_parts(delta).parts.items():
            module = get_submodule(self.model, location) if location else None
            weight = getattr(getattr(module, "base", None), "weight", None)
            shared = owners.get(id(weight), []) if isinstance(weight, torch.Tensor) else []
            if len(shared) > 1 and isinstance(module, DeltaLayer) and \
                    isinstance(part, LayerDelta) and part.mergeable:
                # A delta that leaves the weight itself alone (BitFit: biases) is fine.
                from deltatune.core.layers import _canonical

                w32 = _canonical(weight.detach(), module.kind).float()
                bias = getattr(module.base, "bias", None)
                with torch.no_grad():
                    new_w, _ = part.merge_into(w32, bias.detach().float()
                                               if bias is not None else None)
                if torch.equal(new_w, w32):
                    continue
            if len(shared) > 1:
                raise MergeError(
                    f"cannot merge delta {delta.name!r} into {location}: its weight is shared "
                    f"with {', '.join(n for n in shared if not n.startswith(location + '.'))} "
                    f"(tied weights), which the merge would change too. Keep the delta "
                    f"unmerged, or untie the weights first (e.g. clone the output head's "
                    f"weight). Nothing was changed.")

    def unmerge(self, *names: str) -> None:
        """Take merged deltas (default: all merged) back out of the base weights."""
        targets = list(names) or [n for n, d in self._deltas.items() if d.merged]
        for n in reversed(targets):
            delta = self.get_delta(n)
            if delta.merged:
                delta.method.unmerge(self.model, self._layer_parts(delta))
                delta.merged = False
                delta.info.pop("lossy_merge", None)
                self.lossy_merges.pop(n, None)

    def merge_and_unload(self, *names: str, check: bool = True,
                         allow_lossy_merge: bool = False) -> nn.Module:
        """Merge deltas (default: active) for good and return the plain base model.

        Module copies of the merged delta (a trained task head) replace the originals.
        ``allow_lossy_merge`` as in :meth:`merge`; the measured deviations stay in
        :attr:`lossy_merges` after the deltas are gone.
        """
        targets = self._mergeable(names)
        for n in targets:
            if not self._deltas[n].merged:
                self._merge_one(n, check=check, keep_original=False,
                                allow_lossy=allow_lossy_merge)
        # Deltas left unmerged are taken out the regular way, so that their methods remove
        # what they put into the model (hooks of parallel adapters, prompt holders,
        # wrappers): the returned model must hold nothing of deltatune.
        dropped = [n for n, d in self._deltas.items() if not d.merged]
        for n in dropped:
            self.delete(n)
        if dropped:
            warnings.warn(f"merge_and_unload removed delta(s) {', '.join(map(repr, dropped))}: "
                          f"they were not merged (merge_and_unload({', '.join(map(repr, targets))})"
                          f" merges only these)", stacklevel=2)
        kept = list(self._deltas)
        for n in kept:
            delta = self._deltas[n]
            delta.method.release(self.model, self._layer_parts(delta))
        for location in {loc for n in kept for loc in self._deltas[n].info["copies"]}:
            holder = get_submodule(self.model, location)
            owner = next(n for n in kept if n in holder.copies)
            set_submodule(self.model, location, holder.copies[owner])
        for location, module in list(self.model.named_modules()):
            if isinstance(module, DeltaLayer):
                set_submodule(self.model, location, module.base)
            elif isinstance(module, ModuleCopy):
                set_submodule(self.model, location, module.original)
        self._deltas.clear()
        self._active.clear()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def unload(self) -> nn.Module:
        """Remove every delta (nothing merged stays) and return the plain base model."""
        for n in list(self._deltas):
            self.delete(n)
        return self.model

    # -- forward ---------------------------------------------------------------------
    @contextmanager
    def _routing(self, delta_names: Sequence[str | None] | None) -> Iterator[None]:
        if delta_names is None:
            yield
            return
        for n in delta_names:
            if n is None:
                continue
            delta = self.get_delta(n)
            if not delta.method.supports_per_row:
                raise DeltaStateError(f"delta {n!r} ({delta.config.method}) cannot be chosen per "
                                      f"row; run its rows as a separate batch")
            if delta.merged:
                raise DeltaStateError(f"delta {n!r} is merged; unmerge() before per-row use")
        with row_deltas(list(delta_names)):
            yield

    def forward(self, *args: Any, delta_names: Sequence[str | None] | None = None,
                **kwargs: Any) -> Any:
        """Run the wrapped model; ``delta_names`` picks a delta (or None) per batch row.

        In training mode, regularisers of the active deltas (``extra_loss``) are added to
        the output's ``loss`` when the model computed one.
        """
        args, kwargs, edit = model_delta.edit_call(self, args, kwargs)
        with self._routing(delta_names):
            output = model_delta.align_outputs(self.model, self.model(*args, **kwargs), edit)
        if self.training and getattr(output, "loss", None) is not None:
            extra = self.extra_loss()
            if extra is not None:
                output.loss = output.loss + extra
        return output

    def generate(self, *args: Any, delta_names: Sequence[str | None] | None = None,
                 **kwargs: Any) -> Any:
        """Call the wrapped model's ``generate``; ``delta_names`` as in :meth:`forward`."""
        args, kwargs, edit = model_delta.edit_call(self, args, kwargs, generate=True)
        with self._routing(delta_names):
            output = self.model.generate(*args, **kwargs)
        return model_delta.restore_generated(self.model, output, edit)

    def extra_loss(self) -> torch.Tensor | None:
        """Return the summed regularisers of the active deltas (None when there are none).

        ``forward`` adds this to the model's own loss in training mode; a training loop
        that computes the loss itself from the logits adds it with this method.
        """
        total = None
        for n in self._active:
            delta = self._deltas[n]
            extra = delta.method.extra_loss(self.model, delta)
            if extra is not None:
                total = extra if total is None else total + extra
        return total

    def training_callbacks(self) -> list[Any]:
        """Return the step callbacks of the active deltas (for a training loop)."""
        out: list[Any] = []
        for n in self._active:
            delta = self._deltas[n]
            out.extend(delta.method.training_callbacks(self.model, delta))
        return out

    # -- parameters --------------------------------------------------------------------
    def delta_parameter_ids(self) -> set[int]:
        """Return ``id()`` of every tensor owned by a delta (not the base's own tensors)."""
        return {id(p) for d in self._deltas.values() if not d.method.trains_base
                for p in d.parameters()}

    def base_parameter_count(self) -> int:
        """Return the number of parameters of the base model (deltas excluded)."""
        ids = self.delta_parameter_ids()
        return sum(p.numel() for p in self.model.parameters() if id(p) not in ids)

    def parameter_report(self) -> list[DeltaParameters]:
        """Return the parameter count of each delta and its share of the base model."""
        base = max(self.base_parameter_count(), 1)
        out = []
        for name, d in self._deltas.items():
            count = sum(p.numel() for p in d.parameters())
            out.append(DeltaParameters(name, d.config.method, count, 100.0 * count / base,
                                       name in self._active, d.trainable))
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Return the parameters that currently require gradients."""
        return [p for p in self.parameters() if p.requires_grad]

    def describe_parameters(self) -> str:
        """Return one line: the trainable count and share of all parameters, then each delta.

        ``trainable: T of N (P%); delta: name (method) count`` where N counts every
        parameter the model holds (base plus every attached delta, active or not, as
        PEFT's "all params" does; a delta that trains the base adds none) and P = T / N.
        Several deltas are listed after ``deltas:``, marked ``[inactive]`` or ``[frozen]``.
        """
        rows = self.parameter_report()
        ids = self.delta_parameter_ids()
        total = self.base_parameter_count() + sum(
            p.numel() for p in self.parameters() if id(p) in ids)
        trainable = sum(p.numel() for p in self.trainable_parameters())
        parts = [f"{r.name} ({r.method}) {r.parameters:,}"
                 + ("" if r.active else " [inactive]")
                 + ("" if r.trainable or not r.active else " [frozen]") for r in rows]
        text = f"trainable: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f}%)"
        if parts:
            text += f"; {'delta' if len(parts) == 1 else 'deltas'}: {', '.join(parts)}"
        return text

    def print_trainable_parameters(self) -> None:
        """Print :meth:`describe_parameters`."""
        print(self.describe_parameters())

    # -- tensors of one delta --------------------------------------------------------------
    def delta_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """Return the tensors that a save of delta ``name`` writes (detached, by saved key)."""
        delta = self._single(name)
        return {k: v.detach() for k, v in delta.method.saved_tensors(self.model, delta).items()}

    def load_delta_state_dict(self, tensors: dict[str, torch.Tensor], name: str | None = None,
                              *, strict: bool = True) -> LoadReport:
        """Copy ``tensors`` into delta ``name``; strict loading refuses any mismatch.

        Returns the :class:`LoadReport`. Nothing is copied unless the whole set fits
        (under ``strict``).
        """
        delta = self._single(name)
        expected = delta.method.saved_tensors(self.model, delta)
        report = LoadReport()
        report.extra = sorted(set(tensors) - set(expected))
        report.missing = sorted(set(expected) - set(tensors))
        for key in sorted(set(tensors) & set(expected)):
            got, want = tensors[key], expected[key]
            if tuple(got.shape) != tuple(want.shape):
                report.mismatched.append(f"{key}: file has shape {list(got.shape)}, the delta "
                                         f"expects {list(want.shape)}")
            elif got.dtype.is_floating_point != want.dtype.is_floating_point:
                report.mismatched.append(f"{key}: file has dtype {got.dtype}, the delta expects "
                                         f"{want.dtype}")
            elif got.dtype != want.dtype:
                report.casts.append(f"{key}: {got.dtype} -> {want.dtype}")
        if strict and not report.clean:
            raise StrictLoadError(f"tensors do not match delta {delta.name!r} "
                                  f"({delta.config.method}):\n{report.describe()}\nFix: load "
                                  f"the delta with the config it was saved with, or pass "
                                  f"strict=False to load the tensors that fit.", report)
        fitting = {k: tensors[k] for k in expected if k in tensors
                   and not any(m.startswith(k + ":") for m in report.mismatched)}
        delta.method.load_saved_tensors(self.model, delta, fitting)
        return report

    # -- saving and loading ----------------------------------------------------------
    def _target_weights(self, delta: AttachedDelta) -> dict[str, torch.Tensor]:
        out = {}
        for location in delta.parts:
            module = get_submodule(self.model, location) if location else self.model
            if isinstance(module, ModuleCopy):
                # A full copy (modules_to_save) replaces the module, so the base's values
                # there do not matter (a new task head is random in every load); its
                # shapes are checked when the copy's tensors are loaded.
                continue
            if isinstance(module, DeltaLayer):
                original = module._originals[0] if module.merged else None
                weight = original[0] if original is not None else recorded_weight(module.base)
            else:
                weight = recorded_weight(module)
            if weight is not None:
                out[location] = weight
        return out

    def save_delta(self, directory: str | Path, name: str | None = None, *,
                   card: dict[str, Any] | None = None, format: str = "deltatune") -> Path:
        """Save one delta as a directory: config JSON, safetensors, model card, manifest.

        ``format="peft"`` writes Hugging Face PEFT's layout instead (adapter_config.json +
        adapter_model.safetensors, see :mod:`deltatune.interop`). The directory is
        replaced atomically; non-finite tensors are refused. Returns the directory path.
        """
        from deltatune.core.card import card_defaults, render_card

        if format == "peft":
            from deltatune.interop.export import save_peft

            return save_peft(self, directory, name, card=card)
        if format != "deltatune":
            raise ConfigError(f"unknown save format {format!r}; use 'deltatune' or 'peft'",
                              field="format")
        delta = self._single(name)
        tensors = self.delta_state_dict(delta.name)
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"delta {delta.name!r} tensor {key!r} holds NaN/inf; "
                                     f"refusing to save it. Nothing was written.")
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()
                         if t.is_floating_point()})
        payload = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": LIBRARY_VERSION,
            "name": delta.name,
            "config": delta.method.saved_config(delta).to_dict(),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "base_model": base_fingerprint(self.model, self._target_weights(delta)),
            "parameters": sum(t.numel() for t in tensors.values()),
            "base_parameters": self.base_parameter_count(),
            "card": card_defaults(self.model, card),
        }
        directory = Path(directory)
        size = sum(t.numel() * t.element_size() for t in tensors.values()) + 64 * 1024
        with io.atomic_directory(directory, expected_bytes=size) as tmp:
            io.save_tensors(tmp / WEIGHTS_FILE, tensors,
                            metadata={"format": "pt", "deltatune.method": delta.config.method})
            io.write_json(tmp / CONFIG_FILE, payload)
            io.write_bytes_durably(tmp / CARD_FILE, render_card(payload).encode("utf-8"))
        return directory

    def save_pretrained(self, directory: str | Path, **_: Any) -> None:
        """Save the active delta (the hook that Hugging Face ``Trainer`` calls)."""
        self.save_delta(directory)

    def load_delta(self, directory: str | Path, name: str | None = None, *,
                   activate: bool = True, trainable: bool = False, strict: bool = True,
                   check_base: str = "strict", allow_nonfinite: bool = False,
                   dtype: torch.dtype | None = None, allow_pickle: bool = False) -> str:
        """Load a saved delta directory under ``name`` (default: its saved name).

        Everything is checked before the model changes: the manifest (sizes and sha256),
        the config, the tensors' finiteness, the base-model fingerprint (``check_base``:
        'strict', 'shapes' or 'off'), and the exact key set (``strict``). On failure the
        model is left as it was. A Hugging Face PEFT adapter directory is accepted too
        (``allow_pickle`` admits a legacy ``adapter_model.bin``, with a warning). Returns
        the delta's name; the :class:`LoadReport` (what ``strict=False`` let through, and
        every dtype cast) is kept in ``get_delta(name).info["load_report"]``.
        """
        directory = Path(directory)
        saved = read_delta_directory(directory, allow_nonfinite=allow_nonfinite,
                                     allow_pickle=allow_pickle)
        payload, tensors = saved.payload, saved.tensors
        name = check_delta_name(name or payload.get("name") or "default")
        config = saved.config
        target_weights = {}
        for location in payload.get("base_model", {}).get("target_shapes", {}):
            try:
                module = get_submodule(self.model, location)
            except AttributeError:
                continue
            base = module.base if isinstance(module, DeltaLayer) else (
                module.original if isinstance(module, ModuleCopy) else module)
            weight = recorded_weight(base)
            if weight is not None:
                target_weights[location] = weight
        if check_base not in ("strict", "shapes", "off"):
            raise ConfigError("check_base must be 'strict', 'shapes' or 'off'", field="check_base")
        check_fingerprint(payload.get("base_model") or {}, self.model, target_weights,
                          level=check_base, source=str(directory))
        if saved.check_model is not None:
            saved.check_model(self.model, check_base)
        file_dtype = _file_dtype(tensors)
        previous_active = list(self._active)
        self.add(name, config, activate=False, trainable=trainable, dtype=dtype or file_dtype)
        try:
            report = self.load_delta_state_dict(tensors, name, strict=strict)
        except BaseException:
            self.delete(name)
            self.activate(*previous_active)
            raise
        self._deltas[name].info["source"] = str(directory)
        # What strict=False let through (extra, missing, mismatched keys, casts).
        self._deltas[name].info["load_report"] = report
        self._deltas[name].info["card"] = payload.get("card") or {}
        if activate:
            self.activate(name)
        return name

    @classmethod
    def from_saved(cls, model: nn.Module, directory: str | Path, **kwargs: Any) -> DeltaModel:
        """Wrap ``model`` and load the delta saved in ``directory`` (see :meth:`load_delta`)."""
        dm = model if isinstance(model, DeltaModel) else cls(model)
        dm.load_delta(directory, **kwargs)
        return dm


def _base_dtype(model: nn.Module, location: str, part: nn.Module) -> torch.dtype:
    module = get_submodule(model, location) if location else model
    base = module.base if isinstance(module, DeltaLayer) else module
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floats[0] if floats else torch.float32


def _file_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


@dataclass
class SavedDelta:
    """A delta directory read and checked, not yet attached to any model."""

    directory: Path
    payload: dict[str, Any]
    config: DeltaConfig
    tensors: dict[str, torch.Tensor]
    # Extra checks against the model, run before anything is attached (a PEFT directory
    # has no fingerprint; its tensor shapes are compared with the model's layers instead).
    check_model: Callable[[nn.Module, str], None] | None = None


def read_delta_directory(directory: str | Path, *, allow_nonfinite: bool = False,
                         allow_pickle: bool = False) -> SavedDelta:
    """Read and verify a saved delta directory without a model.

    Checks the manifest, the config (strict fields), the safetensors structure and the
    tensors' finiteness. A Hugging Face PEFT adapter directory is read through
    :mod:`deltatune.interop` (``allow_pickle`` admits its legacy ``adapter_model.bin``).
    Returns a :class:`SavedDelta`.
    """
    directory = Path(directory)
    io.collect_stale(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such delta directory")
    if not directory.is_dir():
        raise AdapterFileCorrupt(directory, "expected a delta directory, found a file",
                                 "pass the directory that holds delta_config.json")
    if not (directory / CONFIG_FILE).exists() and (directory / "adapter_config.json").exists():
        from deltatune.interop.peft_format import read_peft_directory

        return read_peft_directory(directory, allow_nonfinite=allow_nonfinite,
                                   allow_pickle=allow_pickle)
    io.refuse_pickles(directory)
    io.refuse_pickle_files(directory)
    io.verify_manifest(directory)
    payload = io.read_json(directory / CONFIG_FILE, what="delta config")
    check_payload(directory / CONFIG_FILE, payload, format_name=FORMAT_NAME,
                  format_version=FORMAT_VERSION)
    try:
        config = config_from_dict(payload["config"])
    except ConfigError as exc:
        # Same error class (UnknownMethodError stays one), now naming the file.
        raise type(exc)(f"{directory / CONFIG_FILE}: {exc}", field=exc.field) from None
    tensors, _meta = io.load_tensors(directory / WEIGHTS_FILE)
    if not allow_nonfinite:
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"{directory / WEIGHTS_FILE}: tensor {key!r} holds NaN/inf; "
                                     f"refusing to load it (pass allow_nonfinite=True to "
                                     f"inspect it anyway).")
    return SavedDelta(directory, payload, config, tensors)


def attach(model: nn.Module, config: DeltaConfig, name: str = "default", **kwargs: Any
           ) -> DeltaModel:
    """Wrap ``model`` (if needed) and add one delta; return the :class:`DeltaModel`."""
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    dm.add(name, config, **kwargs)
    return dm


def load(model: nn.Module, directory: str | Path, **kwargs: Any) -> DeltaModel:
    """Wrap ``model`` (if needed) and load a saved delta onto it; return the DeltaModel."""
    return DeltaModel.from_saved(model, directory, **kwargs)


__all__ = ["DeltaModel", "LayerDelta", "LoadReport", "attach", "load", "read_delta_directory"]
