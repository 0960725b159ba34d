"""Next-token choice inside a captured decode step: greedy, or sampled with temperature,
top-k and top-p (nucleus) filtering as Hugging Face ``generate`` applies them.

Everything is tensor arithmetic on the device with shapes fixed by the logits, so the
choice can live inside a CUDA graph. Sampling draws by the exponential race
(``argmax p_i / E_i`` with ``E_i ~ Exp(1)`` is distributed as ``p``) instead of
``torch.multinomial``: one element-wise random fill on the default generator, which a
CUDA graph replays with fresh numbers each time (seed it with ``torch.manual_seed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltatune.core.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits.

    ``temperature`` divides the logits; ``top_k`` (0: off) keeps the k largest;
    ``top_p`` (1.0: off) keeps the smallest set of most likely tokens whose probability
    reaches ``top_p`` (at least one). Applied in that order, as HF's logits processors.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (got {self.temperature}); for greedy "
                              f"decoding pass no Sampling", field="temperature")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}", field="top_k")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Return float32 ``logits`` / temperature with the filtered-out tokens at -inf."""
        scores = logits.float() / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ascending, order = torch.sort(scores, dim=-1)
            cumulative = ascending.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the distribution the next token is drawn from (rows sum to 1)."""
        return self.filtered_logits(logits).softmax(-1)

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """Return one token per row drawn from :meth:`probabilities` (long tensor)."""
        probs = self.probabilities(logits)
        race = torch.empty_like(probs).exponential_()
        return (probs / race).argmax(-1)


def pick(logits: torch.Tensor, sampling: Sampling | None) -> torch.Tensor:
    """Return the next token of every row: the argmax, or a draw under ``sampling``."""
    return logits.argmax(-1) if sampling is None else sampling.draw(logits)


__all__ = ["Sampling", "pick"]
