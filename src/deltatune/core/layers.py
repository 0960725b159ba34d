"""Wrappers that put named deltas around frozen modules.

:class:`DeltaLayer` wraps one frozen module (``nn.Linear``, GPT-2's ``Conv1D``,
``nn.Embedding``, ``nn.Conv2d``) and holds any number of named :class:`LayerDelta`
objects. Its forward is the unified view of He et al. (2022):

    x' = pre(x)            for deltas that rescale the input (IA3 on an FFN's input)
    y  = base(x')
    y  = post(x', y)       for every active delta: y + s * delta(x'), or l * y, ...

Rows of one batch may use different deltas (``delta_names=[...]`` on the model); the
routing lives here, once, for every method. :class:`ModuleCopy` gives each delta its own
trainable copy of a whole module (a task head listed in ``modules_to_save``).
"""

from __future__ import annotations

import contextvars
import copy
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.core.errors import DeltaStateError, MergeError, NonFiniteError

# The per-row delta assignment of the batch being computed: one name (or None for the
# base model) per row. Set by DeltaModel.forward/generate, read by every wrapper.
_ROW_DELTAS: contextvars.ContextVar[tuple[str | None, ...] | None] = contextvars.ContextVar(
    "deltatune_row_deltas", default=None
)


# How many row_deltas contexts with an assignment are open, in any thread. While it is 0
# no layer needs to read the ContextVar: that read is a graph break under torch.compile,
# one per adapted layer, which kept compiled decoder layers from fusing.
_ROUTED = 0
_ROUTED_LOCK = threading.Lock()


@contextmanager
def row_deltas(names: Sequence[str | None] | None):
    """Route batch row i through delta ``names[i]`` (None: the base) inside the context."""
    global _ROUTED
    routed = names is not None
    token = _ROW_DELTAS.set(tuple(names) if routed else None)
    if routed:
        with _ROUTED_LOCK:
            _ROUTED += 1
    try:
        yield
    finally:
        _ROW_DELTAS.reset(token)
        if routed:
            with _ROUTED_LOCK:
                _ROUTED -= 1


# A fixed set of deltas that per-row batches are laid out over (set by a decoder that
# replays captured CUDA graphs): the fast paths then stack every delta of the set whatever
# the rows use, so another row assignment changes index tensors only, not layouts.
_ROW_POOL: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "deltatune_row_pool", default=None
)


@contextmanager
def row_pool(names: Sequence[str] | None):
    """Lay per-row batches out over exactly the deltas ``names`` inside the context."""
    token = _ROW_POOL.set(tuple(names) if names is not None else None)
    try:
        yield
    finally:
        _ROW_POOL.reset(token)


def current_row_pool() -> tuple[str, ...] | None:
    """Return the delta set of :func:`row_pool`, or None outside one."""
    return _ROW_POOL.get()


def current_row_deltas(batch_size: int) -> tuple[str | None, ...] | None:
    """Return the row assignment stretched to ``batch_size`` rows, or None when unset.

    A batch larger than the assignment by a whole factor (beam search, or a model that
    flattens batch and time) repeats each entry over consecutive rows.
    """
    if not _ROUTED:  # no assignment anywhere (a plain global: traceable by torch.compile)
        return None
    names = _ROW_DELTAS.get()
    if names is None:
        return None
    if batch_size == len(names):
        return names
    if len(names) and batch_size % len(names) == 0:
        factor = batch_size // len(names)
        return tuple(n for n in names for _ in range(factor))
    raise DeltaStateError(f"delta_names has {len(names)} entries but a layer saw a batch of "
                          f"{batch_size} rows; give one delta name per input row.")


NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm", "RmsNorm")


