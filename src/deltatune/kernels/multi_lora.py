"""Mixed-adapter LoRA batches: every row of a batch through its own adapter at once.

The plain path (:func:`multi_lora_reference`, what ``DeltaLayer`` does for any method)
runs one gather, two small matmuls and one scatter per adapter present, so a batch of
32 distinct adapters costs 32 launches of each. Here the adapters are laid side by side
once (and cached while their tensors do not change) and the whole batch takes two
batched matmuls, in one of two layouts (Punica's BGMV and a concatenated form):

- :func:`multi_lora_gathered` (prefill, many tokens per row): each row's A and B are
  gathered from a stack padded to the largest rank, then one ``bmm`` shrinks and one
  ``baddbmm`` expands into the base output. Work is exactly each row's own rank.
- :func:`multi_lora_concat` (decode, few tokens per row): the A's of all adapters in
  the batch are concatenated into one (sum r, d_in) matrix, so the shrink is one matmul
  reading each adapter once; a 0/1 mask keeps each row's own block, and one ``addmm``
  expands through the concatenated B's. The extra arithmetic (sum r instead of r per
  token) is nothing when there are few tokens, and no per-row weight copy is written.

Rows routed to the base model use an all-zero adapter (gathered) or an all-zero mask.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from deltatune.core.layers import current_row_pool
from deltatune.kernels import triton_lora
from deltatune.kernels.shared_shrink import SIBLINGS, ShrinkGroup, shared_shrink, sibling_output


def multi_lora_reference(x: torch.Tensor, y: torch.Tensor, row_adapter: Sequence[int],
                         As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                         scales: Sequence[float]) -> torch.Tensor:
    """Return y with row i plus s_k (x_i A_k^T) B_k^T for k = row_adapter[i] (-1: nothing).

    ``x`` is (rows, ..., d_in) and ``y`` (rows, ..., d_out): one adapter per leading row.
    """
    out = y.clone()
    for k, (A, B, s) in enumerate(zip(As, Bs, scales)):
        idx = [i for i, a in enumerate(row_adapter) if a == k]
        if not idx:
            continue
        index = torch.tensor(idx, device=x.device)
        xs = x[index]
        out[index] = y[index] + ((xs.to(A.dtype) @ A.t()) @ B.t() * s).to(y.dtype)
    return out


def stack_padded(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                 scales: Sequence[float], dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A_stack (n+1, r_max, d_in), B_stack (n+1, d_out, r_max)) with s folded into B.

    Ranks below r_max are zero-padded; entry n is all zeros (the base model's rows).
    """
    r_max = max(A.shape[0] for A in As)
    d_in, d_out = As[0].shape[1], Bs[0].shape[0]
    a_rows, b_cols = [], []
    for A, B, s in zip(As, Bs, scales):
        pad = r_max - A.shape[0]
        a_rows.append(F.pad(A.to(dtype), (0, 0, 0, pad)))
        b_cols.append(F.pad(B.to(dtype) * s, (0, pad)))
    a_rows.append(As[0].new_zeros((r_max, d_in), dtype=dtype))
    b_cols.append(Bs[0].new_zeros((d_out, r_max), dtype=dtype))
    return torch.stack(a_rows), torch.stack(b_cols)


