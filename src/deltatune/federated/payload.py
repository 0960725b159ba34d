"""What travels between a federated client and the server, and its exact size in bytes.

Per method: ``full`` sends every trainable tensor; ``lora`` its A and B; ``fedpara`` every
LoHa factor (X1, Y1, X2, Y2); ``pfedpara`` only the global factors (X1, Y1: W1), while X2
and Y2 (W2) stay on the client. Payloads are serialised with safetensors and the byte
counts reported are ``len()`` of those serialised bytes, not estimates.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from deltatune.core.errors import ConfigError

METHODS = ("full", "lora", "fedpara", "pfedpara")

# Per-target tensor names that never leave a client, per method (pFedPara's W2 factors).
LOCAL_SUFFIXES: dict[str, tuple[str, ...]] = {"pfedpara": ("hada_X2", "hada_Y2")}


def is_global(name: str, method: str) -> bool:
    """Return True when the parameter ``name`` is sent to the server under ``method``."""
    if method not in METHODS:
        raise ConfigError(f"unknown federated method {method!r}; choose from {METHODS}",
                          field="methods")
    return name.rpartition(".")[2] not in LOCAL_SUFFIXES.get(method, ())


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return the model's trainable parameters by name (what local training updates)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def global_tensors(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """Return detached CPU copies of the trainable tensors that travel under ``method``."""
    return {n: p.detach().cpu().contiguous().clone()
            for n, p in trainable(model).items() if is_global(n, method)}


def local_tensors(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """Return detached copies of the trainable tensors that stay on the client."""
    return {n: p.detach().cpu().clone()
            for n, p in trainable(model).items() if not is_global(n, method)}


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters of the same names (in place)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise a payload with safetensors; return the bytes that would go on the wire."""
    return st_save({k: v.contiguous() for k, v in tensors.items()})


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Deserialise a safetensors payload (never pickle); return the tensors by name."""
    return st_load(bytes(data))
