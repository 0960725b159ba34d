"""A causal LM's loss through the fused linear + cross-entropy, with the model's own forward.

The training loss of a causal LM is ``CE(head(hidden), next tokens)``. Formed the plain
way, the logits of a 1B Llama at 8 x 2048 tokens and a 128k vocabulary take 4 GiB in bf16
and 8 GiB more once upcast for the loss, all kept for backward. Here the model runs its
whole forward (so a DeltaModel's call edits, such as prompt tuning's virtual tokens, DDP's
hooks and accelerate's autocast all apply) with its output head swapped for an identity
during the call: what comes back as ``logits`` are the final hidden states, already aligned
with the labels. :func:`~deltatune.kernels.fused_ce.fused_linear_cross_entropy` then runs
the head and the loss chunk by chunk.

Where that would change the result the model's own logits are used instead (the callers
fall back on ``None``): a head that carries a live delta or is not a plain linear layer,
an architecture outside :data:`PLAIN_HEAD_TYPES` or whose config post-processes logits
(soft-capping, logit scales), a model wrapped by FSDP or ``torch.compile`` (their
parameters are not plain tensors outside their own forward), and a trainable head under
DDP (its gradient would bypass DDP's reduction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.kernels.fused_ce import IGNORE_INDEX, fused_linear_cross_entropy

# Model types whose causal-LM forward returns ``head(final hidden states)`` unchanged (when
# the config sets none of _POSTPROCESSING): the swap gives back the hidden states exactly.
PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "opt",
    "phi", "phi3", "olmo", "olmo2", "stablelm", "smollm3",
})
_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _inner_model(model: nn.Module) -> tuple[nn.Module, bool] | None:
    """(the Hugging Face model, whether DDP wraps it), or None for other wrappers."""
    from deltatune.core.model import DeltaModel  # local: kernels import without core

    wrapped = False
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model, wrapped = model.module, True
    if type(model).__name__ in ("OptimizedModule", "FullyShardedDataParallel"):
        return None
    return (model.model if isinstance(model, DeltaModel) else model), wrapped


def plain_head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """Return (the module holding the output head, its attribute name, the plain linear
    head) when :func:`causal_lm_loss_sum` may compute ``model``'s loss; None otherwise."""
    from deltatune.core.layers import DeltaLayer

    found = _inner_model(model)
    if found is None:
        return None
    lm, wrapped = found
    config = getattr(lm, "config", None)
    if (getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES
            or any(getattr(config, key, None) for key in _POSTPROCESSING)):
        return None
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    name = next((n for n, child in lm.named_children() if child is head), None)
    if name is None:
        return None
    linear = head
    if isinstance(head, DeltaLayer):
        if not head.disabled and any(n not in head.merged for n in head.active):
            return None  # the LoRA'd head's own forward is needed
        linear = head.base
    if type(linear) is not nn.Linear or type(linear.weight) not in (torch.Tensor,
                                                                   nn.Parameter):
        return None
    if wrapped and any(p.requires_grad for p in linear.parameters()):
        return None
    return lm, name, linear


@contextmanager
def _head_swapped(owner: nn.Module, name: str) -> Iterator[None]:
    """Within: ``owner.<name>`` is an identity, so the model returns its hidden states."""
    head = getattr(owner, name)
    setattr(owner, name, nn.Identity())
    try:
        yield
    finally:
        setattr(owner, name, head)


def causal_lm_loss_sum(model: nn.Module, labels: torch.Tensor, call: Callable[[], Any],
                       chunk: int | None = None) -> tuple[torch.Tensor, int] | None:
    """Return (summed next-token cross-entropy as a float32 scalar, number of targets), or
    None when the fused path does not apply (see :func:`plain_head`; nothing has run then).

    ``call()`` runs ``model``'s forward without labels (any inputs: packed rows, position
    ids); ``labels`` line up with the returned logits and are shifted by one here, with
    ``-100`` ignored.
    """
    found = plain_head(model)
    if found is None:
        return None
    owner, name, head = found
    with _head_swapped(owner, name):
        hidden = call().logits
    if hidden.shape[-1] != head.in_features:
        raise RuntimeError(f"{type(owner).__name__}'s forward changed the hidden states' width "
                           f"({hidden.shape[-1]}, head expects {head.in_features}): its "
                           f"output head is not plain; run it with the fast path off")
    # Shift by padding the targets, not slicing the hidden states (no copy of them): the
    # last position of each row predicts nothing and is ignored.
    labels = labels.to(hidden.device)
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    count = int((targets != IGNORE_INDEX).sum())
    h = hidden.reshape(-1, hidden.shape[-1])
    # under autocast the hidden states come in the autocast dtype, the head in its own
    weight, bias = head.weight, head.bias
    if weight.dtype != h.dtype:
        weight = weight.to(h.dtype)
        bias = bias.to(h.dtype) if bias is not None else None
    mean = fused_linear_cross_entropy(h, weight, bias, targets, chunk=chunk)
    return mean.float() * count, count


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk: int | None = None,
                   **kwargs: Any) -> torch.Tensor:
    """Return a causal LM's mean next-token loss, as ``model(..., labels=labels).loss``.

    The logits are never materialised (:func:`causal_lm_loss_sum`); where that does not
    apply, the model's own loss is returned. For a DeltaModel in training mode the active
    deltas' regularisers join the loss, as in its forward.
    """

    def call() -> Any:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    summed = causal_lm_loss_sum(model, labels, call, chunk=chunk)
    if summed is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     **kwargs).loss
    total, count = summed
    return with_regularisers(model, total / max(count, 1))


def with_regularisers(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """Return ``loss`` plus the active deltas' regularisers when ``model`` is a DeltaModel
    in training mode: what its forward adds to a loss the model computes itself."""
    from deltatune.core.model import DeltaModel

    extra = model.extra_loss() if isinstance(model, DeltaModel) and model.training else None
    return loss if extra is None else loss + extra


__all__ = ["PLAIN_HEAD_TYPES", "causal_lm_loss", "causal_lm_loss_sum", "plain_head",
           "with_regularisers"]