def stack_concat(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                 scales: Sequence[float], dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Return (A_cat (sum r, d_in), B_cat (d_out, sum r) with s folded in, rank offsets)."""
    offsets = [0]
    for A in As:
        offsets.append(offsets[-1] + A.shape[0])
    a_cat = torch.cat([A.to(dtype) for A in As], 0)
    b_cat = torch.cat([B.to(dtype) * s for B, s in zip(Bs, scales)], 1)
    return a_cat, b_cat, offsets


def concat_mask(row_adapter: Sequence[int], offsets: Sequence[int], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Return the (rows, sum r) 0/1 mask that keeps each row's own adapter block."""
    mask = torch.zeros(len(row_adapter), offsets[-1], dtype=dtype)
    for i, k in enumerate(row_adapter):
        if k >= 0:
            mask[i, offsets[k]:offsets[k + 1]] = 1
    return mask.to(device)


def multi_lora_gathered(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                        a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    """Return y plus each row's LoRA term through gathered per-row adapters (BGMV).

    ``index`` (rows,) holds each row's entry of the stacks (n for the base model).
    In place on ``y`` when autograd does not need it.
    """
    rows, d_in, d_out = x.shape[0], x.shape[-1], y.shape[-1]
    x3 = x.reshape(rows, -1, d_in)
    a_rows, b_rows = a_stack[index], b_stack[index]
    h = torch.bmm(x3, a_rows.transpose(1, 2))  # (rows, T, r_max)
    y3 = y.reshape(rows, -1, d_out)
    if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad):
        return torch.baddbmm(y3, h, b_rows.transpose(1, 2)).view(y.shape)
    return y3.baddbmm_(h, b_rows.transpose(1, 2)).view(y.shape)


def multi_lora_concat(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                      a_cat: torch.Tensor, b_cat: torch.Tensor) -> torch.Tensor:
    """Return y plus each row's LoRA term through concatenated adapters and a row mask.

    ``mask`` is (rows, sum r) from :func:`concat_mask`. In place on ``y`` when autograd
    does not need it.
    """
    rows, d_in, d_out = x.shape[0], x.shape[-1], y.shape[-1]
    x3 = x.reshape(rows, -1, d_in)
    h = (x3 @ a_cat.t()) * mask[:, None, :]  # (rows, T, sum r): other adapters zeroed
    h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1, d_out)
    if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad):
        return torch.addmm(y2, h2, b_cat.t()).view(y.shape)
    return y2.addmm_(h2, b_cat.t()).view(y.shape)




# At most this many tokens per row: the concatenated layout (a short prompt too: at 32
# rows x 16 tokens it measured faster than the gathered one on an H200, 4.70 vs 4.75 ms
# per generated token over a 16-token generation, bench/results/gpu_lora-20261201-171203)
DECODE_TOKENS = 16


def _value(v):
    return v() if callable(v) else v


_OWNER: ContextVar[object | None] = ContextVar("deltatune_graph_owner", default=None)


@contextlib.contextmanager
def graph_owner(owner: object) -> Iterator[None]:
    """Within: layouts a CUDA graph capture reads stay alive and current while ``owner``
    (held by weak reference: a decoder, say) lives, whatever other batches use the
    layers meanwhile. A capture outside any owner pins its layouts for good."""
    token = _OWNER.set(owner)
    try:
        yield
    finally:
        _OWNER.reset(token)


class LayoutSet:
    """The cached layouts of one set of adapters (one cache key) in one layer.

    ``tensors`` are the adapters' A's then B's; ``state`` their version counters and
    storage pointers when last laid out. A set that a CUDA graph captured is pinned: the
    graph reads its tensors where they are and runs no Python, so they must outlive it.
    """

    def __init__(self, key: tuple, tensors: Sequence[torch.Tensor]) -> None:
        self.key, self.tensors = key, list(tensors)
        self.state = self._observe()
        self.layouts: dict = {}
        self.rows: dict[tuple, object] = {}
        self.captured: set = set()  # layout kinds a CUDA graph capture has read
        self.retired: dict = {}  # kind -> (entry, tensor) replaced by a group's views
        # layers reading the same input share one shrink launch (kernels.shared_shrink)
        self.shrink_group: ShrinkGroup | None = None
        self.pinners: weakref.WeakSet = weakref.WeakSet()
        self.pinned_for_good = False

    def _observe(self) -> tuple[list[int], list[int]]:
        return [t._version for t in self.tensors], [t.data_ptr() for t in self.tensors]

    @property
    def pinned(self) -> bool:
        """Whether a live CUDA graph reads these layouts."""
        return self.pinned_for_good or len(self.pinners) > 0

    def pin(self) -> None:
        """Called during a capture: keep these layouts for the capturing owner."""
        owner = _OWNER.get()
        if owner is None:
            self.pinned_for_good = True
        else:
            self.pinners.add(owner)

    def sync(self) -> bool:
        """Bring the layouts up to date; False when they must be rebuilt.

        Values changed in place (an optimizer step, ``load_delta_state_dict``) are rewritten
        into the same layout tensors, so anything holding them (a captured CUDA graph)
        reads the new values; adapters that moved to other storage cannot be followed.
        """
        versions, pointers = self._observe()
        if (versions, pointers) == self.state:
            return True
        if pointers != self.state[1]:
            return False
        n = len(self.tensors) // 2
        dtype, scales = self.key[2], list(self.key[4])
        with torch.no_grad():
            for kind, layout in self.layouts.items():
                fresh = AdapterBank._build(kind, self.tensors[:n], self.tensors[n:], scales,
                                           dtype)
                for old, new in zip(layout, fresh):
                    if isinstance(old, torch.Tensor):
                        old.copy_(new)
                for i, old in self.retired.get(kind, ()):
                    old.copy_(fresh[i])
        self.state = (versions, pointers)
        return True


