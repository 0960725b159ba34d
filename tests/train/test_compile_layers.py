"""TrainConfig.compile_layers: each decoder layer compiled in place for the run, then eager."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.tasks import CausalLMSFT
from deltatune.train import TrainConfig, Trainer, TrainerCallback
from deltatune.train.compile import compile_layers, decoder_layers
from tests.conftest import randomize_deltas, tiny_gpt2, tiny_llama
from tests.tiny_tokenizer import char_tokenizer


def test_decoder_layers_are_the_no_split_classes():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert decoder_layers(llama) == list(llama.model.layers)
    assert decoder_layers(dt.attach(gpt2, dt.LoraConfig(r=2))) == list(gpt2.transformer.h)
    bare = tiny_llama()
    bare._no_split_modules = None
    with pytest.raises(ConfigError, match="nothing to compile"):
        decoder_layers(bare)


def test_compiled_layers_give_the_eager_logits_and_are_undone():
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_deltas(dm, std=0.2)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dm(input_ids=ids).logits
    undo = compile_layers(dm)
    assert all(layer._compiled_call_impl is not None for layer in dm.model.model.layers)
    with torch.no_grad():
        got = dm(input_ids=ids).logits
    undo()
    assert all(layer._compiled_call_impl is None for layer in dm.model.model.layers)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert list(dm.state_dict()) == list(dt.attach(tiny_llama(), dt.LoraConfig(
        r=4, target_modules="all-linear")).state_dict())  # names as without compiling


def _losses(tmp_path, compiled):
    torch.manual_seed(0)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    task = CausalLMSFT(char_tokenizer(), chat_template=False, max_length=16,
                       generate_examples=0)
    rows = [{"prompt": f"p{i}", "response": "abcd"} for i in range(6)]
    seen = []

    class Probe(TrainerCallback):
        def on_micro_step(self, trainer):
            seen.append(dm.model.model.layers[0]._compiled_call_impl is not None)

    config = TrainConfig(output_dir=str(tmp_path / str(compiled)), max_steps=3, batch_size=2,
                         packing=True, compile_layers=compiled, progress=False,
                         handle_signals=False)
    result = Trainer(dm, task, task.encode_rows(rows), config=config,
                     callbacks=[Probe()]).fit()
    assert dm.model.model.layers[0]._compiled_call_impl is None  # eager again
    return [r["loss"] for r in result.history], seen


def test_training_with_compiled_layers_follows_the_eager_run(tmp_path):
    eager, seen_eager = _losses(tmp_path, False)
    compiled, seen_compiled = _losses(tmp_path, True)
    assert len(eager) == 3 and not any(seen_eager) and seen_compiled and all(seen_compiled)
    assert compiled == pytest.approx(eager, rel=1e-4)
