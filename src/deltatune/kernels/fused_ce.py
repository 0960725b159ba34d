"""Linear + cross-entropy over token chunks, never holding the full (tokens x vocab) logits.

A causal LM's loss is ``mean_t CE(h_t W^T + b, y_t)``. With a 128k vocabulary and 16k
tokens the logits alone are 4 GiB in bf16 and 8 GiB once upcast to float32 for the
loss, and autograd keeps them for backward. As in Liger-Kernel's fused linear
cross-entropy, :class:`FusedLinearCrossEntropy` walks the tokens in chunks: for each
chunk it forms the logits, their float32 log-softmax and the loss, turns them into their
gradient (softmax minus one-hot, written in the input dtype), and multiplies it straight
back into the gradient of the hidden states (and of W when it trains), scaled by
1 / (counted tokens). Only the (tokens x hidden) gradient is kept; backward scales it.

Numerics match the plain path (:func:`linear_cross_entropy_reference`): logits in the
input dtype, then float32 for log-softmax, as Hugging Face's causal LM loss does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor | None, targets: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Return the mean cross-entropy of ``hidden W^T + b`` against ``targets`` (plain ops)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(_acc(logits.dtype))
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Loss arithmetic dtype: float32, or the input's own if wider (float64 checks)."""
    return torch.promote_types(dtype, torch.float32)


# One chunk's logits exist three times at once at the loss's peak, which is the whole
# step's (every layer's activations are held): bf16 logits, their float32 log-softmax,
# the bf16 gradient. At 2^28 values (2048 tokens of a 128k vocabulary) that was ~1.5 GiB
# on top of the activations, 2.6 GiB above PEFT + Liger's peak on an H200 (run
# 20261201-222336); 2^26 values (512 tokens, Liger's chunk at that shape) keep it at
# ~0.4 GiB with GEMMs of 512 x 128k still large enough to run at full speed.
CHUNK_VALUES = 1 << 26


def _chunk_rows(vocab: int, budget: int = CHUNK_VALUES) -> int:
    """Tokens per chunk so that one float32 chunk of logits holds about ``budget`` values."""
    return max(1, min(8192, budget // max(vocab, 1)))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of a linear head, with the gradient formed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        valid = targets != ignore_index
        count = valid.sum()
        acc = _acc(hidden.dtype)
        denom = count.clamp_min(1).to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc,
                             device=weight.device) if need_w else None
        grad_b = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
                  if need_b and bias is not None else None)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            ok = valid[start:start + chunk]
            # Logits in the input dtype (as HF), log-softmax in float32 in one pass.
            logp = torch.log_softmax(F.linear(h, weight, bias), dim=-1, dtype=acc)
            safe_t = torch.where(ok, t, torch.zeros_like(t))
            picked = logp.gather(1, safe_t[:, None]).squeeze(1)
            total -= torch.where(ok, picked, torch.zeros_like(picked)).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # d loss / d logits = (softmax - onehot) * ok / count. The softmax is written
            # straight in the input dtype (one read of log p, one narrow write); the row
            # factor ok / count is applied to the (chunk x dim) product, not the logits.
            grad = torch.empty(logp.shape, dtype=hidden.dtype, device=logp.device)
            torch.exp(logp, out=grad)
            del logp
            grad.scatter_add_(1, safe_t[:, None],
                              torch.full((grad.shape[0], 1), -1.0, dtype=grad.dtype,
                                         device=grad.device))
            row = ok.to(acc) / denom
            if grad_h is not None:
                out = grad_h[start:start + chunk]
                torch.mm(grad, weight.to(hidden.dtype), out=out)
                out.mul_(row[:, None].to(out.dtype))
            if grad_w is not None or grad_b is not None:
                scaled = grad.to(acc).mul_(row[:, None])
                if grad_w is not None:
                    grad_w.addmm_(scaled.t(), h.to(acc))
                if grad_b is not None:
                    grad_b += scaled.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.which = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / denom

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        saved = list(ctx.saved_tensors)
        out: list[torch.Tensor | None] = []
        for present, dtype in zip(ctx.which, ctx.dtypes):
            if present:
                out.append((saved.pop(0) * grad_loss).to(dtype))
            else:
                out.append(None)
        return out[0], out[1], out[2], None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX,
                               chunk: int | None = None) -> torch.Tensor:
    """Return mean CE of ``hidden W^T + b`` vs ``targets`` without materialising the logits.

    ``hidden`` is (tokens, dim), ``weight`` (vocab, dim), ``targets`` (tokens,) with
    ``ignore_index`` marking tokens that are not counted. ``chunk`` tokens are processed
    at a time (default: about 2^26 float32 logits per chunk, :data:`CHUNK_VALUES`).
    """
    chunk = chunk or _chunk_rows(weight.shape[0])
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk)


__all__ = ["CHUNK_VALUES", "IGNORE_INDEX", "FusedLinearCrossEntropy",
           "fused_linear_cross_entropy", "linear_cross_entropy_reference"]