class AdapterBank:
    """Side-by-side layouts of a layer's adapters, cached while their tensors are unchanged.

    The cache is checked against the adapters' identity (``keys``), storage and version
    counters (an optimizer step or a load bumps the version), so a changed adapter is
    re-laid out on the next call; with autograd recording through trainable adapters
    nothing is cached. Switching adapters swaps no module and recompiles nothing. The
    checks are a few list comparisons per layer: decoding one token is bound by Python.

    One :class:`LayoutSet` per set of adapters: the current one, plus those a live CUDA
    graph captured (a batch of another mix run eagerly in between must not free or
    rebuild what a decoder's graphs read).
    """

    def __init__(self) -> None:
        self._sets: dict[tuple, LayoutSet] = {}
        self._current: LayoutSet | None = None
        self._stale: list[LayoutSet] = []  # pinned sets whose adapters moved
        self.pending_h: tuple | None = None  # (input, version, h slice, group): the leader's
        self.pending_y: tuple | None = None  # (input, version, output, group, base): same

    # the current set's parts (the shrink groups and the tests read them)
    @property
    def _layouts(self) -> dict:
        return self._current.layouts if self._current is not None else {}

    @property
    def _rows(self) -> dict:
        return self._current.rows if self._current is not None else {}

    @property
    def shrink_group(self) -> ShrinkGroup | None:
        """The shrink group of the current adapter set, if any."""
        return self._current.shrink_group if self._current is not None else None

    @shrink_group.setter
    def shrink_group(self, group: ShrinkGroup | None) -> None:
        if self._current is not None:
            self._current.shrink_group = group

    def a_stack(self, kind) -> torch.Tensor | None:
        """The A stack of layout ``kind`` of the current set, if laid out."""
        layout = self._layouts.get(kind)
        return None if layout is None else layout[0]

    def replace_entry(self, kind, i: int, view: torch.Tensor) -> None:
        """Make ``view`` (same shape and values) entry ``i`` of the current set's layout
        ``kind`` (0: the A stack, 1: the B stack).

        A captured CUDA graph may read the old one: that one is then kept alive and
        rewritten with the others when the adapters change in place.
        """
        current = self._current
        old = current.layouts[kind]
        if kind in current.captured:
            current.retired.setdefault(kind, []).append((i, old[i]))
        current.layouts[kind] = (*old[:i], view, *old[i + 1:])

    @staticmethod
    def _build(kind, As, Bs, scales, dtype: torch.dtype) -> tuple:
        """Return the layout ``kind`` of these adapters (a tuple holding tensors)."""
        if kind == "concat":
            return stack_concat(As, Bs, scales, dtype)
        a_stack, b_stack = stack_padded(As, Bs, scales, dtype)
        if kind == "padded":
            return a_stack, b_stack
        layout = kind[1].removeprefix("add-")  # ("bgmv", [add-]gather | [add-]concat)
        if layout == "gather":
            return a_stack, triton_lora.expand_layout(b_stack), None
        return a_stack, b_stack, triton_lora.concat_layout(b_stack)

    def sync(self) -> bool:
        """Bring the current set's layouts up to date (:meth:`LayoutSet.sync`)."""
        return self._current is not None and self._current.sync()

    def _drop(self, key: tuple) -> None:
        """Forget the set ``key``; one a live graph reads stays allocated (never updated)."""
        dropped = self._sets.pop(key)
        if dropped is self._current:
            self._current = None
        self._stale = [s for s in self._stale if s.pinned]
        if dropped.pinned:
            self._stale.append(dropped)

    def refresh(self, owner: object | None = None) -> bool:
        """Rewrite in place the cached layouts whose adapters' values changed.

        A captured CUDA graph reads these tensors where they are and runs no Python, so
        the check an eager call makes never happens during a replay; the decoder calls this
        before replaying (:class:`~deltatune.kernels.graph_decode.GraphDecoder`), which
        makes an in-place adapter switch (``load_delta_state_dict``) reach mixed-batch
        graphs too. Returns True when something was rewritten. Adapters that moved to
        other storage (a new tensor) drop the cache instead: the next eager call rebuilds
        it, and a graph captured on the old one needs a new decoder.

        ``owner`` (a decoder): only the current set and those its graphs read are checked;
        sets other decoders pinned are theirs to refresh (each check reads every adapter
        tensor's version and address: ~2 ms for 112 layers of 32 adapters).
        """
        changed = False
        for key, layout_set in list(self._sets.items()):
            if (owner is not None and layout_set is not self._current
                    and owner not in layout_set.pinners):
                continue
            before = layout_set.state
            if not layout_set.sync():
                self._drop(key)
            elif layout_set.state != before:
                changed = True
        return changed

    def clear(self) -> None:
        """Forget every cached layout (the next call lays its adapters out afresh); those
        a live CUDA graph reads stay allocated, no longer updated."""
        for key in list(self._sets):
            self._drop(key)

    def _prepare(self, names, As, Bs, scales, x: torch.Tensor, keys) -> tuple:
        """Return (As, Bs, cache): the adapter tensors and whether layouts may be cached;
        when they may, the set of these adapters becomes the current one."""
        if torch.is_grad_enabled():
            As, Bs = _value(As), _value(Bs)
            if any(t.requires_grad for t in (*As, *Bs)):
                return As, Bs, False
        key = (tuple(names), keys, x.dtype, x.device, tuple(scales))
        layout_set = self._sets.get(key)
        if layout_set is not None and not (layout_set.tensors and layout_set.sync()):
            self._drop(key)
            layout_set = None
        if layout_set is None:
            As, Bs = _value(As), _value(Bs)
            for other in [k for k, s in self._sets.items() if not s.pinned]:
                self._drop(other)  # one unpinned set at a time bounds the memory
            layout_set = self._sets[key] = LayoutSet(key, [*As, *Bs])
        else:
            # Valid cache: the stored tensors are the adapters' (same objects, unchanged).
            n = len(layout_set.tensors) // 2
            As, Bs = layout_set.tensors[:n], layout_set.tensors[n:]
        self._current = layout_set
        if triton_lora.capturing():
            layout_set.pin()
        return As, Bs, True

    def apply(self, names: Sequence[str], As: Sequence[torch.Tensor],
              Bs: Sequence[torch.Tensor], scales: Sequence[float],
              row_adapter: Sequence[int], x: torch.Tensor, y: torch.Tensor,
              keys: tuple | None = None) -> torch.Tensor:
        """Return y plus row i's LoRA term through adapter ``row_adapter[i]`` (-1: none).

        ``keys`` identifies the adapter objects (default: the names); As, Bs and scales
        may be zero-argument callables, evaluated only when the layout is rebuilt.
        """
        As, Bs, cache = self._prepare(names, As, Bs, scales, x, keys)
        return self._apply(As, Bs, scales, tuple(row_adapter), x, y, cache)

    def fused(self, names: Sequence[str], As, Bs, scales: Sequence[float],
              row_adapter: Sequence[int], x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, keys: tuple | None = None) -> torch.Tensor | None:
        """Return x W^T + b plus each row's LoRA term by the Triton BGMV kernels, or None.

        Taken for few tokens (at most :data:`DECODE_TOKENS` per row and
        :data:`~deltatune.kernels.triton_lora.SMALL_M` in all, or
        :func:`~deltatune.kernels.triton_lora.prompt_rows` for the add layouts) outside
        autograd on a device Triton runs on; None tells the caller to run the base layer and
        :meth:`apply`. Arguments as for :meth:`apply`, with the base layer's (d_out, d_in)
        ``weight`` and ``bias`` instead of its output.
        """
        d_in = x.shape[-1]
        total = x.numel() // max(d_in, 1)
        tokens = total // max(x.shape[0], 1)
        layout = triton_lora.bgmv_layout(d_in)
        limit = triton_lora.SMALL_M
        if layout is not None and layout.startswith("add-"):
            limit = max(limit, triton_lora.prompt_rows())
        if (torch.is_grad_enabled() or x.dim() < 2 or total > limit
                or tokens > DECODE_TOKENS or layout is None or not triton_lora.available(x)):
            return None
        As, Bs, cache = self._prepare(names, As, Bs, scales, x, keys)
        if not cache or not triton_lora.supports(x, weight, max(A.shape[0] for A in As)):
            return None
        current = self._current
        kind = ("bgmv", layout)
        if kind not in current.layouts:
            current.layouts[kind] = self._build(kind, As, Bs, scales, x.dtype)
        a_stack, b_stack, b_concat = current.layouts[kind]
        base_entry = len(As)

        def token_index(rows: tuple) -> torch.Tensor:
            per_row = [k if k >= 0 else base_entry for k in rows]
            return torch.tensor([k for k in per_row for _ in range(tokens)],
                                dtype=torch.int32, device=x.device)

        rows = tuple(row_adapter)
        x2 = x.reshape(total, d_in)
        index = self._row_tensor(current.rows, ("tokens", tokens), rows, token_index)
        if kind[1].startswith("add-"):
            # cuBLAS streams W, the kernel adds only the LoRA term into its output; layers
            # reading the same input share one shrink launch
            # (the rows' entries: same names and rows give the same index tensor values)
            SIBLINGS.observe(self, x, (tuple(names), rows, tokens, kind), (weight, bias))
            if triton_lora.capturing():
                current.captured.add(kind)
            whole = sibling_output(self, x, x2, index, weight, bias)
            if whole is not None:
                return whole.view(*x.shape[:-1], weight.shape[0])
            h = shared_shrink(self, x, x2, index, weight.shape[0])
            y = triton_lora.bgmv_matmul(x2, None, None, a_stack, b_stack, index,
                                        b_concat=b_concat, out=F.linear(x2, weight, bias),
                                        h=h)
        else:
            y = triton_lora.bgmv_matmul(x2, weight, bias, a_stack, b_stack, index,
                                        b_concat=b_concat)
        return y.view(*x.shape[:-1], weight.shape[0])

    def _apply(self, As, Bs, scales, rows: tuple, x: torch.Tensor, y: torch.Tensor,
               cache: bool) -> torch.Tensor:
        tokens = x.numel() // max(x.shape[0] * x.shape[-1], 1)
        layouts, row_cache = (self._layouts, self._rows) if cache else ({}, {})
        if tokens <= DECODE_TOKENS:
            if "concat" not in layouts:
                layouts["concat"] = self._build("concat", As, Bs, scales, x.dtype)
            a_cat, b_cat, offsets = layouts["concat"]
            mask = self._row_tensor(row_cache, ("mask",), rows, lambda rows: concat_mask(
                rows, offsets, x.dtype, x.device))
            return multi_lora_concat(x, y, mask, a_cat, b_cat)
        if "padded" not in layouts:
            layouts["padded"] = self._build("padded", As, Bs, scales, x.dtype)
        a_stack, b_stack = layouts["padded"]
        base_entry = len(As)
        index = self._row_tensor(row_cache, ("index",), rows, lambda rows: torch.tensor(
            [k if k >= 0 else base_entry for k in rows], device=x.device))
        return multi_lora_gathered(x, y, index, a_stack, b_stack)

    @staticmethod
    def _row_tensor(row_cache: dict, what: tuple, rows: tuple, build) -> torch.Tensor:
        """Return the per-row tensor ``what`` for the row assignment ``rows`` (positions in
        the adapters, -1 for the base), built by ``build(rows)`` and cached.

        Inside :func:`~deltatune.core.layers.row_pool` there is one tensor per kind and
        row count, rewritten in place for another assignment, so a captured CUDA graph
        that reads it follows (:meth:`reroute` rewrites it before a replay).
        """
        if current_row_pool() is None:
            key = (*what, rows)
            if key not in row_cache:
                if len(row_cache) > 64:  # forget other assignments (never the pooled ones)
                    for old in [k for k in row_cache if k[0] != "pooled"]:
                        del row_cache[old]
                row_cache[key] = build(rows)
            return row_cache[key]
        key = ("pooled", *what, len(rows))
        entry = row_cache.get(key)
        if entry is None:
            entry = row_cache[key] = [rows, build(rows), build]
        _rewrite(entry, rows)
        return entry[1]

    def reroute(self, row_names: Sequence[str | None]) -> int:
        """Rewrite in place the pooled per-row tensors for rows routed to the adapters
        ``row_names`` (one name per row, None or an adapter this layer lacks: the base).

        A graph captured under :func:`~deltatune.core.layers.row_pool` runs no Python, so
        the decoder calls this before replaying with another row assignment. Returns how
        many tensors were rewritten.
        """
        count = 0
        for layout_set in self._sets.values():
            names = list(layout_set.key[0])
            rows = tuple(names.index(n) if n in names else -1 for n in row_names)
            count += sum(_rewrite(entry, rows) for key, entry in layout_set.rows.items()
                         if key[0] == "pooled" and key[-1] == len(rows))
        return count


