"""A tiny training setup shared by the trainer rows (2-5) and the signal worker."""

from __future__ import annotations

import torch

import deltatune as dt
from deltatune.tasks import CausalLMSFT
from deltatune.train import TrainConfig
from tests.conftest import tiny_llama
from tests.tiny_tokenizer import char_tokenizer

ROWS = [{"prompt": f"q{i} {w}", "response": f"{w} {w[::-1]}"}
        for i, w in enumerate(["cat", "dog", "emu", "yak", "owl", "bee", "ant", "elk", "fox"])]


def setup(output_dir, seed: int = 0, **overrides):
    """Return (delta model with LoRA + dropout, SFT task, TrainConfig) for ``output_dir``."""
    torch.manual_seed(100 + seed)  # a resume must overwrite whatever init this gives
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1,
                                               target_modules=["q_proj", "v_proj"]))
    task = CausalLMSFT(char_tokenizer(), max_length=40, generate_examples=0)
    cfg = dict(output_dir=str(output_dir), epochs=2, batch_size=2, grad_accum=2, lr=5e-3,
               schedule="cosine", warmup_steps=1, seed=3, progress=False, save_every=1,
               keep_checkpoints=20)
    cfg.update(overrides)
    return dm, task, TrainConfig(**cfg)
