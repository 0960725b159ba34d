"""Model-level deltas: soft prompts on the input embeddings and key/value prefixes.

Prompt-family methods do not change any one layer's weights; they change what the
model sees. Two mechanisms cover all of them:

* **Input edits** (prompt tuning, P-tuning, MPT, IPT, embedding-only prefix): before the
  base model runs, ``input_ids`` become ``inputs_embeds`` and a delta may prepend
  trainable vectors (``InputEdit.prepend``) or overwrite the embeddings of marked
  positions (``InputEdit.inputs_embeds``). The attention mask, ``labels`` (-100 on the
  inserted positions), ``token_type_ids`` and, for decoders, ``position_ids`` follow.
  :class:`~deltatune.core.model.DeltaModel` applies the edits in ``forward`` and in
  ``generate`` (which then runs on ``inputs_embeds`` and gets the prompt ids put back
  in front of its output, so callers see the same shape as without a prompt).

* **Key/value prefixes** (prefix tuning, P-tuning v2, MAM): every self-attention module
  gets extra keys and values in front of its own. They are added inside the attention
  function itself: while a prefix is attached, the model's ``config._attn_implementation``
  names a wrapped version of its eager or SDPA attention that concatenates the prefixes
  of the calling module and widens the mask (and T5's relative position bias) with
  "visible" columns. This works the same in training, in the encoder and the decoder,
  with any padding side, and under ``generate`` with a KV cache, because the cache
  only ever holds the real tokens. Real tokens keep positions 0..n-1 (the prefix is
  positionless memory, the unified view of He et al. 2022); Li & Liang's GPT-2 code
  and ``peft`` put the prefix in the cache and so shift positions by the prefix length,
  which a caller can reproduce by passing ``position_ids``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.errors import ConfigError, DeltaStateError, TargetError
from deltatune.core.registry import AttachedDelta, DeltaMethod
from deltatune.core.targets import get_submodule

if TYPE_CHECKING:
    from deltatune.core.model import DeltaModel

# Where model-level delta modules live inside the wrapped model (so .to() and
# .parameters() see them); one child per delta name.
HOLDER = "deltatune_model_deltas"

# Suffixes of the modules that call the attention function for self-attention, and
# for cross-attention, per model type.
SELF_ATTENTION: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn",), "mistral": ("self_attn",), "qwen2": ("self_attn",),
    "qwen3": ("self_attn",), "gemma": ("self_attn",), "gemma2": ("self_attn",),
    "phi3": ("self_attn",), "smollm3": ("self_attn",), "opt": ("self_attn",),
    "gpt2": ("attn",), "gpt_neox": ("attention",), "bert": ("attention.self",),
    "roberta": ("attention.self",), "xlm-roberta": ("attention.self",),
    "t5": ("SelfAttention",), "mt5": ("SelfAttention",), "bart": ("self_attn",),
    "mbart": ("self_attn",),
}
CROSS_ATTENTION: dict[str, tuple[str, ...]] = {
    "t5": ("EncDecAttention",), "mt5": ("EncDecAttention",), "bart": ("encoder_attn",),
    "mbart": ("encoder_attn",), "gpt2": ("crossattention",),
}


# ----------------------------------------------------------------------------------
# Attention sites
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSite:
    """One attention module that can take a key/value prefix, and its head geometry."""

    name: str
    kv_heads: int
    head_dim: int
    cross: bool = False

    @property
    def kv_dim(self) -> int:
        """Width of one key (or value) vector over all key/value heads."""
        return self.kv_heads * self.head_dim


def _geometry(module: nn.Module, name: str) -> tuple[int, int]:
    head_dim = next((getattr(module, a) for a in ("head_dim", "attention_head_size",
                                                   "key_value_proj_dim", "head_size")
                     if isinstance(getattr(module, a, None), int)), None)
    kv_dim = None
    for attr in ("k_proj", "key", "k"):
        proj = getattr(module, attr, None)
        if isinstance(proj, nn.Module):
            base = getattr(proj, "base", proj)  # a DeltaLayer wraps the projection
            kv_dim = getattr(base, "out_features", None)
            break
    if kv_dim is None:  # fused projections (GPT-2, NeoX): as many kv heads as heads
        heads = next((getattr(module, a) for a in ("num_heads", "num_attention_heads")
                      if isinstance(getattr(module, a, None), int)), None)
        if heads is None and head_dim is not None and isinstance(
                getattr(module, "embed_dim", None), int):
            heads = module.embed_dim // head_dim
        if heads is None:  # GPT-NeoX keeps only head_size on the module; the config has the rest
            cfg = getattr(module, "config", None)
            heads = getattr(cfg, "num_attention_heads", None)
            fused = getattr(module, "query_key_value", None)
            fused = getattr(fused, "base", fused)  # a DeltaLayer wraps the projection
            if isinstance(heads, int) and head_dim is not None and isinstance(
                    getattr(fused, "out_features", None), int) and \
                    fused.out_features != 3 * heads * head_dim:
                heads = None  # not one query, key and value per head: unknown layout
        kv_dim = heads * head_dim if heads and head_dim else None
    if head_dim is None or kv_dim is None:
        raise TargetError(f"cannot read the head size of attention module {name!r} "
                          f"({type(module).__name__}); prefixes need head_dim and the key width")
    return kv_dim // head_dim, head_dim


def attention_sites(model: nn.Module, *, self_attention: bool = True,
                    cross_attention: bool = False) -> list[AttentionSite]:
    """Return the attention modules of ``model`` in forward order (encoder before decoder).

    Raises :class:`TargetError` for a model type whose attention modules are unknown.
    """
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in SELF_ATTENTION:
        raise TargetError(f"deltatune does not know the attention modules of model type "
                          f"{kind!r}; key/value prefixes support: "
                          f"{', '.join(sorted(SELF_ATTENTION))}")
    wanted: list[tuple[str, bool]] = []
    if self_attention:
        wanted += [(s, False) for s in SELF_ATTENTION[kind]]
    if cross_attention:
        if kind not in CROSS_ATTENTION:
            raise TargetError(f"model type {kind!r} has no cross-attention to prefix; turn "
                              f"the cross-attention option off")
        wanted += [(s, True) for s in CROSS_ATTENTION[kind]]
    sites = []
    for name, module in model.named_modules():
        for suffix, cross in wanted:
            if name == suffix or name.endswith("." + suffix):
                sites.append(AttentionSite(name, *_geometry(module, name), cross=cross))
    if not sites:
        raise TargetError(f"found no attention module in {type(model).__name__}")
    return sites


# ----------------------------------------------------------------------------------
# Key/value prefixes inside the attention function
# ----------------------------------------------------------------------------------
@dataclass
class KVPrefix:
    """Keys and values put in front of one attention module's own.

    ``keys``/``values``: (1 or batch, kv_heads, P, head_dim). ``visible_from``, when
    given, is a (batch,) index: only queries at that key position or later see these
    slots (an infix between x and y); None means every query sees them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    visible_from: torch.Tensor | None = None