def is_norm(module: nn.Module) -> bool:
    """True for a normalisation layer with a learned scale (LayerNorm, RMSNorm, T5LayerNorm...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return isinstance(getattr(module, "weight", None), torch.Tensor)
    # transformers defines its own RMS norms per model (LlamaRMSNorm, T5LayerNorm).
    return (type(module).__name__.endswith(NORM_CLASS_SUFFIXES)
            and isinstance(getattr(module, "weight", None), nn.Parameter)
            and module.weight.dim() == 1)


def layer_kind(module: nn.Module) -> str:
    """Return 'linear', 'conv1d' (GPT-2's transposed linear), 'embedding', 'conv2d' or 'norm'."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if is_norm(module):
        return "norm"
    raise TypeError(f"unsupported layer type {type(module).__name__}")


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """Return (d_in, d_out) of a wrappable layer; for an embedding (vocab size, dim)."""
    kind = layer_kind(module)
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv1d":
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if kind == "norm":
        return module.weight.shape[0], module.weight.shape[0]
    return module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels


class LayerDelta(nn.Module):
    """One named delta on one wrapped layer. Subclasses hold the tensors and the math.

    ``post_forward(x, y)`` returns the new output given the (possibly rescaled) input
    and the base output; ``pre_forward(x)`` rescales the input and is only called when
    ``modifies_input`` is True. For mergeable methods, :meth:`merge_into` returns the
    merged (weight, bias) in float32, with the weight in the canonical orientation
    (d_out, d_in) for linear layers and (vocab, dim) for embeddings.
    """

    modifies_input: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        self.d_in, self.d_out = layer_dims(base)

    def pre_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the input the base layer sees (identity unless ``modifies_input``)."""
        return x

    def post_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the layer output with this delta composed onto the base output ``y``."""
        return y

    def merge_into(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (weight, bias) with the delta folded in (float32, canonical orientation)."""
        raise DeltaStateError(f"{type(self).__name__} cannot be merged into weights")

    def fast_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Return ``post_forward(x, base(x))`` by a fused path, or None to use the plain one.

        Called when this delta is the only live one on its layer (deltatune.kernels).
        """
        return None

    @classmethod
    def fast_forward_rows(cls, owner: nn.Module, deltas: dict[str, LayerDelta],
                          rows: Sequence[str | None], x: torch.Tensor) -> torch.Tensor | None:
        """Return the whole mixed-batch output (base included) by a fused path, or None.

        Tried before the base layer runs (so a kernel can do both in one pass); None means
        "run the base layer, then :meth:`post_forward_rows`". Every delta is of this class.
        """
        return None

    @classmethod
    def post_forward_rows(cls, owner: nn.Module, deltas: dict[str, LayerDelta],
                          rows: Sequence[str | None], x: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor | None:
        """Return y with row i passed through ``deltas[rows[i]]`` (None: the base) in one go.

        ``owner`` is the :class:`DeltaLayer` (a place for caches). None means "use the
        plain per-group loop"; every delta in ``deltas`` is of this class.
        """
        return None


def _canonical(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Weight in (d_out, d_in) orientation: Conv1D stores (d_in, d_out)."""
    return weight.t() if kind == "conv1d" else weight


def _quantized(module: nn.Module) -> bool:
    """True for a layer holding quantized weights (bitsandbytes, torch.ao fake-quant...)."""
    weight = getattr(module, "weight", None)
    names = {type(module).__name__, type(weight).__name__}
    return any(tag in n for n in names for tag in ("4bit", "8bit", "Int8", "Params4", "QAT",
                                                 "Quant")) \
        or hasattr(module, "weight_fake_quant") or hasattr(weight, "quant_state")


def _fake_quantized(module: nn.Module) -> bool:
    """True for a layer that keeps a float weight and quantizes it in its forward.

    (torch.ao QAT modules and anything else with a ``weight_fake_quant`` module.) A merged
    float weight can be written back into such a layer; its forward then re-quantizes the
    delta together with the weight, which is lossy but measurable.
    """
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.is_floating_point() and \
        isinstance(getattr(module, "weight_fake_quant", None), nn.Module) and \
        not hasattr(weight, "quant_state")


@contextmanager
def _frozen_observers(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without updating its fake-quant observers (a probe must not calibrate)."""
    saved = [(m, m.observer_enabled.clone()) for m in module.modules()
             if isinstance(getattr(m, "observer_enabled", None), torch.Tensor)]
    try:
        for m, _ in saved:
            m.observer_enabled.fill_(0)
        yield
    finally:
        for m, flag in saved:
            m.observer_enabled.copy_(flag)


class WrapperModule(nn.Module):
    """A module around another one that answers unknown attributes from the wrapped one.

    Model code reads attributes of the module it called (``self.wo.weight.dtype``,
    ``in_features``, a block's config); a wrapper that replaces that module must answer
    them. Subclasses name the submodule that holds the wrapped module in ``WRAPPED``.
    """

    WRAPPED: ClassVar[str] = "base"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in (self.WRAPPED, "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules[self.WRAPPED], name)


class DeltaLayer(WrapperModule):
    """A frozen module plus named deltas, composed in the unified view's order."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.kind = layer_kind(base)
        # Originals of merged tensors, kept to unmerge bit for bit (see merge()).
        self._originals: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        # delta name -> output deviation measured when it was merged into quantized weights.
        self.lossy: dict[str, dict[str, float]] = {}


    # -- forward -------------------------------------------------------------------
    def _live(self) -> list[LayerDelta]:
        return [self.deltas[n] for n in self.active if n not in self.merged]

    def _run(self, deltas: Sequence[LayerDelta], x: torch.Tensor, args: tuple,
             kwargs: dict) -> torch.Tensor:
        if len(deltas) == 1 and not args and not kwargs:
            fused = deltas[0].fast_forward(self.base, x)
            if fused is not None:
                return fused
        for d in deltas:
            if d.modifies_input:
                x = d.pre_forward(x)
        y = self.base(x, *args, **kwargs)
        for d in deltas:
            y = d.post_forward(x, y)
        return y

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            return self.base(x, *args, **kwargs)
        rows = current_row_deltas(x.shape[0]) if x.dim() > 0 else None
        if rows is None:
            return self._run(self._live(), x, args, kwargs)
        if self.merged:
            raise DeltaStateError("per-row delta selection needs unmerged deltas; call "
                                  "unmerge() before passing delta_names")
        return self._forward_per_row(x, rows, args, kwargs)

    def _forward_per_row(self, x: torch.Tensor, rows: tuple[str | None, ...], args: tuple,
                         kwargs: dict) -> torch.Tensor:
        groups: dict[str | None, list[int]] = {}
        for i, n in enumerate(rows):
            groups.setdefault(n if n in self.deltas else None, []).append(i)
        deltas = {n: self.deltas[n] for n in groups if n is not None}
        pool = current_row_pool()
        if pool is not None:
            # every delta of the pool, in its order, even those no row uses now: the
            # fast paths' layouts then stay the same tensors for any row assignment
            stacked = {n: self.deltas[n] for n in pool if n in self.deltas}
            if set(deltas) <= set(stacked):
                deltas = stacked
        if not any(d.modifies_input for d in deltas.values()):
            classes = {type(d) for d in deltas.values()}
            routed = [n if n in deltas else None for n in rows]
            if len(classes) == 1 and not args and not kwargs:
                fast = next(iter(classes)).fast_forward_rows(self, deltas, routed, x)
                if fast is not None:
                    return fast
            # One base pass for the whole batch; each group adds its own delta.
            y = self.base(x, *args, **kwargs)
            if len(classes) == 1:
                fast = classes.pop().post_forward_rows(self, deltas, routed, x, y)
                if fast is not None:
                    return fast
            out = y.clone()
            for n, d in deltas.items():
                if n not in groups:
                    continue
                idx = torch.tensor(groups[n], device=x.device)
                out[idx] = d.post_forward(x[idx], y[idx])
            return out
        out = None
        for n, index_list in groups.items():
            idx = torch.tensor(index_list, device=x.device)
            part = self._run([deltas[n]] if n is not None else [], x[idx], args, kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[idx] = part
        return out

    # -- merging -------------------------------------------------------------------
    def _weight_and_bias(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        return self.base.weight, getattr(self.base, "bias", None)

    def merge(self, name: str, *, check: bool = True, keep_original: bool = True,
              allow_lossy: bool = False) -> None:
        """Fold delta ``name`` into the base weight (and bias) in the weight's own dtype.

        With ``check`` the merged tensors must be finite and the merged layer must give
        the unmerged output on a random probe batch, or nothing changes. With
        ``keep_original`` the pre-merge tensors are kept on the CPU so that
        :meth:`unmerge` restores them bit for bit.

        A fake-quantized base (the layer quantizes its float weight in forward) is
        refused unless ``allow_lossy``; either way the output deviation of the merge on
        the probe batch is measured first and named (see :meth:`lossy_deviation`); when
        allowed, it is kept in ``self.lossy[name]``. Weights stored in an integer or
        packed 4/8-bit format are always refused: there is no float weight to write into.
        """
        if name in self.merged:
            return
        delta = self.deltas[name]
        if not delta.mergeable:
            raise MergeError(f"{type(delta).__name__} cannot be merged into the base weights")
        weight, bias = self._weight_and_bias()
        fake_quant = _fake_quantized(self.base)
        if (not weight.is_floating_point() or _quantized(self.base)) and not fake_quant:
            # Rounding a merged weight back to an integer/packed format would need that
            # format's quantizer; the result changes outputs by more than the delta's
            # effect and cannot be checked here (reliability row 20).
            raise MergeError(f"delta {name!r}: the base weight is quantized ({weight.dtype}, "
                             f"{type(self.base).__name__}) in a stored integer/packed format "
                             f"that deltatune cannot write a merged weight into, even with "
                             f"allow_lossy_merge=True. Keep the delta unmerged, or load the "
                             f"base model in float and merge there. Nothing was changed.")
        w32 = _canonical(weight.detach(), self.kind).float()
        b32 = bias.detach().float() if bias is not None else None
        with torch.no_grad():
            new_w, new_b = delta.merge_into(w32, b32)
        if check or fake_quant:
            bad = [t for t, v in (("weight", new_w), ("bias", new_b))
                   if v is not None and not torch.isfinite(v).all()]
            if bad:
                raise NonFiniteError(f"merging delta {name!r} would write NaN/inf into the base "
                                     f"{' and '.join(bad)}; nothing was changed. Check the "
                                     f"delta's tensors (they are not finite).")
        if fake_quant:
            deviation = self.lossy_deviation(delta, new_w, new_b)
            if not allow_lossy:
                raise MergeError(
                    f"delta {name!r}: the base weight is quantized (fake-quantized by "
                    f"{type(self.base.weight_fake_quant).__name__} in "
                    f"{type(self.base).__name__}); merging re-quantizes the delta with the "
                    f"weight and changes this layer's output by up to "
                    f"{deviation['max_abs']:.3g} ({deviation['max_rel']:.2%} of its largest "
                    f"output; mean {deviation['mean_abs']:.3g}) on a probe batch. Pass "
                    f"allow_lossy_merge=True to merge anyway (the deviation is recorded and "
                    f"written into the merged model card), or keep the delta unmerged. "
                    f"Nothing was changed.")
        elif check:
            self._probe(delta, name, new_w, new_b)
        if keep_original:
            self._originals.append((weight.detach().to("cpu", copy=True),
                                    bias.detach().to("cpu", copy=True)
                                    if bias is not None else None))
        else:
            self._originals.append(None)  # type: ignore[arg-type]
        with torch.no_grad():
            weight.copy_(_canonical(new_w, self.kind).to(weight.dtype))
            if new_b is not None:
                if bias is None:
                    # The delta adds a bias the base layer did not have.
                    self.base.bias = nn.Parameter(new_b.to(weight.dtype), requires_grad=False)
                else:
                    bias.copy_(new_b.to(bias.dtype))
        self.merged.append(name)
        if fake_quant:
            self.lossy[name] = deviation

    def _probe_input(self, d_in: int, weight: torch.Tensor) -> torch.Tensor:
        """The probe batch of a layer: 4 rows of seeded normal inputs (token ids for an
        embedding), drawn from ``torch.Generator().manual_seed(0)``."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        if self.kind == "embedding":
            return torch.randint(0, d_in, (4, 8), generator=gen).to(weight.device)
        return torch.randn(4, d_in, generator=gen).to(weight.device, weight.dtype)

    def lossy_deviation(self, delta: LayerDelta, new_w: torch.Tensor,
                        new_b: torch.Tensor | None) -> dict[str, float]:
        """Measure how much merging changes this fake-quantized layer's output.

        Runs the layer on the probe batch (:meth:`_probe_input`) twice: unmerged (base
        forward, which fake-quantizes the original weight, plus the delta) and merged (base
        forward with the merged float weight, which it fake-quantizes). Observers are frozen,
        so the quantization scales are those the layer has now. Returns ``max_abs``,
        ``mean_abs`` (absolute output differences) and ``max_rel`` (``max_abs`` over the
        largest unmerged output magnitude).
        """
        if self.kind not in ("linear", "conv1d", "embedding"):
            raise MergeError(f"cannot measure a lossy merge into a quantized {self.kind} layer "
                             f"({type(self.base).__name__}); keep the delta unmerged. Nothing "
                             f"was changed.")
        weight = self.base.weight
        x = self._probe_input(new_w.shape[1] if self.kind != "embedding" else new_w.shape[0],
                              weight)
        params = {"weight": _canonical(new_w, self.kind).to(weight.dtype)}
        if new_b is not None:
            params["bias"] = new_b.to(weight.dtype)
        with torch.no_grad(), _frozen_observers(self.base):
            expected = self._run([delta], x, (), {}).float()
            got = torch.func.functional_call(self.base, params, (x,)).float()
        diff = (got - expected).abs()
        max_abs = diff.max().item()
        return {"max_abs": max_abs, "mean_abs": diff.mean().item(),
                "max_rel": max_abs / max(expected.abs().max().item(), 1e-12)}

    def _probe(self, delta: LayerDelta, name: str, new_w: torch.Tensor,
               new_b: torch.Tensor | None) -> None:
        """Compare merged and unmerged outputs on a random batch; raise MergeError if apart.

        ``new_w`` is in canonical orientation and float32.
        """
        if self.kind == "conv2d":
            return
        weight = self.base.weight
        if self.kind == "norm":
            gen = torch.Generator(device="cpu").manual_seed(0)
            self._probe_norm(delta, name, new_w, new_b, gen)
            return
        x = self._probe_input(new_w.shape[1] if self.kind != "embedding" else new_w.shape[0],
                              weight)
        with torch.no_grad():
            expected = self._run([delta], x, (), {}).float()
            w = new_w.to(weight.dtype).float()
            if self.kind == "embedding":
                got = torch.nn.functional.embedding(x, w)
            else:
                got = torch.nn.functional.linear(x.float(), w)
            if new_b is not None:
                got = got + new_b.to(weight.dtype).float()
        scale = expected.abs().max().clamp_min(1e-6)
        tolerance = 3e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
        err = ((got - expected).abs().max() / scale).item()
        if not err <= tolerance:
            raise MergeError(f"merged output of delta {name!r} differs from the unmerged output "
                             f"by {err:.2e} (relative) on a probe batch, above {tolerance:g}; "
                             f"nothing was changed.")

    def _probe_norm(self, delta: LayerDelta, name: str, new_w: torch.Tensor,
                    new_b: torch.Tensor | None, gen: torch.Generator) -> None:
        """The probe of :meth:`_probe` for a norm layer: run it with the merged tensors."""
        weight = self.base.weight
        x = torch.randn(4, new_w.shape[0], generator=gen).to(weight.device, weight.dtype)
        params = {"weight": new_w.to(weight.dtype)}
        if new_b is not None:
            params["bias"] = new_b.to(weight.dtype)
        with torch.no_grad():
            expected = self._run([delta], x, (), {}).float()
            got = torch.func.functional_call(self.base, params, (x,)).float()
        scale = expected.abs().max().clamp_min(1e-6)
        tolerance = 3e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
        err = ((got - expected).abs().max() / scale).item()
        if not err <= tolerance:
            raise MergeError(f"merged output of delta {name!r} differs from the unmerged output "
                             f"by {err:.2e} (relative) on a probe batch, above {tolerance:g}; "
                             f"nothing was changed.")

    def forget_original(self, name: str) -> None:
        """Drop the kept pre-merge copy of delta ``name`` (it can then not be unmerged)."""
        self._originals[self.merged.index(name)] = None  # type: ignore[call-overload]

    def unmerge(self, name: str | None = None) -> None:
        """Undo merges, newest first, down to and including ``name`` (all when None)."""
        while self.merged:
            last = self.merged[-1]
            original = self._originals.pop()
            weight, bias = self._weight_and_bias()
            with torch.no_grad():
                if original is not None:
                    w0, b0 = original
                    weight.copy_(w0.to(weight.device))
                    if b0 is not None:
                        bias.copy_(b0.to(bias.device))
                    elif bias is not None:
                        self.base.bias = None
                else:
                    raise DeltaStateError(
                        f"delta {last!r} was merged with keep_original=False, so it cannot "
                        f"be taken out bit for bit; reload the base model instead.")
            self.merged.pop()
            self.lossy.pop(last, None)
            if last == name:
                break

    # -- bookkeeping ----------------------------------------------------------------
    def set_active(self, name: str, active: bool) -> None:
        """Add ``name`` to, or remove it from, the deltas used in forward."""
        if active and name not in self.active:
            self.active.append(name)
        elif not active and name in self.active:
            if name in self.merged:
                raise DeltaStateError(f"delta {name!r} is merged; unmerge it before "
                                      f"deactivating it")
            self.active.remove(name)

    def remove(self, name: str) -> None:
        """Delete delta ``name`` from this layer."""
        if name in self.merged:
            self.unmerge(name)
        if name in self.active:
            self.active.remove(name)
        del self.deltas[name]


class ModuleCopy(WrapperModule):
    """A frozen module and one trainable copy of it per delta (``modules_to_save``)."""

    WRAPPED = "original"

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False


    def add(self, name: str) -> nn.Module:
        """Create the trainable copy for delta ``name`` and return it."""
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = [n for n in self.active if n in self.copies]
        if self.disabled or not live:
            return self.original(*args, **kwargs)
        first = args[0] if args else next(iter(kwargs.values()))
        rows = current_row_deltas(first.shape[0]) if torch.is_tensor(first) else None
        if rows is None:
            return self.copies[live[-1]](*args, **kwargs)
        outputs = None
        for n in dict.fromkeys(rows):
            idx = torch.tensor([i for i, r in enumerate(rows) if r == n], device=first.device)
            module = self.copies[n] if n in self.copies else self.original  # noqa: SIM401
            part = module(first[idx], *args[1:], **kwargs)
            if outputs is None:
                outputs = part.new_empty((first.shape[0], *part.shape[1:]))
            outputs[idx] = part
        return outputs
