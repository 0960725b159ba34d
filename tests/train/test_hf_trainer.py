"""A DeltaModel trained by Hugging Face ``transformers.Trainer``, then saved and reloaded."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import model_inputs, tiny_llama


def _rows(ids, labels):
    """A map-style data set of {"input_ids", "labels"} rows, as Trainer takes."""
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    return Rows()


def test_hf_trainer_trains_a_delta_that_saves_and_reloads(tmp_path):
    from transformers import Trainer, TrainingArguments

    from deltatune.integrations.hf_trainer import DeltaTuneTrainerCallback

    ids = model_inputs("llama", batch=8, length=9)["input_ids"]
    torch.manual_seed(0)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, lora_alpha=4,
                                               target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        before = float(dm(input_ids=ids, labels=ids).loss)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=12,
                             per_device_train_batch_size=4, learning_rate=0.02, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, seed=0)
    Trainer(model=dm, args=args, train_dataset=_rows(ids, ids),
            callbacks=[DeltaTuneTrainerCallback(dm)]).train()
    dm.eval()
    with torch.no_grad():
        after = float(dm(input_ids=ids, labels=ids).loss)
        trained_logits = dm(input_ids=ids).logits
    assert after < before - 0.05  # it trained the delta
    # only the delta changed: the base weights under it are the original ones
    fresh = tiny_llama()
    base = dict(fresh.named_parameters())
    for name, p in dm.model.named_parameters():
        if not p.requires_grad and name in base:
            assert torch.equal(p, base[name]), name
    dm.save_delta(tmp_path / "delta")
    reloaded = dt.load(tiny_llama(), tmp_path / "delta")
    saved = dm.delta_state_dict()
    for k, v in reloaded.delta_state_dict().items():
        assert torch.equal(v, saved[k]), k
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained_logits)


def _train_with(trainer_class, tmp_path, ids, labels):
    from transformers import TrainingArguments

    torch.manual_seed(0)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), max_steps=4,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=0.02, report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True, seed=0)
    trainer = trainer_class(model=dm, args=args, train_dataset=_rows(ids, labels))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dm.delta_state_dict(), losses, trainer


def test_delta_tune_trainer_loss_without_logits_trains_as_the_hf_loss(tmp_path, monkeypatch):
    # same data, seeds and accumulation: the fused loss (labels partly -100, so the
    # accumulated token count matters) gives Trainer's own losses and the same delta
    from transformers import Trainer

    from deltatune.integrations.hf_trainer import DeltaTuneTrainer, DeltaTuneTrainerCallback
    from deltatune.kernels import fast_path, head_loss
    from tests.helpers import count_calls

    ids = model_inputs("llama", batch=8, length=9)["input_ids"]
    labels = ids.clone()
    labels[::2, :5] = -100  # prompts masked in half the rows
    with fast_path("on"):
        ref_state, ref_losses, _ = _train_with(Trainer, tmp_path, ids, labels)
        calls = count_calls(monkeypatch, head_loss, "fused_linear_cross_entropy")
        state, losses, trainer = _train_with(DeltaTuneTrainer, tmp_path, ids, labels)
    assert calls["n"] == 8  # 4 steps x 2 micro-batches, every one fused
    assert any(isinstance(cb, DeltaTuneTrainerCallback)
               for cb in trainer.callback_handler.callbacks)
    assert len(losses) == len(ref_losses) == 4
    assert losses == [pytest.approx(x, rel=1e-5) for x in ref_losses]
    for k, v in ref_state.items():
        assert ((state[k] - v).norm() / v.norm()).item() < 1e-4, k
