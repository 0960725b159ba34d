"""P-tuning (Liu et al., 2021, "GPT Understands, Too", arXiv:2103.10385).

A template places pseudo prompt tokens anywhere in the input, anchor tokens stay real
words, and for a masked LM the label is read at [MASK] through a verbaliser:

    "[P0..P2] {x} [P3..P5] ? [MASK]"   ->   [h0 h1 h2] e(x) [h3 h4 h5] e(?) e([MASK])

The pseudo-token embeddings h_0..h_{m-1} come from a prompt encoder over trainable
inputs, which ties them together (the paper, section 3.2):

    h = MLP(biLSTM([p_0 .. p_{m-1}]))           (``encoder="lstm"``, the paper's)
    h = MLP(p)                                  (``encoder="mlp"``, 3 layers as ``peft``)
    h = p                                       (``encoder="none"``)

Placement: :func:`render_template` writes ``pseudo_token_id`` (any id, e.g. the unk
token) at each [P..] slot; at forward the embeddings of those slots become h, in order,
so a template works with padding on either side and under ``generate``. With
``placement="prefix"`` the m prompts are simply prepended (``peft``'s layout, which
has the same encoder weights, so the two give the same logits).

``tune_model=True`` (the paper's "P-tuning + fine-tuning" rows) also trains copies of
the model's blocks, saved with the delta (memory: a second copy of those weights;
the input word embeddings stay frozen).

Saved: the computed ``prompt`` (m x e) only; the encoder is a training device and a
saved config has ``encoder="none"``, so a reload gives identical outputs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from deltatune.core.config import DeltaConfig, param
from deltatune.core.errors import ConfigError, DataError, DeltaStateError, HyperparameterError
from deltatune.core.model_delta import HOLDER, InputEdit, ModelDelta, ModelDeltaMethod
from deltatune.core.registry import AttachedDelta


@dataclasses.dataclass(kw_only=True)
class PTuningConfig(DeltaConfig):
    """P-tuning hyperparameters."""

    method = "ptuning"

    prompt_length: int = param(6, min=1, help="number of pseudo prompt tokens (m)")
    encoder: Literal["lstm", "mlp", "none"] = param("lstm", help="prompt encoder")
    encoder_hidden: int | None = param(None, min=1, help="encoder width (default: e)")
    lstm_layers: int = param(2, min=1, help="bi-LSTM layers")
    encoder_dropout: float = param(0.0, min=0.0, lt=1.0, help="LSTM dropout")
    placement: Literal["template", "prefix"] = param(
        "template", help="'template': replace pseudo_token_id slots; 'prefix': prepend")
    pseudo_token_id: int | None = param(None, min=0, help="id marking prompt slots")
    tune_model: bool = param(False, help="also fine-tune the model (copies saved with it)")

    def check(self) -> None:
        super().check()
        if self.placement == "template" and self.pseudo_token_id is None:
            raise HyperparameterError("placement='template' needs pseudo_token_id: the token id "
                                      "render_template writes at each [P..] slot",
                                      field="pseudo_token_id")


class PromptEncoder(ModelDelta):
    """Pseudo-token embeddings made by a prompt encoder, placed by template or prefix."""

    edits_inputs = True

    def __init__(self, length: int, dim: int, config: PTuningConfig) -> None:
        super().__init__()
        self.length = length
        self.placement = config.placement
        self.pseudo_token_id = config.pseudo_token_id
        self.kind = config.encoder
        hidden = config.encoder_hidden or dim
        self.embedding = nn.Embedding(length, dim)
        if self.kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.lstm_layers,
                                     dropout=config.encoder_dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim))
        elif self.kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(),
                                          nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def prompts(self) -> torch.Tensor:
        """Return h: (m, e), the pseudo-token embeddings."""
        p = self.embedding.weight
        if self.kind == "lstm":
            return self.mlp_head(self.lstm_head(p.unsqueeze(0))[0])[0]
        if self.kind == "mlp":
            return self.mlp_head(p)
        return p

    def edit_inputs(self, edit: InputEdit) -> None:
        h = self.prompts()
        if self.placement == "prefix":
            edit.prepend(h.unsqueeze(0))
            return
        if edit.input_ids is None:
            raise ConfigError("a P-tuning template needs input_ids to find the prompt slots")
        slots = edit.input_ids == self.pseudo_token_id
        counts = slots.sum(1)
        if not bool((counts == self.length).all()):
            raise DataError(f"each row must hold exactly {self.length} prompt slots "
                            f"(token id {self.pseudo_token_id}); found {counts.tolist()}. "
                            f"Render inputs with render_template and the same prompt_length.")
        # k-th slot of a row takes h[k]: rank of each slot within its row.
        order = (slots.cumsum(1) - 1).clamp(min=0)
        placed = h.to(edit.inputs_embeds.dtype)[order]           # (batch, n, e)
        edit.inputs_embeds = torch.where(slots.unsqueeze(-1), placed, edit.inputs_embeds)
        edit.inserted = edit.inserted | slots

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        # The computed embeddings only: the encoder is dropped at save.
        return {"prompt": self.prompts() if self.kind != "none" else self.embedding.weight}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.kind != "none":
            raise DeltaStateError("cannot load computed prompts into a delta with a prompt "
                                  "encoder; load it with encoder='none' (load_delta does this)")
        with torch.no_grad():
            self.embedding.weight.copy_(tensors["prompt"])


_SLOT = re.compile(r"\[P(\d+)(?:\.\.P(\d+))?\]|\{x\}|\[MASK\]")


def render_template(template: str, x: str, tokenizer: Any, *, pseudo_token_id: int,
                    add_special_tokens: bool = True) -> list[int]:
    """Return the token ids of ``template`` filled with ``x``.

    ``[Pi..Pj]`` becomes j-i+1 copies of ``pseudo_token_id`` (``[Pi]`` one), ``{x}``
    the tokens of ``x``, ``[MASK]`` the tokenizer's mask token; other text is kept as
    anchor tokens. Special tokens ([CLS], [SEP]) are added when the tokenizer has them.
    """
    ids: list[int] = []
    pos = 0

    def words(text: str) -> list[int]:
        text = text.strip()
        return list(tokenizer.encode(text, add_special_tokens=False)) if text else []

    for match in _SLOT.finditer(template):
        ids += words(template[pos:match.start()])
        token = match.group(0)
        if token == "{x}":
            ids += words(x)
        elif token == "[MASK]":
            mask_id = getattr(tokenizer, "mask_token_id", None)
            if mask_id is None:
                raise DataError("the template has [MASK] but the tokenizer has no mask token")
            ids.append(mask_id)
        else:
            first = int(match.group(1))
            last = int(match.group(2) or match.group(1))
            if last < first:
                raise DataError(f"template slot {token} counts backwards")
            ids += [pseudo_token_id] * (last - first + 1)
        pos = match.end()
    ids += words(template[pos:])
    if add_special_tokens and hasattr(tokenizer, "build_inputs_with_special_tokens"):
        ids = list(tokenizer.build_inputs_with_special_tokens(ids))
    return ids


def verbalizer_logits(logits: torch.Tensor, input_ids: torch.Tensor, mask_token_id: int,
                      label_word_ids: Sequence[int]) -> torch.Tensor:
    """Return (batch, n_labels) logits read at each row's [MASK] for the label words.

    ``logits`` are the masked LM's (batch, n', vocab); prompt positions prepended by a
    delta are accounted for (n' - n of them at the front).
    """
    offset = logits.shape[1] - input_ids.shape[1]
    hits = (input_ids == mask_token_id)
    if not bool((hits.sum(1) == 1).all()):
        raise DataError("each row needs exactly one [MASK] token for the verbaliser")
    where = hits.float().argmax(1) + offset
    at_mask = logits[torch.arange(logits.shape[0], device=logits.device), where]
    return at_mask[:, torch.as_tensor(list(label_word_ids), device=logits.device)]


class PTuning(ModelDeltaMethod):
    """P-tuning: prompt-encoder-made pseudo tokens placed by a template."""

    name = "ptuning"
    config_cls = PTuningConfig
    summary = "template pseudo tokens from a bi-LSTM/MLP prompt encoder (Liu et al. 2021)"

    def build(self, model: nn.Module, config: DeltaConfig) -> ModelDelta:
        assert isinstance(config, PTuningConfig)
        if config.pseudo_token_id is not None:
            vocab = model.get_input_embeddings().weight.shape[0]
            if config.pseudo_token_id >= vocab:
                raise HyperparameterError(f"pseudo_token_id {config.pseudo_token_id} is outside "
                                          f"the vocabulary (size {vocab})",
                                          field="pseudo_token_id")
        if config.tune_model and not config.modules_to_save:
            # The "fine-tune the model too" variant: trainable copies of every block.
            config.modules_to_save = [n for n, _ in model.named_children() if n != HOLDER]
        dim = int(model.get_input_embeddings().weight.shape[1])
        return PromptEncoder(config.prompt_length, dim, config)

    def saved_config(self, delta: AttachedDelta) -> DeltaConfig:
        config = delta.config
        assert isinstance(config, PTuningConfig)
        return config.replace(encoder="none")
