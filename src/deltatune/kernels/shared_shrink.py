"""Sibling groups: layers that read the same input in a mixed-adapter decode step.

In a Llama layer q, k and v read the same hidden states, and so do gate and up. Under the
BGMV add layouts (:mod:`deltatune.kernels.multi_lora`, :func:`~deltatune.kernels.
triton_lora.bgmv_layout`) each adapted linear costs a cuBLAS base call, a shrink launch
(every row through its own adapter's A) and an add launch. Siblings share:

- their shrinks, as one launch over their A stacks laid side by side along the rank (on
  an H200 a 1B mixed-32 decode step went from 0.787x to 0.827x one adapter's throughput,
  docs/performance.md, fifth session);
- with the gathered layout and equal ranks, also the add: the leader computes every
  member's base GEMV into one buffer and adds all their LoRA terms in one launch through
  their B stacks laid side by side (0.834x -> 0.892x, sixth session). The members return
  their blocks.

Nothing about the model's structure is assumed. :class:`SiblingInputs` learns the groups
at run time: calls with the very same input tensor object, unchanged (version counter),
the same adapters and the same rows, one after another. A layer whose input turns out to
be another tensor computes its own output. The first layer of a group (the leader) leaves
each member its slice of h or its whole output, tagged with the input it came from.

A group belongs to one adapter set of each bank (:class:`~deltatune.kernels.multi_lora.
LayoutSet`): a batch of another mix builds its own layouts, and a decoder's graphs keep
reading the set they captured.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from deltatune.kernels import triton_lora

if TYPE_CHECKING:
    from deltatune.kernels.multi_lora import AdapterBank, LayoutSet


def input_version(t: torch.Tensor) -> int:
    """``t``'s version counter; -2 for an inference tensor (``torch.inference_mode``),
    which has none: such inputs are matched by identity alone."""
    return -2 if t.is_inference() else t._version


class ShrinkGroup:
    """Banks whose A stacks (layout ``kind``) are slices of one tensor, ``joined``.

    Each bank's adapter set (``sets``, current when the group formed) holds its slice as
    its layout, so in-place rewrites of its adapters (:meth:`LayoutSet.sync`) land in
    ``joined``; ``offsets`` are the slices' first columns (rank entries).

    With the gathered layout and equal ranks the B stacks are joined too (``b_joined``,
    along the output columns), and the leader computes every member's whole output:
    one cuBLAS GEMV per member into one buffer, one shrink, one launch adding every
    member's LoRA term (:func:`~deltatune.kernels.triton_lora.bgmv_add_group`). Members
    then return their block of it. That saves two launches of ~6 us per q/k/v and one per
    gate/up in a mixed-adapter decode step.
    """

    def __init__(self, banks: list[AdapterBank], sets: list[LayoutSet], kind: tuple,
                 joined: torch.Tensor, views: list[torch.Tensor], offsets: list[int]) -> None:
        self.banks, self.sets, self.kind, self.joined = banks, sets, kind, joined
        self.views, self.offsets = views, offsets
        self.bases: list[tuple] = []  # (weight, bias) of each member, for the whole path
        self.b_joined: torch.Tensor | None = None
        self.b_views: list[torch.Tensor] = []
        self.widths: list[int] = []
        self.tiles: dict[int, torch.Tensor] = {}  # block_n -> tile table
        self._stack: tuple | None = None  # (weights, biases) stacked: DELTATUNE_STACK_SIBLINGS
        self._stack_state: tuple | None = None

    @classmethod
    def form(cls, banks: list[AdapterBank], kind: tuple,
             bases: list[tuple] | None = None) -> ShrinkGroup | None:
        """Lay the banks' A stacks side by side and make each bank's layout its slice;
        None where they cannot share (not all laid out, other shapes, already grouped, or
        inside a graph capture, whose memory pool must not get this tensor). ``bases``:
        each bank's base (weight, bias) as last called, for the whole-output path."""
        if triton_lora.capturing() or any(b.shrink_group is not None for b in banks):
            return None
        stacks = [b.a_stack(kind) for b in banks]
        if any(a is None for a in stacks) or len(
                {(a.shape[0], a.shape[2], a.dtype, a.device) for a in stacks}) != 1:
            return None
        joined = torch.cat(stacks, dim=1)
        views, offsets, offset = [], [], 0
        for bank, a in zip(banks, stacks):
            view = joined[:, offset:offset + a.shape[1]]
            bank.replace_entry(kind, 0, view)
            views.append(view)
            offsets.append(offset)
            offset += a.shape[1]
        group = cls(banks, [bank._current for bank in banks], kind, joined, views, offsets)
        if bases is not None and kind[1] == "add-gather" and len(
                {a.shape[1] for a in stacks}) == 1 and WHOLE_GROUPS:
            group._join_b(bases)
        for bank in banks:
            bank.shrink_group = group
        return group

    def _join_b(self, bases: list[tuple]) -> None:
        """Lay the members' B stacks side by side along the columns, each member's layout
        its slice (as for A), and keep their bases: the whole-output path."""
        stacks = [s.layouts[self.kind][1] for s in self.sets]  # (E, N_j, r), any strides
        b_joined = torch.cat([b.transpose(1, 2) for b in stacks], dim=2)  # (E, r, sum N)
        first = 0
        for bank, b in zip(self.banks, stacks):
            view = b_joined[:, :, first:first + b.shape[1]].transpose(1, 2)
            bank.replace_entry(self.kind, 1, view)
            self.b_views.append(view)
            self.widths.append(b.shape[1])
            first += b.shape[1]
        ranks = [v.shape[1] for v in self.views]
        for block_n in {triton_lora.group_block_n(rows, first) for rows in (1, 16, 32, 64)}:
            self.tiles[block_n] = triton_lora.group_tiles(self.widths, ranks, block_n,
                                                          b_joined.device)
        self.b_joined, self.bases = b_joined, list(bases)

    def dissolve(self) -> None:
        """Every bank computes its own shrink again (one of them re-laid out its adapters)."""
        for bank, layout_set in zip(self.banks, self.sets):
            if layout_set.shrink_group is self:
                layout_set.shrink_group = None
            bank.pending_h = bank.pending_y = None

    def _intact(self) -> bool:
        # members' adapters changed in place are rewritten into `joined` now, before it is
        # read (their own calls come after the leader's shrink); each member's set must
        # still be its bank's set for these adapters, holding its slices
        for j, (bank, layout_set) in enumerate(zip(self.banks, self.sets)):
            layout = layout_set.layouts.get(self.kind)
            if (bank._sets.get(layout_set.key) is not layout_set or layout is None
                    or layout[0] is not self.views[j]
                    or (self.b_views and layout[1] is not self.b_views[j])
                    or not layout_set.sync()):
                return False
        return True

    def shrink(self, x: torch.Tensor, x2: torch.Tensor, index: torch.Tensor,
               n_out: int) -> torch.Tensor | None:
        """As the leader: every member's shrink of ``x`` (``x2``: its rows as a matrix) in
        one launch; members get their slices, the leader's own is returned. None (and the
        group dissolved) when a member no longer reads its slice."""
        if not self._intact():
            self.dissolve()
            return None
        h = triton_lora.bgmv_shrink(x2, self.joined, index, n_out)
        for bank, view, offset in zip(self.banks[1:], self.views[1:], self.offsets[1:]):
            bank.pending_h = (x, input_version(x), h[:, :, offset:offset + view.shape[1]], self)
        return h[:, :, :self.views[0].shape[1]]

    def whole(self, x: torch.Tensor, x2: torch.Tensor, index: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """As the leader: every member's output ``x W_j^T + b_j`` plus its rows' LoRA
        terms; members get their blocks (``pending_y``), the leader's own (M, N_0) is
        returned. None when the group cannot (the caller then takes the shrink path)."""
        if self.b_joined is None or self.bases[0][0] is not weight or \
                self.bases[0][1] is not bias:
            return None
        if not self._intact():
            self.dissolve()
            return None
        rows = x2.shape[0]
        block_n = triton_lora.group_block_n(rows, sum(self.widths))
        tiles = self.tiles.get(block_n)
        if tiles is None:
            return None
        h = triton_lora.bgmv_shrink(x2, self.joined, index, self.widths[0])
        stacked = self._stacked_weights()
        if stacked is not None:
            # one GEMV over the members' weights stacked (a copy, opt-in): outputs side by
            # side in one (M, sum N) tensor, each member's a strided view of it
            w, b = stacked
            y = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
            triton_lora.bgmv_add_group(y, self.b_joined, h, index, tiles, rows, block_n,
                                       row_stride=y.stride(0))
            outs, first = [], 0
            for width in self.widths:
                outs.append(y[:, first:first + width])
                first += width
        else:
            flat = torch.empty(rows * sum(self.widths), device=x2.device, dtype=x2.dtype)
            outs, first = [], 0
            for (w, b), width in zip(self.bases, self.widths):
                block = flat[rows * first:rows * (first + width)].view(rows, width)
                if b is None:
                    torch.mm(x2, w.t(), out=block)
                else:
                    torch.addmm(b, x2, w.t(), out=block)
                outs.append(block)
                first += width
            triton_lora.bgmv_add_group(flat, self.b_joined, h, index, tiles, rows, block_n)
        for j, (bank, out) in enumerate(zip(self.banks[1:], outs[1:]), start=1):
            bank.pending_y = (x, input_version(x), out, self, self.bases[j])
        return outs[0]

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The members' base weights (and biases) stacked along the outputs, a copy kept
        equal to them (rewritten in place when one changed in place), or None where the
        option is off or they cannot stack."""
        if not stack_siblings():
            return None
        weights = [w for w, _ in self.bases]
        biases = [b for _, b in self.bases]
        if (len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1
                or len({b is None for b in biases}) != 1):
            return None
        tensors = [t for t in (*weights, *biases) if t is not None]
        state = ([input_version(t) for t in tensors], [t.data_ptr() for t in tensors])
        if triton_lora.capturing() and state != self._stack_state:
            return None  # a graph must neither allocate the stack nor rewrite it per replay
        if self._stack is None:
            with torch.no_grad():
                w = torch.cat([t.detach() for t in weights], 0)
                b = None if biases[0] is None else torch.cat([t.detach() for t in biases])
            self._stack, self._stack_state = (w, b), state
        elif state != self._stack_state:
            with torch.no_grad():
                self._stack[0].copy_(torch.cat([t.detach() for t in weights], 0))
                if self._stack[1] is not None:
                    self._stack[1].copy_(torch.cat([t.detach() for t in biases]))
            self._stack_state = state
        return self._stack


def stack_siblings() -> bool:
    """``DELTATUNE_STACK_SIBLINGS=1`` (off by default): whole groups keep a copy of their
    members' base weights stacked and run one GEMV instead of one per member.

    On an H200 a 1B decode step at 32 rows of 32 adapters took 3.526 ms with it against
    3.663 ms (0.923x against 0.888x one adapter's throughput; run 20261201-202720), at
    the memory of q/k/v's and gate/up's weights once more (about 60% of a Llama layer's).
    Not a default: making the members' weights views of the stack instead (no copy) frees
    their old storage, which CUDA graphs captured before (the prompt's graph, another
    decoder's) still read: an illegal memory access on the GPU (run 20261201-204626).
    """
    value = os.environ.get("DELTATUNE_STACK_SIBLINGS", "0").strip().lower()
    if value not in ("0", "1"):
        triton_lora.warn_once(f"DELTATUNE_STACK_SIBLINGS={value!r} is not 0 or 1: using 0")
        return False
    return value == "1"


def shared_shrink(bank: AdapterBank, x: torch.Tensor, x2: torch.Tensor,
                  index: torch.Tensor, n_out: int) -> torch.Tensor | None:
    """Return ``bank``'s shrink of ``x`` through its group, or None to compute it alone.

    A member gets the slice its leader computed from this very input (same object, same
    version); the leader computes the whole group's.
    """
    pending, bank.pending_h = bank.pending_h, None
    group = bank.shrink_group
    if (pending is not None and pending[0] is x and pending[1] == input_version(x)
            and pending[3] is group):
        return pending[2]
    if group is None or group.banks[0] is not bank:
        return None
    return group.shrink(x, x2, index, n_out)


# The whole-output path (one GEMV per member into one buffer, one add launch for all);
# False: siblings share only their shrink launch (the bench's A/B switch).
WHOLE_GROUPS = True


def sibling_output(bank: AdapterBank, x: torch.Tensor, x2: torch.Tensor,
                   index: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor | None:
    """Return ``bank``'s whole output (M, N) from its group, or None to compute it by
    itself (then :func:`shared_shrink` may still share the shrink).

    A member returns the block its leader computed from this very input (same object and
    version) with this very base weight and bias; the leader computes the whole group's.
    """
    pending, bank.pending_y = bank.pending_y, None
    group = bank.shrink_group
    if (pending is not None and pending[0] is x and pending[1] == input_version(x)
            and pending[3] is group and pending[4][0] is weight and pending[4][1] is bias):
        return pending[2]
    if group is None or group.banks[0] is not bank:
        return None
    return group.whole(x, x2, index, weight, bias)


class SiblingInputs:
    """Learns which banks are called with the same input, one after another.

    :meth:`observe` is told each call; a run of two or more banks closes when a call with
    another input arrives, and becomes a :class:`ShrinkGroup`.
    """

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.version = -1
        self.signature: tuple | None = None
        self.banks: list[AdapterBank] = []
        self.bases: list[tuple | None] = []

    def observe(self, bank: AdapterBank, x: torch.Tensor, signature: tuple,
                base: tuple | None = None) -> None:
        """Record that ``bank`` was called with ``x``; ``signature`` (adapter names, rows,
        tokens per row, layout kind last) must match within a run. ``base``: the bank's
        (weight, bias), for groups that compute whole outputs."""
        if x is self.x and input_version(x) == self.version and signature == self.signature:
            if bank not in self.banks:
                self.banks.append(bank)
                self.bases.append(base)
            return
        banks, bases = self.banks, self.bases
        kind = self.signature[-1] if self.signature else None
        self.x, self.version, self.signature = x, input_version(x), signature
        self.banks, self.bases = [bank], [base]
        if len(banks) > 1:
            ShrinkGroup.form(banks, kind, bases if None not in bases else None)


SIBLINGS = SiblingInputs()

__all__ = ["SIBLINGS", "ShrinkGroup", "SiblingInputs", "shared_shrink", "sibling_output"]
