"""Where the parts of a transformer layer live, per architecture: one mapping table.

Methods ask this table for the query/key/value projections (LoRA's default targets
are W_q and W_v, as in the paper), the FFN projections (IA3 rescales the FFN's hidden
activation, adapters sit after the FFN block), and the attention and FFN blocks. Names
are suffixes in the sense of :mod:`deltatune.core.targets`. An architecture missing
from the table is an error that tells the user to name the modules by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.core.errors import TargetError


@dataclass(frozen=True)
class BlockLayout:
    """Module-name suffixes of one architecture family.

    ``query``/``key``/``value`` may all name one fused projection (``fused_qkv``), as
    in GPT-2's ``c_attn``; ``ffn_up`` are the projections into the FFN's hidden size
    (gate and up for gated FFNs), ``ffn_down`` the one out of it (its input is the
    FFN's hidden activation). ``attention``/``ffn`` name the whole blocks.
    """

    query: tuple[str, ...]
    key: tuple[str, ...]
    value: tuple[str, ...]
    attn_out: tuple[str, ...]
    ffn_up: tuple[str, ...]
    ffn_down: tuple[str, ...]
    attention: tuple[str, ...]
    ffn: tuple[str, ...]
    fused_qkv: bool = False


_LLAMA = BlockLayout(
    query=("self_attn.q_proj",), key=("self_attn.k_proj",), value=("self_attn.v_proj",),
    attn_out=("self_attn.o_proj",), ffn_up=("mlp.gate_proj", "mlp.up_proj"),
    ffn_down=("mlp.down_proj",), attention=("self_attn",), ffn=("mlp",),
)
_GPT2 = BlockLayout(
    query=("attn.c_attn",), key=("attn.c_attn",), value=("attn.c_attn",),
    attn_out=("attn.c_proj",), ffn_up=("mlp.c_fc",), ffn_down=("mlp.c_proj",),
    attention=("attn",), ffn=("mlp",), fused_qkv=True,
)
_NEOX = BlockLayout(
    query=("attention.query_key_value",), key=("attention.query_key_value",),
    value=("attention.query_key_value",), attn_out=("attention.dense",),
    ffn_up=("mlp.dense_h_to_4h",), ffn_down=("mlp.dense_4h_to_h",),
    attention=("attention",), ffn=("mlp",), fused_qkv=True,
)
_OPT = BlockLayout(
    query=("self_attn.q_proj",), key=("self_attn.k_proj",), value=("self_attn.v_proj",),
    attn_out=("self_attn.out_proj",), ffn_up=("fc1",), ffn_down=("fc2",),
    attention=("self_attn",), ffn=("fc1", "fc2"),
)
_BART = BlockLayout(
    query=("self_attn.q_proj", "encoder_attn.q_proj"),
    key=("self_attn.k_proj", "encoder_attn.k_proj"),
    value=("self_attn.v_proj", "encoder_attn.v_proj"),
    attn_out=("self_attn.out_proj", "encoder_attn.out_proj"), ffn_up=("fc1",), ffn_down=("fc2",),
    attention=("self_attn", "encoder_attn"), ffn=("fc1", "fc2"),
)
_BERT = BlockLayout(
    query=("attention.self.query",), key=("attention.self.key",),
    value=("attention.self.value",), attn_out=("attention.output.dense",),
    ffn_up=("intermediate.dense",), ffn_down=("output.dense",),
    attention=("attention",), ffn=("intermediate", "output"),
)
_T5 = BlockLayout(
    query=("SelfAttention.q", "EncDecAttention.q"), key=("SelfAttention.k", "EncDecAttention.k"),
    value=("SelfAttention.v", "EncDecAttention.v"), attn_out=("SelfAttention.o",
                                                             "EncDecAttention.o"),
    ffn_up=("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1"),
    ffn_down=("DenseReluDense.wo",), attention=("SelfAttention", "EncDecAttention"),
    ffn=("DenseReluDense",),
)

LAYOUTS: dict[str, BlockLayout] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gemma2": _LLAMA, "gemma3_text": _LLAMA, "phi3": _LLAMA, "smollm3": _LLAMA,
    "gpt2": _GPT2, "gpt_neox": _NEOX, "opt": _OPT, "bart": _BART, "mbart": _BART,
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "t5": _T5, "mt5": _T5,
}


def model_type_of(model: nn.Module) -> str | None:
    """Return ``model.config.model_type`` when the model has a Hugging Face config."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def layout_for(model: nn.Module, *, what: str = "this method", fix: str | None = None
               ) -> BlockLayout:
    """Return the :class:`BlockLayout` of ``model``'s architecture.

    Raises :class:`TargetError` for an architecture not in the table, naming the option
    that lets the user give module names by hand (``fix``; default: ``target_modules``).
    """
    kind = model_type_of(model)
    if kind in LAYOUTS:
        return LAYOUTS[kind]
    known = ", ".join(sorted(LAYOUTS))
    fix = fix or "Pass target_modules with the module names by hand (e.g. ['q_proj', 'v_proj'])."
    raise TargetError(
        f"deltatune does not know where attention and FFN live in model type {kind!r} "
        f"(known: {known}); {what} needs them. {fix}"
    )


