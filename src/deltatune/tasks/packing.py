"""Packing for causal-LM training: several examples in one row, attention kept inside each.

Short SFT examples padded to the longest of a batch waste most of the compute on
padding. Packing puts several encoded examples one after another into rows of at most
``max_length`` tokens. Three things keep a packed row equivalent to its examples run
one by one:

* **Positions restart** at 0 for every example (``position_ids``), so rotary or learned
  position embeddings see the same positions as in an unpacked batch.
* **Attention stays inside an example**: a block-diagonal causal mask lets token ``i``
  attend to token ``j`` only when ``j <= i`` and both belong to the same example.
  Padding at the end of a row is its own block (it attends only to padding, so no
  attention row is fully masked and no NaN can appear; nothing attends to it).
* **No loss across a boundary**: the label of the first token of every example is set
  to -100, so the last token of one example is never trained to predict the first token
  of the next. The supervised tokens (and so the summed loss and the item count) are
  exactly those of the examples run alone.

Rows are filled by *best-fit decreasing*: examples sorted by length (longest first,
ties by position), each put into the row whose free space fits it most tightly, or a
new row. It is deterministic, so a resumed run packs the same rows, and it wastes
little space (within 11/9 of the optimum plus a constant, Johnson 1973).

How the mask reaches the model depends on the attention implementation
(``model.config._attn_implementation``):

* ``eager``: a float 4-D mask ``(batch, 1, T, T)``, 0 where attention is allowed and the
  float32 minimum elsewhere (eager attention adds it to the scores);
* ``sdpa``: a boolean 4-D mask (True = attend), which SDPA accepts in any dtype;
* ``flash_attention_*`` and ``flex_attention``: no mask at all. These kernels take no
  arbitrary dense mask, so the batch is flattened into one sequence of ``batch * T``
  tokens with its ``position_ids`` (as transformers' ``DataCollatorWithFlattening``
  does); transformers finds the example boundaries where the position ids restart
  (flash: variable-length attention over them, only for a batch of one sequence, hence
  the flattening; flex: a block mask from ``masking_utils``). Padding at the end of a
  row restarts at position 0, so it is one more short sequence that nothing else sees.
  ``use_cache=False`` is passed: transformers only looks for restarting positions when
  no KV cache is built (Llama builds one in every forward otherwise).
  This is the path transformers documents for flash attention; it is exercised here on
  CPU through SDPA's same position-id detection, not with flash kernels themselves.

A 4-D mask costs ``T * T`` memory per row (bool: 1 byte, eager float: 4 bytes), e.g.
1 MiB per row at T = 512 for sdpa.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from deltatune.core.errors import ConfigError
from deltatune.tasks.base import IGNORE, Encoded, Example, unwrap

POSITION_ONLY = ("flash_attention", "flex_attention")


def pack_examples(examples: Sequence[Example], max_length: int) -> Encoded:
    """Pack encoded causal-LM examples into rows of at most ``max_length`` tokens.

    Each returned row is ``{"input_ids", "labels", "segments"}`` where ``segments`` lists
    the lengths of the examples in it, in order; the first label of every example is
    -100 (see the module docstring). Returns an :class:`Encoded` list of rows.
    """
    if max_length < 2:
        raise ConfigError(f"packing needs max_length >= 2, got {max_length}",
                          field="max_length")
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) > max_length:
            raise ConfigError(f"example {i} has {len(ex['input_ids'])} tokens, more than the "
                              f"packing length {max_length}; encode with the same max_length",
                              field="max_length")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[int] = []  # free space of each row
    # open rows grouped by free space: sorted distinct free sizes, and rows per size
    sizes: list[int] = []
    by_size: dict[int, list[int]] = {}
    for i in order:
        length = len(examples[i]["input_ids"])
        k = bisect.bisect_left(sizes, length)
        if k < len(sizes):  # the tightest row that still fits
            size = sizes[k]
            row = by_size[size].pop(0)
            if not by_size[size]:
                del by_size[size]
                sizes.pop(k)
        else:
            row = len(rows)
            rows.append([])
            free.append(max_length)
            size = max_length
        rows[row].append(i)
        free[row] = size - length
        if free[row] > 0:
            if free[row] not in by_size:
                bisect.insort(sizes, free[row])
                by_size[free[row]] = []
            bisect.insort(by_size[free[row]], row)
    out = Encoded()
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        segments: list[int] = []
        for i in members:
            ex = examples[i]
            ids.extend(ex["input_ids"])
            labels.extend([IGNORE, *ex["labels"][1:]])
            segments.append(len(ex["input_ids"]))
        out.append({"input_ids": ids, "labels": labels, "segments": segments})
    return out


def segment_tensors(examples: Sequence[Example], width: int) -> tuple[torch.Tensor,
                                                                      torch.Tensor]:
    """Return (segment_ids, position_ids), both (batch, width) LongTensors.

    Example ``k`` of a row (1-based) has segment id ``k`` and positions 0, 1, ...;
    padding has segment id 0 and positions counting from 0 again. An example without
    ``segments`` is one segment.
    """
    seg = torch.zeros(len(examples), width, dtype=torch.long)
    pos = torch.zeros(len(examples), width, dtype=torch.long)
    for b, ex in enumerate(examples):
        lengths = ex.get("segments") or [len(ex["input_ids"])]
        start = 0
        for k, n in enumerate(lengths, 1):
            seg[b, start:start + n] = k
            pos[b, start:start + n] = torch.arange(n)
            start += n
        pos[b, start:] = torch.arange(width - start)
    return seg, pos


def block_causal_mask(segment_ids: torch.Tensor, *, boolean: bool) -> torch.Tensor:
    """The (batch, 1, T, T) mask letting a token see earlier tokens of its own segment.

    ``boolean``: True = attend (SDPA); otherwise float32, 0 = attend and the float32
    minimum elsewhere (eager attention adds it to the scores).
    """
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if boolean:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)


def attention_implementation(model: Any) -> str:
    """The model's attention implementation name (deltatune's prefix wrapper removed)."""
    from deltatune.core.model_delta import _WRAPPED

    config = getattr(unwrap(model), "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return str(impl).removeprefix(_WRAPPED)


def packed_forward_inputs(model: Any, batch: dict[str, torch.Tensor]
                          ) -> tuple[dict[str, torch.Tensor], bool]:
    """Keyword arguments of the model's forward for a packed batch, and whether the batch
    was flattened into one sequence (then compare the logits with flattened labels)."""
    impl = attention_implementation(model)
    if impl.startswith(POSITION_ONLY):
        # use_cache=False: transformers looks for restarting positions only without a cache
        return {"input_ids": batch["input_ids"].reshape(1, -1),
                "position_ids": batch["position_ids"].reshape(1, -1), "use_cache": False}, True
    mask = block_causal_mask(batch["segment_ids"], boolean=impl == "sdpa")
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": mask}, False


def check_packable(model: Any, task: Any) -> None:
    """Raise :class:`ConfigError` when ``task`` or ``model``'s deltas cannot train packed."""
    from deltatune.core.model import DeltaModel
    from deltatune.core.model_delta import _on_parts

    if not callable(getattr(task, "pack_examples", None)):
        raise ConfigError(f"packing applies to causal-LM tasks (causal-lm-sft, causal-lm); "
                          f"task {getattr(task, 'name', type(task).__name__)!r} has one "
                          f"example per row by nature. Set packing=False", field="packing")
    inner = unwrap(model)
    if isinstance(inner, DeltaModel):
        editors = sorted({type(p).__name__ for p in _on_parts(inner) if p.edits_inputs})
        if editors:
            raise ConfigError(f"packing cannot be used with a delta that edits the inputs "
                              f"({', '.join(editors)}): its virtual tokens would be put in "
                              f"front of a packed row once, not in front of every example. "
                              f"Set packing=False", field="packing")