# attention module attribute: {delta name: callable(batch, device) -> KVPrefix | None}
_PROVIDERS = "_deltatune_kv_providers"
_WRAPPED = "deltatune_prefix+"
_ORIGINAL = "_deltatune_original_attn"
_CAPTURE = "_deltatune_kv_capture"


def _base_attention(module: nn.Module, impl: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise TargetError(f"{type(module).__name__} has no eager_attention_forward; load the "
                              f"model with attn_implementation='sdpa' to use prefixes")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _extend_mask(mask: torch.Tensor | None, module: nn.Module, query: torch.Tensor,
                 kv_len: int, prefix_len: int, visible: torch.Tensor | None,
                 kwargs: dict[str, Any]) -> torch.Tensor | None:
    batch, q_len = query.shape[0], query.shape[2]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if mask is None and visible is None and not (causal and q_len > 1):
        return None  # everyone sees everything, the prefix included
    if mask is None:
        if causal and q_len > 1:
            # Bottom-right aligned causal pattern over the real keys (the cache included).
            offset = kv_len - q_len
            rows = torch.arange(q_len, device=query.device)[:, None] + offset
            mask = (rows >= torch.arange(kv_len, device=query.device)[None, :])[None, None]
        else:
            mask = torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=query.device)
    shape = (*mask.shape[:-1], prefix_len)
    if visible is None:
        pad = (torch.ones(shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool
               else torch.zeros(shape, dtype=mask.dtype, device=mask.device))
    else:
        vis = visible[:, None, :, :].to(mask.device)  # (batch, 1, q, P)
        mask = mask.expand(batch, mask.shape[1], q_len, mask.shape[-1])
        vis = vis.expand(batch, mask.shape[1], q_len, prefix_len)
        pad = vis if mask.dtype == torch.bool else torch.zeros(
            vis.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~vis, torch.finfo(mask.dtype).min)
    return torch.cat([pad, mask], dim=-1)


def prefixed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       **kwargs: Any) -> Any:
    """Attention with this module's active prefixes in front of its keys and values.

    Called by ``transformers`` attention modules in place of eager/SDPA attention;
    returns what the wrapped implementation returns.
    """
    impl = module.config._attn_implementation.removeprefix(_WRAPPED)
    base = _base_attention(module, impl)
    capture = getattr(module, _CAPTURE, None)
    if capture is not None:
        capture.append((key.detach(), value.detach()))
    providers = getattr(module, _PROVIDERS, None) or {}
    prefixes = [p for p in (fn(query.shape[0], query.device) for fn in providers.values())
                if p is not None]
    if not prefixes:
        return base(module, query, key, value, attention_mask, **kwargs)
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    keys = [p.keys.to(key.dtype).expand(batch, -1, -1, -1) for p in prefixes]
    values = [p.values.to(value.dtype).expand(batch, -1, -1, -1) for p in prefixes]
    prefix_len = sum(k.shape[2] for k in keys)
    visible: torch.Tensor | None = None
    if any(p.visible_from is not None for p in prefixes):
        # Key index of each query (the cache included): the last q_len of kv_len.
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        parts = []
        for p in prefixes:
            n = p.keys.shape[2]
            if p.visible_from is None:
                parts.append(torch.ones(batch, q_len, n, dtype=torch.bool, device=query.device))
            else:
                start = p.visible_from.to(query.device).reshape(-1, 1, 1)
                parts.append((q_pos[None, :, None] >= start).expand(batch, q_len, n))
        visible = torch.cat(parts, dim=-1)
    attention_mask = _extend_mask(attention_mask, module, query, kv_len, prefix_len, visible,
                                  kwargs)
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5: the prefix slots get no relative-position bias
        kwargs["position_bias"] = torch.cat(
            [bias.new_zeros(*bias.shape[:-1], prefix_len), bias], dim=-1)
    key = torch.cat([*keys, key], dim=2)
    value = torch.cat([*values, value], dim=2)
    return base(module, query, key, value, attention_mask, **kwargs)


