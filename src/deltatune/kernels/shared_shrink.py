"""One shrink launch for layers that read the same input in a mixed-adapter decode step.

In a Llama layer q, k and v read the same hidden states, and so do gate and up. Under the
BGMV add layouts (:mod:`deltatune.kernels.multi_lora`, :func:`~deltatune.kernels.
triton_lora.bgmv_layout`) each adapted linear costs a cuBLAS base call, a shrink launch
(every row through its own adapter's A) and an expand launch. The shrinks of such siblings
can be one launch over their A stacks laid side by side along the rank: on an H200 that
took a 1B mixed-32 decode step from 0.787x to 0.827x one adapter's throughput
(docs/performance.md, fifth session).

Nothing about the model's structure is assumed. :class:`SiblingInputs` learns the groups
at run time: calls with the very same input tensor object, unchanged (version counter),
the same adapters and the same rows, one after another. A layer whose input turns out to
be another tensor computes its own shrink. The first layer of a group (the leader) then
computes every member's shrink and leaves each member its slice of h, tagged with the
input it came from.

A group belongs to one adapter set of each bank (:class:`~deltatune.kernels.multi_lora.
LayoutSet`): a batch of another mix builds its own layouts, and a decoder's graphs keep
reading the set they captured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from deltatune.kernels import triton_lora

if TYPE_CHECKING:
    from deltatune.kernels.multi_lora import AdapterBank, LayoutSet


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class ShrinkGroup:
    """Banks whose A stacks (layout ``kind``) are slices of one tensor, ``joined``.

    Each bank's adapter set (``sets``, current when the group formed) holds its slice as
    its layout, so in-place rewrites of its adapters (:meth:`LayoutSet.sync`) land in
    ``joined``; ``offsets`` are the slices' first columns (rank entries).
    """

    def __init__(self, banks: list[AdapterBank], sets: list[LayoutSet], kind: tuple,
                 joined: torch.Tensor, views: list[torch.Tensor], offsets: list[int]) -> None:
        self.banks, self.sets, self.kind, self.joined = banks, sets, kind, joined
        self.views, self.offsets = views, offsets

    @classmethod
    def form(cls, banks: list[AdapterBank], kind: tuple) -> ShrinkGroup | None:
        """Lay the banks' A stacks side by side and make each bank's layout its slice;
        None where they cannot share (not all laid out, other shapes, already grouped, or
        inside a graph capture, whose memory pool must not get this tensor)."""
        if _capturing() or any(b.shrink_group is not None for b in banks):
            return None
        stacks = [b.a_stack(kind) for b in banks]
        if any(a is None for a in stacks) or len(
                {(a.shape[0], a.shape[2], a.dtype, a.device) for a in stacks}) != 1:
            return None
        joined = torch.cat(stacks, dim=1)
        views, offsets, offset = [], [], 0
        for bank, a in zip(banks, stacks):
            view = joined[:, offset:offset + a.shape[1]]
            bank.replace_a_stack(kind, view)
            views.append(view)
            offsets.append(offset)
            offset += a.shape[1]
        group = cls(banks, [bank._current for bank in banks], kind, joined, views, offsets)
        for bank in banks:
            bank.shrink_group = group
        return group

    def dissolve(self) -> None:
        """Every bank computes its own shrink again (one of them re-laid out its adapters)."""
        for bank, layout_set in zip(self.banks, self.sets):
            if layout_set.shrink_group is self:
                layout_set.shrink_group = None
            bank.pending_h = None

    def _intact(self) -> bool:
        # members' adapters changed in place are rewritten into `joined` now, before it is
        # read (their own calls come after the leader's shrink); each member's set must
        # still be its bank's set for these adapters, holding its slice
        return all(bank._sets.get(s.key) is s and s.layouts.get(self.kind, (None,))[0]
                   is view and s.sync()
                   for bank, s, view in zip(self.banks, self.sets, self.views))

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
            bank.pending_h = (x, x._version, h[:, :, offset:offset + view.shape[1]], self)
        return h[:, :, :self.views[0].shape[1]]


def shared_shrink(bank: AdapterBank, x: torch.Tensor, x2: torch.Tensor,
                  index: torch.Tensor, n_out: int) -> torch.Tensor | None:
    """Return ``bank``'s shrink of ``x`` through its group, or None to compute it alone.

    A member gets the slice its leader computed from this very input (same object, same
    version); the leader computes the whole group's.
    """
    pending, bank.pending_h = bank.pending_h, None
    group = bank.shrink_group
    if (pending is not None and pending[0] is x and pending[1] == x._version
            and pending[3] is group):
        return pending[2]
    if group is None or group.banks[0] is not bank:
        return None
    return group.shrink(x, x2, index, n_out)


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

    def observe(self, bank: AdapterBank, x: torch.Tensor, signature: tuple) -> None:
        """Record that ``bank`` was called with ``x``; ``signature`` (adapter names, rows,
        tokens per row, layout kind last) must match within a run."""
        if x is self.x and x._version == self.version and signature == self.signature:
            if bank not in self.banks:
                self.banks.append(bank)
            return
        banks, kind = self.banks, self.signature[-1] if self.signature else None
        self.x, self.version, self.signature, self.banks = x, x._version, signature, [bank]
        if len(banks) > 1:
            ShrinkGroup.form(banks, kind)


SIBLINGS = SiblingInputs()

__all__ = ["SIBLINGS", "ShrinkGroup", "SiblingInputs", "shared_shrink"]
