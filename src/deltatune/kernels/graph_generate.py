"""Generate for a list of prompts of any lengths through one :class:`GraphDecoder`.

The decoder has a fixed batch and length: every chunk of prompts is left-padded to the
longest prompt of the whole list (one prompt graph serves them all), and the last chunk
is filled up with copies of its first prompt whose outputs are dropped. Rows may use
different deltas (``delta_names``): the decoder is then built over the set of deltas
named, and each chunk routes its rows without a new capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from deltatune.kernels.graph_decode import GraphDecoder
from deltatune.kernels.sampling import Sampling


def graph_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *,
                   batch_size: int, max_new_tokens: int, pad_id: int,
                   eos_ids: Sequence[int] = (), delta_names: Sequence[str | None] | None = None,
                   sampling: Sampling | None = None,
                   on_chunk: Callable[[], None] | None = None) -> list[list[int]]:
    """Return the new tokens of every prompt (EOS included, nothing after it).

    ``model`` is a causal LM (a :class:`~deltatune.DeltaModel` when ``delta_names`` are
    given) on its device; CUDA graphs there, the same static-cache steps eagerly elsewhere.
    ``on_chunk`` is called after each chunk (a progress bar).
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    batch = min(batch_size, len(prompts))
    pool = sorted({n for n in delta_names or [] if n is not None})
    decoder = GraphDecoder(model, batch, width + max_new_tokens, eos_token_id=list(eos_ids),
                           pad_token_id=pad_id, sampling=sampling,
                           adapters=pool if delta_names is not None else None)
    outputs: list[list[int]] = []
    stop = set(eos_ids)
    for start in range(0, len(prompts), batch):
        rows = list(range(start, min(start + batch, len(prompts))))
        filled = rows + [rows[0]] * (batch - len(rows))
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, i in enumerate(filled):
            ids[r, width - len(prompts[i]):] = torch.tensor(list(prompts[i]))
            mask[r, width - len(prompts[i]):] = 1
        routing = None if delta_names is None else [delta_names[i] for i in filled]
        new = decoder.generate(ids.to(device), max_new_tokens, attention_mask=mask.to(device),
                               delta_names=routing)
        for r in range(len(rows)):
            tokens = new[r].tolist()
            stops = [k for k, t in enumerate(tokens) if t in stop]
            outputs.append(tokens[:stops[0] + 1] if stops else tokens)
        if on_chunk is not None:
            on_chunk()
    return outputs


__all__ = ["graph_generate"]