def _register_implementations() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for impl in ("eager", "sdpa"):
        name = _WRAPPED + impl
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, prefixed_attention)
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _install(model: nn.Module) -> None:
    if getattr(model, _ORIGINAL, None) is not None:
        return
    _register_implementations()
    configs = _configs(model)
    originals = {}
    for cfg in configs:
        impl = cfg._attn_implementation or "eager"
        if impl not in ("eager", "sdpa"):
            raise TargetError(f"key/value prefixes need eager or SDPA attention; this model "
                              f"uses {impl!r}. Load it with attn_implementation='sdpa'.")
        originals[id(cfg)] = (cfg, impl)
    for cfg, impl in originals.values():
        cfg._attn_implementation = _WRAPPED + impl
    object.__setattr__(model, _ORIGINAL, originals)


def _uninstall(model: nn.Module) -> None:
    originals = getattr(model, _ORIGINAL, None)
    if originals is None:
        return
    for cfg, impl in originals.values():
        cfg._attn_implementation = impl
    object.__delattr__(model, _ORIGINAL)


class capture_kv:
    """Context manager recording the keys and values each attention module computes.

    ``captured[site]`` becomes a list of (keys, values) tensors, one per call, each
    (batch, kv_heads, length, head_dim) as the module passes them to attention.
    """

    def __init__(self, model: nn.Module, sites: list[str]) -> None:
        self.model, self.sites = model, sites
        self.captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __enter__(self) -> capture_kv:
        _install(self.model)
        for site in self.sites:
            self.captured[site] = []
            object.__setattr__(get_submodule(self.model, site), _CAPTURE, self.captured[site])
        return self

    def __exit__(self, *exc: object) -> None:
        for site in self.sites:
            object.__delattr__(get_submodule(self.model, site), _CAPTURE)
        if not any(hasattr(m, _PROVIDERS) for m in self.model.modules()):
            _uninstall(self.model)


