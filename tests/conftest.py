"""Shared fixtures: tiny random models of each architecture family, built from configs.

Every factory seeds torch itself, so two calls give identical weights; tests compare a
model against a freshly built twin instead of deep-copying.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

VOCAB = 128


def _seeded(build):
    def factory(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = build(**overrides)
        return model.eval()

    factory.__name__ = build.__name__
    return factory


@_seeded
def tiny_llama(**kw):
    """A 2-layer Llama (hidden 32, GQA 4/2 heads, vocab 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@_seeded
def tiny_gpt2(**kw):
    """A 2-layer GPT-2 (Conv1D layers, fused c_attn)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
               bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg))


@_seeded
def tiny_neox(**kw):
    """A 2-layer GPT-NeoX (fused query_key_value)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128)
    cfg.update(kw)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**cfg))


@_seeded
def tiny_opt(**kw):
    """A 2-layer OPT decoder."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32)
    cfg.update(kw)
    return OPTForCausalLM(OPTConfig(**cfg))


@_seeded
def tiny_bert(task: str = "sequence-classification", **kw):
    """A 2-layer BERT encoder; ``task`` picks the head (sequence-/token-classification, mlm)."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
    )

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, num_labels=3)
    cfg.update(kw)
    cls = {"sequence-classification": BertForSequenceClassification,
           "token-classification": BertForTokenClassification,
           "masked-lm": BertForMaskedLM, "base": BertModel}[task]
    return cls(BertConfig(**cfg))


@_seeded
def tiny_roberta(**kw):
    """A 2-layer RoBERTa sequence classifier."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=140, num_labels=2,
               pad_token_id=1)
    cfg.update(kw)
    return RobertaForSequenceClassification(RobertaConfig(**cfg))


@_seeded
def tiny_t5(**kw):
    """A 2+2-layer T5 encoder-decoder."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
               num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
               eos_token_id=1)
    cfg.update(kw)
    return T5ForConditionalGeneration(T5Config(**cfg))


@_seeded
def tiny_bart(**kw):
    """A 2+2-layer BART encoder-decoder."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1,
               bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    cfg.update(kw)
    return BartForConditionalGeneration(BartConfig(**cfg))


FACTORIES = {
    "llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox, "opt": tiny_opt,
    "bert": tiny_bert, "roberta": tiny_roberta, "t5": tiny_t5, "bart": tiny_bart,
}


def token_batch(batch: int = 2, length: int = 7, seed: int = 1, low: int = 3) -> torch.Tensor:
    """Return random token ids in [low, VOCAB) with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, length), generator=gen)


def model_inputs(arch: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    """Return forward kwargs suited to the architecture (decoder ids for enc-dec)."""
    ids = token_batch(batch, length, seed)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch in ("t5", "bart"):
        inputs["decoder_input_ids"] = token_batch(batch, 5, seed + 1)
    return inputs


def randomize_deltas(dm, std: float = 0.5, seed: int = 3) -> None:
    """Fill every delta tensor with random values (zero-init deltas would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in dm.delta_names:
            for p in dm.get_delta(name).parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(params=sorted(FACTORIES))
def arch(request) -> str:
    """Parametrise a test over every tiny architecture."""
    return request.param
