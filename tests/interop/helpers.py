"""Helpers for the interop tests: PEFT twins with random weights, model dirs, logits."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tests.conftest import model_inputs

# (architecture, PEFT LoraConfig kwargs): every LoRA feature we map, over four families.
CASES = {
    "llama-rslora-embed-patterns": ("llama", dict(
        r=4, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj",
                                                             "embed_tokens"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 5})),
    "gpt2-conv1d-wte": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"],
                                     fan_in_fan_out=True)),
    "bert-seqcls-head": ("bert", dict(r=2, lora_alpha=4, target_modules=["query", "value"],
                                      modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "t5-layers": ("t5", dict(r=2, lora_alpha=6, target_modules=["q", "v", "wo"],
                             layers_to_transform=[1], layers_pattern="block")),
}


def randomize_peft(peft_model, std: float = 0.3, seed: int = 5) -> None:
    """Fill every trainable PEFT tensor (LoRA factors, saved module copies) with noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def peft_model(factory, **lora_kwargs):
    """Return a PEFT LoRA model on ``factory()`` with random adapter weights, in eval mode."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(factory(), LoraConfig(lora_dropout=0.0, **lora_kwargs))
    randomize_peft(pm)
    return pm.eval()


def logits(model, arch: str, batch: int = 2) -> torch.Tensor:
    """Return the logits of ``model`` on the fixed inputs of ``arch``."""
    with torch.no_grad():
        return model(**model_inputs(arch, batch=batch)).logits


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids ('t0'..'t127')."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t3", pad_token="t0",
                                   bos_token="t1", eos_token="t2")


def model_dir(path: Path, model) -> Path:
    """Save ``model`` and a tiny tokenizer as a local model directory; return it."""
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