def add_kv_provider(model: nn.Module, site: str, name: str,
                    provider: Callable[[int, torch.device], KVPrefix | None]) -> None:
    """Make attention module ``site`` call ``provider`` for delta ``name``'s prefix."""
    _install(model)
    module = get_submodule(model, site)
    providers = getattr(module, _PROVIDERS, None)
    if providers is None:
        providers = {}
        object.__setattr__(module, _PROVIDERS, providers)
    providers[name] = provider


def remove_kv_provider(model: nn.Module, site: str, name: str) -> None:
    """Undo :func:`add_kv_provider`; the last removal restores the original attention."""
    module = get_submodule(model, site)
    providers = getattr(module, _PROVIDERS, None) or {}
    providers.pop(name, None)
    if not providers and hasattr(module, _PROVIDERS):
        object.__delattr__(module, _PROVIDERS)
    if not any(hasattr(m, _PROVIDERS) for m in model.modules()):
        _uninstall(model)


# ----------------------------------------------------------------------------------
# Input edits
# ----------------------------------------------------------------------------------
@dataclass
class InputEdit:
    """The inputs of one call while prompt deltas edit them (all tensors batch-first).

    ``input_ids`` are the caller's ids (None when the caller passed embeddings);
    ``inserted`` marks positions that a delta put in; ``extra`` holds call arguments
    that deltas consume (e.g. ``task_ids`` for multitask prompts).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    inserted: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    label_per_token: bool = False
    # The other call arguments (decoder inputs, labels of enc-dec models...).
    others: dict[str, Any] = field(default_factory=dict)
    # The caller's ids as generate must return them (rows repeated with the batch).
    source_ids: torch.Tensor | None = None
    # How many positions were put in front of every row.
    prepended: int = 0

    @property
    def batch(self) -> int:
        """Number of rows."""
        return self.inputs_embeds.shape[0]

    def repeat_rows(self, n: int) -> None:
        """Repeat every row ``n`` times (row i becomes rows i*n .. i*n+n-1), in all inputs.

        Used by prompt ensembling: each copy of a row gets another prompt.
        """
        b = self.batch

        def rep(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == b:
                return t.repeat_interleave(n, dim=0)
            return t

        for name in ("inputs_embeds", "attention_mask", "input_ids", "labels", "token_type_ids",
                     "position_ids", "inserted", "source_ids"):
            setattr(self, name, rep(getattr(self, name)))
        for key, value in list(self.others.items()):
            self.others[key] = rep(value)
        for key, value in list(self.extra.items()):
            self.extra[key] = rep(value)

    def prepend(self, embeds: torch.Tensor) -> None:
        """Put ``embeds`` ((batch or 1) x P x d) in front of every row, visible to all."""
        if embeds.dim() != 3 or embeds.shape[-1] != self.inputs_embeds.shape[-1]:
            raise ConfigError(f"a prompt must be (batch, length, {self.inputs_embeds.shape[-1]}); "
                              f"got {tuple(embeds.shape)}")
        b, p = self.batch, embeds.shape[1]
        self.prepended += p
        embeds = embeds.to(self.inputs_embeds.dtype).expand(b, -1, -1)
        self.inputs_embeds = torch.cat([embeds, self.inputs_embeds], dim=1)
        ones = self.attention_mask.new_ones(b, p)
        self.attention_mask = torch.cat([ones, self.attention_mask], dim=1)
        flags = torch.ones(b, p, dtype=torch.bool, device=embeds.device)
        self.inserted = torch.cat([flags, self.inserted], dim=1)
        if self.input_ids is not None:
            self.input_ids = torch.cat([self.input_ids.new_zeros(b, p), self.input_ids], dim=1)
        if self.labels is not None and self.label_per_token:
            self.labels = torch.cat([self.labels.new_full((b, p), -100), self.labels], dim=1)
        if self.token_type_ids is not None:
            self.token_type_ids = torch.cat([self.token_type_ids.new_zeros(b, p),
                                             self.token_type_ids], dim=1)
        if self.position_ids is not None:
            self.position_ids = torch.cat([
                torch.arange(p, device=embeds.device).expand(b, -1).to(self.position_ids.dtype),
                self.position_ids + p], dim=1)


class ModelDelta(nn.Module):
    """Base of a model-level delta's tensors (one per attached delta).

    Subclasses override :meth:`edit_inputs` (set ``edits_inputs = True``) and/or
    :meth:`bind`/:meth:`unbind` to register key/value providers. ``active`` and
    ``disabled`` are kept by the method; an inactive or disabled delta must not
    change any output.
    """

    edits_inputs: ClassVar[bool] = False
    # Call arguments this delta reads (removed before the base model runs).
    consumes: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.disabled = False

    @property
    def on(self) -> bool:
        """True when the delta takes part in forward."""
        return self.active and not self.disabled

    def receive(self, extra: dict[str, Any]) -> None:
        """Take the call arguments named in ``consumes`` (absent ones are missing)."""

    def edit_inputs(self, edit: InputEdit) -> None:
        """Change ``edit`` in place (prepend prompts, overwrite embeddings)."""

    def bind(self, model: nn.Module, name: str) -> None:
        """Hook the delta into ``model`` (e.g. key/value providers); called once at attach."""

    def unbind(self, model: nn.Module, name: str) -> None:
        """Undo :meth:`bind`."""

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Return the tensors a save writes, by key (default: the state dict)."""
        return dict(self.state_dict(keep_vars=True))

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (checked against :meth:`saved_tensors`) into the delta."""
        targets = self.saved_tensors()
        with torch.no_grad():
            for key, value in tensors.items():
                targets[key].copy_(value.to(targets[key].device, targets[key].dtype))


def _holder(model: nn.Module, create: bool) -> nn.ModuleDict | None:
    holder = getattr(model, HOLDER, None)
    if holder is None and create:
        holder = nn.ModuleDict()
        model.add_module(HOLDER, holder)
    return holder


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class ModelDeltaMethod(DeltaMethod):
    """Base of methods whose delta is one :class:`ModelDelta` for the whole model."""

    identity_at_init = False
    supports_per_row = False

    def build(self, model: nn.Module, config: DeltaConfig) -> ModelDelta:
        """Create the delta's module for ``model`` (float32, not yet bound)."""
        raise NotImplementedError

    def part(self, delta: AttachedDelta) -> ModelDelta:
        """Return the delta's :class:`ModelDelta`."""
        for part in delta.parts.values():
            if isinstance(part, ModelDelta):
                return part
        raise DeltaStateError(f"delta {delta.name!r} holds no model-level part")

    def attach(self, model: nn.Module, name: str, config: DeltaConfig) -> dict[str, nn.Module]:
        holder = _holder(model, create=False)
        if holder is not None and name in holder:
            raise DeltaStateError(f"the model already holds a prompt delta named {name!r}")
        part = self.build(model, config).to(_model_device(model))
        holder = _holder(model, create=True)
        holder[name] = part
        try:
            part.bind(model, name)
        except BaseException:
            del holder[name]
            raise
        return {f"{HOLDER}.{name}": part}

    def detach(self, model: nn.Module, delta: AttachedDelta) -> None:
        part = self.part(delta)
        part.unbind(model, delta.name)
        holder = _holder(model, create=False)
        if holder is not None and delta.name in holder:
            del holder[delta.name]
            if not len(holder):
                delattr(model, HOLDER)

    def set_active(self, model: nn.Module, delta: AttachedDelta, active: bool) -> None:
        self.part(delta).active = active

    def set_disabled(self, model: nn.Module, delta: AttachedDelta, disabled: bool) -> None:
        self.part(delta).disabled = disabled

    def saved_tensors(self, model: nn.Module, delta: AttachedDelta) -> dict[str, Any]:
        # The model-level part names its own keys; module copies (a task head) keep
        # the location-prefixed keys of the default.
        out: dict[str, Any] = {}
        for location, part in delta.parts.items():
            if isinstance(part, ModelDelta):
                out.update(part.saved_tensors())
            else:
                out.update({f"{location}.{k}": v
                            for k, v in part.state_dict(keep_vars=True).items()})
        return out

    def load_saved_tensors(self, model: nn.Module, delta: AttachedDelta,
                           tensors: dict[str, Any]) -> None:
        part = self.part(delta)
        own = set(part.saved_tensors())
        part.load_saved({k: v for k, v in tensors.items() if k in own})
        rest = {k: v for k, v in tensors.items() if k not in own}
        if rest:
            super().load_saved_tensors(model, delta, rest)


