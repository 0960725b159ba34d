"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190).

Every attention layer gets P trainable key and value vectors in front of its own:

    head = Attn(x W_q, [P_k; x W_k], [P_v; x W_v])

so a decoder-only model reads [PREFIX; x; y] and an encoder-decoder reads
[PREFIX; x] in the encoder and [PREFIX'; y] in the decoder (each self-attention layer
has its own prefix; ``cross_attention=True`` also prefixes the decoder's attention
over the encoder, as the paper's released BART code does).

Reparameterisation (the paper, section 4.3): optimising P directly is unstable, so
during training P = MLP(P'), with P' a (P x d_model) matrix and the MLP
d_model -> hidden (512) -> tanh -> n_layers * 2 * d_kv (the layout ``peft`` uses, so
weights carry over). After training only the computed P is needed: a save writes P
alone and a saved config with ``reparameterize=False``, so the MLP is dropped and the
loaded prefix gives identical outputs.

Init: random (N(0, 1) as ``nn.Embedding``; P' when reparameterised) or, per the paper's
section 7.2, the activations of real words: ``init_token_ids`` runs the frozen model on
those tokens and copies each layer's keys and values (prefix length = their count).

Ablations of the paper as options (``mode``):
* ``"embedding"``: only the embedding layer is tuned, P prepended to the input
  embeddings (their "embedding-only" row, close to prompt tuning);
* ``"infix"``: [x; INFIX; y]: the activations sit between x and y; only y sees them
  (decoder-only; each call passes ``infix_position``, the index where y starts).

Not mergeable: the prefix is an extra attention memory, not a change of weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from deltatune.core.config import DeltaConfig, param
from deltatune.core.errors import ConfigError, DeltaStateError, HyperparameterError
from deltatune.core.model_delta import (
    AttentionSite,
    InputEdit,
    KVPrefix,
    ModelDelta,
    ModelDeltaMethod,
    add_kv_provider,
    attention_sites,
    capture_kv,
    remove_kv_provider,
)
from deltatune.core.registry import AttachedDelta


@dataclasses.dataclass(kw_only=True)
class PrefixTuningConfig(DeltaConfig):
    """Prefix-tuning hyperparameters (defaults: the paper's table-to-text setting)."""

    method = "prefix"

    prefix_length: int = param(10, min=1, help="number of prefix vectors per layer (P)")
    reparameterize: bool = param(True, help="P = MLP(P') during training (the paper's trick)")
    reparam_hidden: int = param(512, min=1, help="hidden width of the reparameterising MLP")
    mode: Literal["prefix", "embedding", "infix"] = param(
        "prefix", help="prefix at every layer, embedding-only, or infix between x and y")
    cross_attention: bool = param(False, help="also prefix the decoder's cross-attention")
    init_token_ids: list[int] | None = param(
        None, help="initialise P with the activations of these real tokens")

    def check(self) -> None:
        super().check()
        if self.init_token_ids is not None:
            if not self.init_token_ids:
                raise HyperparameterError("init_token_ids is empty; give token ids or None",
                                          field="init_token_ids")
            if len(self.init_token_ids) != self.prefix_length:
                raise HyperparameterError(
                    f"init_token_ids has {len(self.init_token_ids)} tokens but prefix_length is "
                    f"{self.prefix_length}; they must be equal", field="init_token_ids")
            if self.reparameterize:
                raise HyperparameterError(
                    "init_token_ids sets P itself, which the MLP reparameterisation would "
                    "hide; use reparameterize=False with it", field="init_token_ids")
        if self.mode == "infix" and self.cross_attention:
            raise HyperparameterError("infix mode is for decoder-only models; turn "
                                      "cross_attention off", field="mode")


class PrefixKV(ModelDelta):
    """Trainable key/value prefixes for a list of attention modules (reusable).

    ``prefix()`` returns the prefix matrix (P, n_sites * 2 * kv_dim) laid out as
    [site0 keys, site0 values, site1 keys, ...]; each block is kv_heads x head_dim.
    Other methods (P-tuning v2, MAM) build one and register it with :meth:`bind`.
    """

    consumes = ("infix_position",)

    def __init__(self, sites: list[AttentionSite], length: int, *, reparameterize: bool = False,
                 hidden: int = 512, token_dim: int | None = None, infix: bool = False) -> None:
        super().__init__()
        dims = {s.kv_dim for s in sites}
        if len(dims) != 1:
            raise HyperparameterError(f"attention modules have different key widths {dims}; "
                                      f"one prefix matrix needs them equal")
        self.sites = sites
        self.length = length
        self.kv_dim = dims.pop()
        self.infix = infix
        self._infix_position: torch.Tensor | None = None
        width = len(sites) * 2 * self.kv_dim
        if reparameterize:
            dim = token_dim or self.kv_dim
            self.embedding = nn.Embedding(length, dim)
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(),
                                           nn.Linear(hidden, width))
        else:
            self.prefix_weight = nn.Parameter(torch.randn(length, width))

    @property
    def reparameterized(self) -> bool:
        """True while P is computed by the MLP."""
        return hasattr(self, "transform")

    def prefix(self) -> torch.Tensor:
        """Return P: (length, n_sites * 2 * kv_dim)."""
        if self.reparameterized:
            return self.transform(self.embedding.weight)
        return self.prefix_weight

    def site_prefix(self, index: int, batch: int) -> KVPrefix | None:
        """Return the keys and values of site ``index`` (None while off)."""
        if not self.on:
            return None
        site = self.sites[index]
        flat = self.prefix()
        block = flat[:, 2 * index * self.kv_dim:(2 * index + 2) * self.kv_dim]
        # (P, 2 * kv_dim) -> 2 x (1, kv_heads, P, head_dim)
        kv = block.view(self.length, 2, site.kv_heads, site.head_dim).permute(1, 2, 0, 3)
        visible = None
        if self.infix:
            if self._infix_position is None:
                raise ConfigError("an infix prefix needs infix_position=(index where y starts, "
                                  "per row) in every call")
            visible = self._infix_position
        return KVPrefix(kv[0].unsqueeze(0), kv[1].unsqueeze(0), visible)

    def receive(self, extra: dict[str, Any]) -> None:
        pos = extra.get("infix_position")
        if pos is not None:
            pos = torch.as_tensor(pos).reshape(-1)
        self._infix_position = pos

    def bind(self, model: nn.Module, name: str) -> None:
        for i, site in enumerate(self.sites):
            add_kv_provider(model, site.name,
                            name, lambda batch, device, i=i: self.site_prefix(i, batch))

    def unbind(self, model: nn.Module, name: str) -> None:
        for site in self.sites:
            remove_kv_provider(model, site.name, name)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        # Only the computed prefix is saved: the MLP is a training device.
        if self.reparameterized:
            return {"prefix": self.prefix()}
        return {"prefix": self.prefix_weight}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.reparameterized:
            raise DeltaStateError("cannot load a computed prefix into a reparameterised delta "
                                  "(the MLP cannot be inverted); load it with "
                                  "reparameterize=False (load_delta does this)")
        super().load_saved(tensors)

    @torch.no_grad()
    def init_from_tokens(self, model: nn.Module, token_ids: list[int]) -> None:
        """Set P to the keys and values the frozen model computes for ``token_ids``."""
        ids = torch.tensor([token_ids], device=self.prefix_weight.device)
        inputs: dict[str, Any] = {"input_ids": ids}
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids
        was_on = self.active
        self.active = False
        try:
            with capture_kv(model, [s.name for s in self.sites]) as cap:
                model(**inputs, use_cache=False)
        finally:
            self.active = was_on
        blocks = []
        for site in self.sites:
            calls = cap.captured[site.name]
            if not calls:
                raise DeltaStateError(f"attention module {site.name} did not run on the init "
                                      f"tokens")
            k, v = calls[0]  # (1, kv_heads, P, head_dim)
            kv = torch.stack([k[0], v[0]])  # (2, kv_heads, P, head_dim)
            blocks.append(kv.permute(2, 0, 1, 3).reshape(self.length, 2 * site.kv_dim))
        self.prefix_weight.copy_(torch.cat(blocks, dim=1))


class EmbeddingPrefix(ModelDelta):
    """The embedding-only ablation: P vectors (optionally MLP-made) before the input."""

    edits_inputs = True

    def __init__(self, length: int, dim: int, *, reparameterize: bool, hidden: int) -> None:
        super().__init__()
        self.length = length
        if reparameterize:
            self.embedding = nn.Embedding(length, dim)
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(),
                                           nn.Linear(hidden, dim))
        else:
            self.prefix_weight = nn.Parameter(torch.randn(length, dim))

    def prefix(self) -> torch.Tensor:
        """Return the prepended vectors (length, d_model)."""
        if hasattr(self, "transform"):
            return self.transform(self.embedding.weight)
        return self.prefix_weight

    def edit_inputs(self, edit: InputEdit) -> None:
        edit.prepend(self.prefix().unsqueeze(0))

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prefix": self.prefix() if hasattr(self, "transform") else self.prefix_weight}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if hasattr(self, "transform"):
            raise DeltaStateError("cannot load a computed prefix into a reparameterised delta; "
                                  "load it with reparameterize=False")
        super().load_saved(tensors)


def model_width(model: nn.Module) -> int:
    """Return the width of the model's input embeddings."""
    return int(model.get_input_embeddings().weight.shape[1])


def build_prefix(model: nn.Module, config: PrefixTuningConfig) -> ModelDelta:
    """Build the prefix module a :class:`PrefixTuningConfig` asks for on ``model``."""
    if config.mode == "embedding":
        return EmbeddingPrefix(config.prefix_length, model_width(model),
                               reparameterize=config.reparameterize,
                               hidden=config.reparam_hidden)
    if config.mode == "infix" and getattr(model.config, "is_encoder_decoder", False):
        raise HyperparameterError("infix mode is for decoder-only models ([x; INFIX; y]); "
                                  "use mode='prefix' on an encoder-decoder", field="mode")
    sites = attention_sites(model, cross_attention=config.cross_attention)
    part = PrefixKV(sites, config.prefix_length, reparameterize=config.reparameterize,
                    hidden=config.reparam_hidden,
                    infix=config.mode == "infix")
    if config.init_token_ids is not None:
        part.init_from_tokens(model, config.init_token_ids)
    return part


class PrefixTuning(ModelDeltaMethod):
    """Prefix tuning: trainable keys and values in front of every attention layer."""

    name = "prefix"
    config_cls = PrefixTuningConfig
    summary = "trainable key/value prefixes at every layer, MLP-reparameterised (Li & Liang 2021)"

    def build(self, model: nn.Module, config: DeltaConfig) -> ModelDelta:
        assert isinstance(config, PrefixTuningConfig)
        return build_prefix(model, config)

    def saved_config(self, delta: AttachedDelta) -> DeltaConfig:
        # What is saved is P itself, so the saved delta has no MLP.
        config = delta.config
        assert isinstance(config, PrefixTuningConfig)
        return config.replace(reparameterize=False, init_token_ids=None)