def _rewrite(entry: list, rows: tuple) -> bool:
    """Make a pooled per-row entry ``[rows, tensor, build]`` hold ``rows``, in place;
    True when it was rewritten."""
    if entry[0] == rows:
        return False
    with torch.no_grad():
        entry[1].copy_(entry[2](rows))
    entry[0] = rows
    return True


def banks_of(model: torch.nn.Module) -> list[AdapterBank]:
    """Return the mixed-batch layout caches of ``model``'s layers (those a mixed-adapter
    batch has gone through so far)."""
    banks = (module.__dict__.get("_lora_bank") for module in model.modules())
    return [bank for bank in banks if isinstance(bank, AdapterBank)]


def refresh_layouts(model: torch.nn.Module | Sequence[AdapterBank],
                    owner: object | None = None) -> int:
    """Rewrite in place the cached mixed-batch layouts of every layer of ``model`` whose
    adapters changed (:meth:`AdapterBank.refresh`); returns how many were rewritten.

    ``model`` may be the list :func:`banks_of` returned: walking a model with many
    adapters module by module costs milliseconds, once per generation. ``owner``: check
    only the sets that decoder's graphs read, and the current ones.
    """
    banks = banks_of(model) if isinstance(model, torch.nn.Module) else model
    return sum(bank.refresh(owner) for bank in banks)


__all__ = ["AdapterBank", "LayoutSet", "banks_of", "concat_mask", "graph_owner",
           "multi_lora_concat", "multi_lora_gathered", "multi_lora_reference",
           "refresh_layouts", "stack_concat", "stack_padded"]