# ----------------------------------------------------------------------------------
# Applying the edits in DeltaModel.forward / generate
# ----------------------------------------------------------------------------------
def _on_parts(dm: DeltaModel) -> list[ModelDelta]:
    if dm._disabled:
        return []
    out = []
    for n in dm.active:
        for part in dm.get_delta(n).parts.values():
            if isinstance(part, ModelDelta) and part.on:
                out.append(part)
    return out


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _is_decoder_only(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or _is_encoder_decoder(model):
        return False
    can = getattr(model, "can_generate", None)
    return bool(getattr(cfg, "is_decoder", False) or (callable(can) and can()))


@dataclass
class CallEdit:
    """What :func:`edit_call` did: the caller's ids (for generate) and the prepended count."""

    ids: torch.Tensor | None = None
    prepended: int = 0
    length: int = 0


Call = tuple[tuple[Any, ...], dict[str, Any], CallEdit]


def edit_call(dm: DeltaModel, args: tuple[Any, ...], kwargs: dict[str, Any], *,
              generate: bool = False) -> Call:
    """Apply the active input-editing deltas to a forward/generate call.

    Returns the new (args, kwargs) and a :class:`CallEdit`: the caller's ``input_ids``
    (None when nothing was edited), which ``generate`` puts back in front of its
    output, and the number of prepended positions, which ``forward`` cuts from the
    logits so they line up with the caller's inputs.
    """
    parts = _on_parts(dm)
    # every attached part's call arguments are taken out, also while it is off or the
    # model is disabled: they are meant for the delta, never for the wrapped model
    keys = {k for n in dm.delta_names for part in dm.get_delta(n).parts.values()
            if isinstance(part, ModelDelta) for k in part.consumes}
    extra = {k: kwargs.pop(k) for k in keys if k in kwargs}
    for part in parts:
        part.receive({k: v for k, v in extra.items() if k in part.consumes})
    editors = [p for p in parts if p.edits_inputs]
    if not editors:
        return args, kwargs, CallEdit()
    model = dm.model
    if args:
        if "input_ids" in kwargs or len(args) > 1:
            raise ConfigError("pass the inputs to a model with a prompt delta as keywords "
                              "(input_ids=..., attention_mask=...)")
        kwargs["input_ids"] = args[0]
        args = ()
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if (ids is None) == (embeds is None):
        raise ConfigError("give exactly one of input_ids and inputs_embeds")
    if embeds is None:
        if ids.dim() != 2:
            raise ConfigError(f"input_ids must be (batch, length); got shape {tuple(ids.shape)}")
        embeds = model.get_input_embeddings()(ids)
    b, n = embeds.shape[:2]
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
    elif tuple(mask.shape) != (b, n):
        raise ConfigError(f"attention_mask has shape {tuple(mask.shape)}, the inputs are "
                          f"{(b, n)}; prompt deltas need a 2-D padding mask")
    labels = kwargs.get("labels")
    # Per-token labels (causal LM, token classification) line up with the inputs and
    # get -100 on inserted positions; others (a class, enc-dec targets) stay as they are.
    per_token = (labels is not None and labels.dim() == 2 and labels.shape[1] == n
                 and not _is_encoder_decoder(model))
    edit = InputEdit(inputs_embeds=embeds, attention_mask=mask, input_ids=ids,
                     labels=kwargs.pop("labels") if per_token else None,
                     token_type_ids=kwargs.pop("token_type_ids", None),
                     position_ids=kwargs.pop("position_ids", None),
                     inserted=torch.zeros(b, n, dtype=torch.bool, device=embeds.device),
                     extra=extra, label_per_token=per_token, others=kwargs, source_ids=ids)
    for part in editors:
        part.edit_inputs(edit)
    kwargs = edit.others
    kwargs["inputs_embeds"] = edit.inputs_embeds
    kwargs["attention_mask"] = edit.attention_mask
    if per_token:
        kwargs["labels"] = edit.labels
    if edit.token_type_ids is not None:
        kwargs["token_type_ids"] = edit.token_type_ids
    if edit.position_ids is not None:
        kwargs["position_ids"] = edit.position_ids
    elif (not generate and _is_decoder_only(model) and "cache" not in kwargs
          and "past_key_values" not in kwargs):
        # As generate does: positions count real tokens, so left padding changes nothing.
        pos = edit.attention_mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = pos.masked_fill(edit.attention_mask == 0, 1)
    return args, kwargs, CallEdit(edit.source_ids, edit.prepended, n)


def align_outputs(model: nn.Module, output: Any, edit: CallEdit) -> Any:
    """Cut prepended prompt positions from ``output.logits`` (decoder-only and encoders).

    The model's own loss already skipped them (labels are -100 there); after this, logits
    line up with the caller's ``input_ids`` as without a prompt. Hidden states keep them.
    """
    logits = getattr(output, "logits", None)
    if (edit.prepended and isinstance(logits, torch.Tensor) and logits.dim() == 3
            and not _is_encoder_decoder(model)
            and logits.shape[1] == edit.length + edit.prepended):
        output.logits = logits[:, edit.prepended:]
    return output


def restore_generated(model: nn.Module, output: Any, edit: CallEdit) -> Any:
    """Put the caller's ids in front of a decoder-only ``generate`` output on embeddings."""
    ids = edit.ids
    if ids is None or _is_encoder_decoder(model):
        return output
    if isinstance(output, torch.Tensor):
        return torch.cat([ids.to(output.device), output], dim=1)
    sequences = getattr(output, "sequences", None)
    if isinstance(sequences, torch.Tensor):
        output.sequences = torch.cat([ids.to(sequences.device), sequences], dim=1)
    return output
