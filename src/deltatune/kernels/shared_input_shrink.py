"""One shrink GEMM for single-adapter LoRA linears that read the same input (prefill).

In a Llama layer q, k and v read the same hidden states, and so do gate and up. For many
rows without autograd (a prompt's forward pass), each LoRA linear's shrink ``x A^T``
re-reads that input: at 16384 rows of 2048 that is 64 MiB per read, three reads where one
would do for q/k/v. Once a pass has shown which linears read the same input tensor one
after another, the first of them (the leader) computes every member's shrink in one GEMM
through their A's side by side, and each member takes its slice.

As for the mixed-batch decode groups (:mod:`deltatune.kernels.shared_shrink`), nothing
about the model's structure is assumed: a run is calls with the very same input object,
unchanged (version counter), one after another. A member called with anything else, or
whose adapter changed, computes its own shrink. Only references to the adapters' A and
the input are weak: nothing here keeps an activation or a deleted adapter alive.
"""

from __future__ import annotations

import weakref

import torch

from deltatune.kernels.shared_shrink import input_version


class _Group:
    """The A tensors of a run (leader first) and their side-by-side copy per dtype."""

    def __init__(self, As: list[torch.Tensor]) -> None:
        self.refs = [weakref.ref(a) for a in As]
        self.widths = [a.shape[0] for a in As]
        self._joined: torch.Tensor | None = None
        self._key: tuple | None = None

    def joined(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(sum r, d_in) in ``dtype``, rebuilt when an A changed; None if one is gone."""
        As = [ref() for ref in self.refs]
        if any(a is None for a in As):
            return None
        key = (dtype, [input_version(a) for a in As], [a.data_ptr() for a in As])
        if key != self._key:
            with torch.no_grad():
                self._joined = torch.cat([a.detach().to(dtype) for a in As], 0)
            self._key = key
        return self._joined


class SharedInputShrinks:
    """Learns runs of LoRA linears called with the same input; computes their shrinks."""

    def __init__(self) -> None:
        self._x: weakref.ref | None = None
        self._version = -1
        self._run: list[torch.Tensor] = []
        self._leaders: dict[int, _Group] = {}  # id of the leader's A -> its group
        self._pending: dict[int, tuple] = {}  # id of a member's A -> (x ref, version, h, A ref)

    def _same_input(self, x: torch.Tensor) -> bool:
        return self._x is not None and self._x() is x and input_version(x) == self._version

    def _observe(self, x: torch.Tensor, A: torch.Tensor) -> None:
        if self._same_input(x):
            if not any(a is A for a in self._run):
                self._run.append(A)
            return
        if len(self._run) > 1 and id(self._run[0]) not in self._leaders:
            self._leaders[id(self._run[0])] = _Group(self._run)
        self._x, self._version, self._run = weakref.ref(x), input_version(x), [A]

    def shrink(self, x: torch.Tensor, x2: torch.Tensor, A: torch.Tensor,
               Ac: torch.Tensor) -> torch.Tensor:
        """Return ``x2 Ac^T`` (rows, r): from the leader's GEMM where this linear is a
        member of a run, computing every member's where it leads one.

        ``x`` is the layer's input as called (its identity defines the runs), ``x2`` its
        rows as a matrix, ``A`` the adapter's own tensor and ``Ac`` it in ``x2``'s dtype.
        """
        self._observe(x, A)
        pending = self._pending.pop(id(A), None)
        if (pending is not None and pending[0]() is x and pending[1] == input_version(x)
                and pending[3]() is A):
            return pending[2]
        group = self._leaders.get(id(A))
        if group is not None and group.refs[0]() is A:
            joined = group.joined(x2.dtype)
            if joined is not None and joined.shape[1] == x2.shape[1]:
                h = x2 @ joined.t()
                first = group.widths[0]
                for ref, width in zip(group.refs[1:], group.widths[1:]):
                    member = ref()
                    self._pending[id(member)] = (weakref.ref(x), input_version(x),
                                                 h[:, first:first + width], ref)
                    first += width
                return h[:, :group.widths[0]]
            del self._leaders[id(A)]
        return x2 @ Ac.t()


SHARED_INPUTS = SharedInputShrinks()

__all__ = ["SHARED_INPUTS", "SharedInputShrinks"]
