"""Non-finite halting, skip-step policy, signals, learning-rate schedule, LoRA+ groups."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import deltatune as dt
from deltatune.core import io
from deltatune.core.errors import ConfigError, NonFiniteError
from deltatune.tasks import CausalLMSFT
from deltatune.train import (
    TrainConfig,
    Trainer,
    TrainerCallback,
    TrainingInterrupted,
    list_checkpoints,
    lr_factor,
)
from tests.conftest import tiny_llama
from tests.tiny_tokenizer import char_tokenizer

ROWS = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(8)]


def make(tmp_path, **cfg):
    torch.manual_seed(0)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    task = CausalLMSFT(char_tokenizer(), chat_template=False, generate_examples=0)
    settings = dict(output_dir=str(tmp_path), epochs=2, batch_size=2, lr=1e-2, progress=False,
                    save_every=1, keep_checkpoints=10)
    settings.update(cfg)
    return dm, task, TrainConfig(**settings)


class Poison(TrainerCallback):
    """At (step, micro) put NaN into one LoRA tensor (param) or its gradient (grad)."""

    def __init__(self, step, micro, where="param"):
        self.at, self.where = (step, micro), where

    def on_micro_step(self, trainer):
        if (trainer.step, trainer.micro) != self.at:
            return
        name, p = next((n, p) for n, p in trainer._trainable() if "lora_A" in n)
        self.name = name
        with torch.no_grad():
            (p.grad if self.where == "grad" else p).view(-1)[0] = float("nan")


def test_nan_parameter_halts_naming_step_and_parameter_without_a_bad_checkpoint(tmp_path):
    dm, task, cfg = make(tmp_path, grad_accum=2)
    poison = Poison(2, 1)  # during optimizer step 3, after its first micro-batch
    with pytest.raises(NonFiniteError) as err:
        Trainer(dm, task, ROWS, None, cfg, callbacks=[poison]).fit()
    msg = str(err.value)
    assert "optimizer step 3" in msg and "micro-batch 2 of 2" in msg
    assert f"first non-finite parameter: {poison.name}" in msg
    assert "step-00000002" in msg  # the last good checkpoint is named
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000001", "step-00000002"]
    for p in list_checkpoints(tmp_path):
        tensors, _ = io.load_tensors(p / "trainable.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_nan_gradient_halts_naming_the_gradient(tmp_path):
    dm, task, cfg = make(tmp_path)
    poison = Poison(1, 1, where="grad")
    with pytest.raises(NonFiniteError, match=r"optimizer step 2 .*the gradient of .*lora_A"):
        Trainer(dm, task, ROWS, None, cfg, callbacks=[poison]).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]


def test_skip_step_policy_drops_the_window_and_counts_it(tmp_path):
    dm, task, cfg = make(tmp_path, nonfinite="skip-step")
    result = Trainer(dm, task, ROWS, None, cfg, callbacks=[Poison(1, 1, where="grad")]).fit()
    assert result.skipped_steps == 1 and result.steps == result.total_steps == 8
    assert result.history[1] == {"step": 2, "skipped": "the gradient of " + next(
        n for n, _ in dm.named_parameters() if "lora_A" in n) + " is not finite"}
    assert all(torch.isfinite(t).all() for t in dm.delta_state_dict().values())


class Kill(TrainerCallback):
    def __init__(self, at, sig):
        self.at, self.sig = at, sig

    def on_micro_step(self, trainer):
        if (trainer.step, trainer.micro) == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_checkpoint_and_raises(tmp_path, sig, code):
    dm, task, cfg = make(tmp_path, grad_accum=2, save_every=None)
    before = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted) as err:
        Trainer(dm, task, ROWS, None, cfg, callbacks=[Kill((1, 1), sig)]).fit()
    assert err.value.exit_code == code
    assert err.value.checkpoint.name == "step-00000001-micro-1"
    assert (err.value.checkpoint / "grads.safetensors").is_file()
    assert signal.getsignal(sig) is before  # handlers restored


def test_lr_schedule_values():
    cfg = TrainConfig(warmup_steps=2, schedule="linear")
    assert [lr_factor(s, 6, cfg) for s in range(6)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cos = TrainConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(2, 4, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(
        torch.tensor(torch.pi / 2)).item()))
    assert lr_factor(5, 6, TrainConfig(schedule="constant", warmup_ratio=0.5)) == 1.0


def test_loraplus_ratio_gives_b_matrices_a_larger_learning_rate(tmp_path):
    dm, task, cfg = make(tmp_path, loraplus_ratio=16.0, lr=1e-3, weight_decay=0.1)
    trainer = Trainer(dm, task, ROWS, None, cfg)
    groups = {g["lr_mult"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {1.0, 16.0}
    names = dict(zip(map(tuple, trainer.group_names),
                     [g["lr_mult"] for g in trainer.optimizer.param_groups]))
    for group_names, mult in names.items():
        assert all(("lora_B" in n) == (mult == 16.0) for n in group_names)
    assert groups[16.0]["lr"] == pytest.approx(1.6e-2)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="schedule must be one of linear, cosine, constant"):
        TrainConfig(schedule="step")
    with pytest.raises(ConfigError, match="unknown training setting.*'epoch'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="batch_size must be a positive int"):
        TrainConfig(batch_size=0)
    for switch in ("liger_kernel", "compile_layers", "gradient_checkpointing"):
        with pytest.raises(ConfigError, match=f"{switch} must be true or false, got 'yes'"):
            TrainConfig(**{switch: "yes"})
    assert TrainConfig.from_dict(TrainConfig(lr=3e-4).to_dict()) == TrainConfig(lr=3e-4)


def test_no_trainable_parameters_is_an_error(tmp_path):
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    task = CausalLMSFT(char_tokenizer(), chat_template=False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        Trainer(model, task, ROWS, None, TrainConfig(output_dir=str(tmp_path)))


def test_out_of_memory_is_a_clear_error_with_a_fix(tmp_path, monkeypatch):
    from deltatune.train import TrainingOutOfMemory

    dm, task, cfg = make(tmp_path, batch_size=4, save_every=None)
    calls = {"n": 0}
    real = task.loss_sum

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch)

    monkeypatch.setattr(task, "loss_sum", flaky)
    with pytest.raises(TrainingOutOfMemory, match=r"out of memory at optimizer step 2, "
                       r"micro-batch 1 .*Try batch_size=2 with grad_accum=2 \(same effective "
                       r"batch\), or gradient_checkpointing=True"):
        Trainer(dm, task, ROWS, None, cfg).fit()


def test_loraplus_first_update_of_b_is_ratio_times_larger(tmp_path):
    """AdamW's first step moves each weight by lr * g / (|g| + eps) (no decay here): about
    lr where the gradient is not tiny. B starts at zero, so its step is ratio * lr."""
    dm, task, cfg = make(tmp_path, loraplus_ratio=16.0, lr=1e-3, max_steps=1, epochs=1,
                         save_every=None, max_grad_norm=None)
    before = {k: v.clone() for k, v in dm.delta_state_dict().items()}
    Trainer(dm, task, ROWS, None, cfg).fit()
    after = dm.delta_state_dict()
    moved_b = max(float((after[k] - before[k]).abs().max()) for k in after if "lora_B" in k)
    moved_a = max(float((after[k] - before[k]).abs().max()) for k in after if "lora_A" in k)
    assert moved_b == pytest.approx(16 * 1e-3, rel=1e-3)
    assert moved_a == 0.0  # with B = 0, A gets no gradient on the first step
