"""Server side: validate client payloads against the global reference, then FedAvg."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("deltatune.federated")


@dataclass
class Rejection:
    """One client update the server refused, and why."""

    client: str
    reason: str


def validate(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
             ) -> str | None:
    """Return why ``tensors`` cannot be averaged into ``reference``, or None when it can.

    Checks the names (none missing, none extra), then each tensor's shape, dtype and that
    every value is finite.
    """
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        return f"wrong tensor names (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in reference.items():
        value = tensors[name]
        if value.shape != ref.shape:
            return f"{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{name}: dtype {value.dtype}, expected {ref.dtype}"
        if not torch.isfinite(value).all():
            return f"{name}: non-finite values"
    return None


def fedavg(updates: list[tuple[str, dict[str, torch.Tensor], int]],
           reference: dict[str, torch.Tensor]
           ) -> tuple[dict[str, torch.Tensor] | None, list[Rejection]]:
    """Average valid client updates weighted by their example counts (McMahan et al. 2017).

    ``updates`` holds ``(client id, tensors, num_examples)``. Invalid ones are rejected and
    logged; the rest are averaged in float64 and cast back to the reference dtype. Returns
    ``(averaged tensors or None when nothing was valid, rejections)``.
    """
    accepted: list[tuple[dict[str, torch.Tensor], int]] = []
    rejected: list[Rejection] = []
    for client, tensors, n in updates:
        reason = validate(tensors, reference) if n > 0 else "no training examples"
        if reason is None:
            accepted.append((tensors, n))
        else:
            log.warning("rejected update from client %s: %s", client, reason)
            rejected.append(Rejection(client, reason))
    if not accepted:
        return None, rejected
    total = sum(n for _, n in accepted)
    out = {}
    for name, ref in reference.items():
        acc = sum(t[name].double() * (n / total) for t, n in accepted)
        out[name] = acc.to(ref.dtype)
    return out, rejected