def present(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Return the suffixes of ``suffixes`` that name at least one module of ``model``."""
    names = [n for n, _ in model.named_modules()]
    return [s for s in suffixes if any(n == s or n.endswith("." + s) for n in names)]


# -- sites: where a representation enters and leaves a block ---------------------------
# The unified view (He et al. 2022) modifies a hidden representation h, the output of a
# sub-layer, with a function of either h itself (sequential insertion) or of the
# sub-layer's input x (parallel insertion). Every architecture in the table computes a
# block's output with one last projection and reads the block's input with a first
# one, so a block is located by the pair (first module, last module): a hook on the
# first sees x, a wrapper on the last sees h. This works for blocks that have no module
# of their own (OPT and BART keep fc1/fc2 directly in the decoder layer).
REPRESENTATIONS = ("attention", "ffn", "query", "key", "value")


def _site_suffixes(layout: BlockLayout, representation: str) -> list[tuple[str, str]]:
    if representation == "attention":
        return list(zip(layout.query, layout.attn_out, strict=True))
    if representation == "ffn":
        return [(up, down) for down in layout.ffn_down for up in layout.ffn_up]
    own = {"query": layout.query, "key": layout.key, "value": layout.value}[representation]
    return [(name, name) for name in own]


def block_sites(model: nn.Module, representation: str, *,
                by_hand: dict[str, list[str]] | None = None,
                option: str = "site_modules") -> list[tuple[str, str]]:
    """Return (input module, output module) full names for every block of one kind.

    ``representation`` is one of :data:`REPRESENTATIONS`. ``by_hand`` maps a
    representation to ``[input suffix, output suffix]`` (or one suffix for a single
    projection) and replaces the table's entry. The input module lives in the same
    parent as its output module. Returns the pairs in model order; raises
    :class:`TargetError` when the layout is unknown (naming ``option``) or nothing matched.
    """
    from deltatune.core.targets import iter_candidate_modules  # avoid an import cycle

    if representation not in REPRESENTATIONS:
        raise TargetError(f"unknown representation {representation!r}; use one of "
                          f"{', '.join(REPRESENTATIONS)}")
    example = ("e.g. {'attention': ['q_proj', 'o_proj'], 'ffn': ['fc1', 'fc2']} "
               "(first module of the block, last module of the block)")
    if by_hand and representation in by_hand:
        names = by_hand[representation]
        pairs = [(names[0], names[-1])]
    else:
        layout = layout_for(model, what=f"locating the {representation} blocks",
                            fix=f"Give the module names by hand with {option}, {example}.")
        pairs = _site_suffixes(layout, representation)
    names = [n for n, _ in iter_candidate_modules(model)]
    existing = set(names)
    sites: dict[str, str] = {}
    for name in names:
        for first, last in pairs:
            if name != last and not name.endswith("." + last):
                continue
            parent = name[: len(name) - len(last)]
            if parent + first in existing and name not in sites:
                sites[name] = parent + first
    if not sites:
        raise TargetError(f"no {representation} block found in {type(model).__name__} "
                          f"(looked for {pairs}); give the module names by hand with "
                          f"{option}, {example}.")
    return [(first, last) for last, first in sites.items()]
