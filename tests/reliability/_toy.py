"""Tiny models and helpers shared by the reliability tests (no files, no hub)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt

TOY_TARGETS = ["emb", "proj", "conv", "out"]


class Toy(nn.Module):
    """Embedding -> Linear -> GPT-2 Conv1D -> Linear: every wrappable layer kind, 1.5k weights."""

    def __init__(self, vocab: int = 32, dim: int = 16, hidden: int = 12, inner: int = 8,
                 classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, hidden)
        self.conv = Conv1D(inner, hidden)  # GPT-2 layout: weight is (d_in, d_out)
        self.out = nn.Linear(inner, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.emb(ids)))
        return self.out(torch.tanh(self.conv(h)))


def toy(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> Toy:
    """Return a seeded Toy model in eval mode (two calls with one seed are identical)."""
    torch.manual_seed(seed)
    return Toy(**kw).to(dtype).eval()


def toy_ids(batch: int = 3, length: int = 5, seed: int = 1, vocab: int = 32) -> torch.Tensor:
    """Return seeded token ids for :class:`Toy`."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def lora(r: int = 2, alpha: float = 4.0, targets=None, **kw) -> dt.LoraConfig:
    """A LoRA config on every Toy layer."""
    return dt.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or list(TOY_TARGETS), **kw)


def fill(dm: dt.DeltaModel, name: str | None = None, seed: int = 3, std: float = 0.3) -> None:
    """Give a delta random non-zero tensors (zero-init B would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    names = [name] if name else dm.delta_names
    with torch.no_grad():
        for n in names:
            for p in dm.get_delta(n).parameters():
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))


def state_hash(module: nn.Module) -> dict[str, bytes]:
    """Return name -> raw bytes of every tensor in ``module.state_dict()``."""
    return {k: v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            if v.dim() else v.detach().cpu().reshape(1).view(torch.uint8).numpy().tobytes()
            for k, v in module.state_dict().items()}
