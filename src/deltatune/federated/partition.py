"""Split a data set among federated clients: IID or Dirichlet label skew (seeded)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deltatune.core.errors import ConfigError


def iid_partition(n: int, clients: int, seed: int = 0) -> list[list[int]]:
    """Return ``clients`` disjoint index lists covering ``range(n)``, sizes within one."""
    if clients < 1 or n < clients:
        raise ConfigError(f"cannot split {n} examples among {clients} clients; "
                          "use fewer clients or more data", field="clients")
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, clients)]


def dirichlet_partition(labels: Sequence[int], clients: int, alpha: float, seed: int = 0,
                        min_size: int = 1) -> list[list[int]]:
    """Return disjoint index lists covering all examples, label-skewed by Dirichlet(alpha).

    For each class, its examples are dealt to clients in proportions drawn from
    Dirichlet(alpha, ..., alpha) (Hsu et al. 2019): small alpha -> each client sees few
    classes; large alpha -> close to IID. Redrawn (same generator) until every client
    holds at least ``min_size`` examples, so no client is empty.
    """
    if alpha <= 0:
        raise ConfigError(f"the Dirichlet alpha must be > 0, got {alpha}", field="non_iid")
    labels_arr = np.asarray(labels)
    if clients < 1 or len(labels_arr) < clients * min_size:
        raise ConfigError(f"cannot split {len(labels_arr)} examples among {clients} clients; "
                          "use fewer clients or more data", field="clients")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels_arr):
            idx = rng.permutation(np.flatnonzero(labels_arr == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(f"Dirichlet alpha={alpha} left a client with fewer than {min_size} "
                      "examples 1000 times; raise alpha or use fewer clients", field="non_iid")
