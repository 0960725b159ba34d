"""Multitask prompt tuning, MPT (Wang et al., ICLR 2023, arXiv:2303.02861).

Prompt decomposition: the prompt of task k is a shared prompt times a rank-r
(rank-one in the paper) task matrix, elementwise:

    P_k = P* ∘ (u_k v_k^T),   P* : l x e,  u_k : l x r,  v_k : r x e

and P_k is prepended to the input embeddings as in prompt tuning. Each call passes
``task_ids`` (one per row); with one task it may be left out.

Two stages:

1. **Source**: train one prompt-tuning teacher per source task (``PromptTuningConfig``),
   then train P* and all (u_k, v_k) on the mixed source tasks with the paper's loss

       L = L_task + lambda * (L_logits + L_hidden)

   L_logits: KL(teacher || student) of the output distributions (temperature T);
   L_hidden: mean squared error of the last hidden states; teacher k is the prompt
   tuned on task k. :func:`distillation_loss` computes the bracket and
   :func:`distill_step` runs one step (teacher and student are deltas of one model).
2. **Target**: a new MPT delta with ``num_tasks=1`` starts from P*
   (:func:`start_from_source`) with a fresh rank-one factor and trains both.

Init: P* as prompt tuning's ``vocab``/``random`` inits; u and v are ones, so P_k = P*
at the start (the multiplicative update starts as the identity).
Saved: ``shared`` (l x e), ``task_cols`` (T x l x r), ``task_rows`` (T x r x e), the
names ``peft`` uses (``prefix_task_cols``/``rows``). Not mergeable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.config import DeltaConfig, param
from deltatune.core.errors import ConfigError, DataError
from deltatune.core.model_delta import InputEdit, ModelDelta, ModelDeltaMethod
from deltatune.methods.prompt import PromptTuningConfig, initial_prompt


@dataclasses.dataclass(kw_only=True)
class MPTConfig(DeltaConfig):
    """MPT hyperparameters (the paper: 100 prompt tokens, rank one)."""

    method = "mpt"

    prompt_length: int = param(100, min=1, help="l, prompt tokens")
    num_tasks: int = param(1, min=1, help="T, tasks sharing P*")
    rank: int = param(1, min=1, help="r of u_k v_k^T (the paper: 1)")
    init: Literal["random", "vocab"] = param("vocab", help="init of P* (as prompt tuning)")
    vocab_top_k: int = param(5000, min=1, help="vocab init: sample from the first k ids")
    seed: int = param(0, help="seed of the init")


class MultitaskPrompt(ModelDelta):
    """P* and per-task factors; prepends P_k for each row's task."""

    edits_inputs = True
    consumes = ("task_ids",)

    def __init__(self, shared: torch.Tensor, num_tasks: int, rank: int) -> None:
        super().__init__()
        length, width = shared.shape
        self.shared = nn.Parameter(shared.clone())
        self.task_cols = nn.Parameter(torch.ones(num_tasks, length, rank) / rank ** 0.5)
        self.task_rows = nn.Parameter(torch.ones(num_tasks, rank, width) / rank ** 0.5)
        self._task_ids: torch.Tensor | None = None

    def task_prompts(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Return P_k for each id: (len(task_ids), l, e)."""
        ids = task_ids.to(self.shared.device).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.task_cols.shape[0]):
            raise DataError(f"task_ids {ids.tolist()} outside [0, {self.task_cols.shape[0]})")
        # (n, l, r) @ (n, r, e) -> (n, l, e): the rank-r task matrix, then elementwise.
        return self.shared * torch.bmm(self.task_cols[ids], self.task_rows[ids])

    def receive(self, extra: dict[str, Any]) -> None:
        ids = extra.get("task_ids")
        self._task_ids = None if ids is None else torch.as_tensor(ids).reshape(-1)

    def edit_inputs(self, edit: InputEdit) -> None:
        ids = edit.extra.get("task_ids", self._task_ids)
        if ids is None:
            if self.task_cols.shape[0] > 1:
                raise ConfigError(f"this MPT delta holds {self.task_cols.shape[0]} tasks; pass "
                                  f"task_ids=(one task index per row)")
            ids = torch.zeros(edit.batch, dtype=torch.long)
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.numel() != edit.batch:
            raise DataError(f"task_ids has {ids.numel()} entries for a batch of {edit.batch}")
        edit.prepend(self.task_prompts(ids))


def distillation_loss(student: Any, teacher: Any, *, attention_mask: torch.Tensor | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """Return L_logits + L_hidden between two model outputs (the paper's bracket).

    Both outputs need ``logits`` and ``hidden_states`` (run with
    ``output_hidden_states=True``; for encoder-decoders the decoder's are used). Only
    the last n positions are compared, n = ``attention_mask.shape[1]`` (the input
    without prompts), padded positions excluded. KL(teacher || student) is taken on
    softmax(logits / T) and scaled by T^2, summed over classes, averaged over positions.
    """
    s_logits, t_logits = student.logits, teacher.logits.detach()
    s_hidden = _last_hidden(student)
    t_hidden = _last_hidden(teacher).detach()
    if s_logits.dim() == 3:
        n = attention_mask.shape[1] if attention_mask is not None else min(
            s_logits.shape[1], t_logits.shape[1])
        s_logits, t_logits = s_logits[:, -n:], t_logits[:, -n:]
        s_hidden, t_hidden = s_hidden[:, -n:], t_hidden[:, -n:]
        keep = (attention_mask.bool() if attention_mask is not None
                else torch.ones(s_logits.shape[:2], dtype=torch.bool, device=s_logits.device))
    else:  # one prediction per row (sequence classification)
        keep = torch.ones(s_logits.shape[0], dtype=torch.bool, device=s_logits.device)
        n = min(s_hidden.shape[1], t_hidden.shape[1])
        s_hidden, t_hidden = s_hidden[:, -n:], t_hidden[:, -n:]
    log_s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)[keep].mean() * temperature ** 2
    if s_hidden.shape[:2] == keep.shape:
        mse = ((s_hidden.float() - t_hidden.float()) ** 2).mean(-1)[keep].mean()
    else:
        mse = ((s_hidden.float() - t_hidden.float()) ** 2).mean()
    return kl + mse


def _last_hidden(output: Any) -> torch.Tensor:
    states = getattr(output, "decoder_hidden_states", None) or getattr(
        output, "hidden_states", None)
    if not states:
        raise ConfigError("distillation needs hidden states: run the model with "
                          "output_hidden_states=True")
    return states[-1]


def distill_step(dm: Any, batch: dict[str, Any], *, task_id: int, teacher: str, student: str,
                 lam: float = 0.9, temperature: float = 1.0) -> torch.Tensor:
    """Return the source-stage loss of one batch of task ``task_id`` (call backward on it).

    Runs the teacher delta (no gradient) and the student MPT delta on ``batch`` and
    returns L_task + lam * (L_logits + L_hidden). Leaves ``student`` active.
    """
    rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    dm.activate(teacher)
    with torch.no_grad():
        t_out = dm(**batch, output_hidden_states=True)
    dm.activate(student)
    s_out = dm(**batch, task_ids=torch.full((rows,), task_id), output_hidden_states=True)
    if s_out.loss is None:
        raise ConfigError("the batch needs labels: MPT's loss includes the task loss")
    return s_out.loss + lam * distillation_loss(s_out, t_out,
                                                attention_mask=batch.get("attention_mask"),
                                                temperature=temperature)


@torch.no_grad()
def start_from_source(dm: Any, target: str, source: str | dict[str, torch.Tensor]) -> None:
    """Target stage: copy P* of ``source`` (a delta name or saved tensors) into ``target``.

    The target's rank-one factor keeps its fresh init (ones).
    """
    tensors = (dm.delta_state_dict(source) if isinstance(source, str) else source)
    part = dm.get_delta(target).method.part(dm.get_delta(target))
    if tuple(tensors["shared"].shape) != tuple(part.shared.shape):
        raise ConfigError(f"source P* has shape {tuple(tensors['shared'].shape)}, target expects "
                          f"{tuple(part.shared.shape)}; use the same prompt_length")
    part.shared.copy_(tensors["shared"])


class MPT(ModelDeltaMethod):
    """Multitask prompt tuning: a shared prompt times a rank-one task matrix."""

    name = "mpt"
    config_cls = MPTConfig
    summary = "shared prompt ∘ per-task rank-one matrix, distilled from teachers (Wang et al. 2023)"

    def build(self, model: nn.Module, config: DeltaConfig) -> ModelDelta:
        assert isinstance(config, MPTConfig)
        pt = PromptTuningConfig(prompt_length=config.prompt_length, init=config.init,
                                vocab_top_k=config.vocab_top_k, seed=config.seed)
        shared = initial_prompt(model.get_input_embeddings().weight, pt)[0]
        return MultitaskPrompt(shared, config.num_tasks, config.rank)
