"""Trainer features: step-level loss normalisation, method callbacks, best model and early
stopping, mixed precision, gradient checkpointing, full fine-tuning of a plain module."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.callbacks import StepCallback
from deltatune.tasks import CausalLMSFT, SequenceClassification
from deltatune.train import TrainConfig, Trainer, TrainerCallback
from tests.conftest import tiny_bert, tiny_llama
from tests.tiny_tokenizer import char_tokenizer

ROWS = [{"prompt": f"p{i}", "response": "x" * (1 + i % 3)} for i in range(8)]


def lora_model(seed=0, **kw):
    torch.manual_seed(seed)
    return dt.attach(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **kw))


def sft():
    return CausalLMSFT(char_tokenizer(), chat_template=False, generate_examples=0)


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), epochs=1, batch_size=4, lr=1e-2, progress=False,
                max_grad_norm=None)
    base.update(kw)
    return TrainConfig(**base)


def test_accumulation_gives_the_gradient_of_the_whole_step(tmp_path):
    """batch 4 x accum 1 == batch 2 x accum 2 == batch 1 x accum 4 (token-weighted mean)."""
    results = []
    for b, a in [(4, 1), (2, 2), (1, 4)]:
        dm = lora_model()
        Trainer(dm, sft(), ROWS, None, cfg(tmp_path / f"{b}", batch_size=b, grad_accum=a)).fit()
        results.append(dm.delta_state_dict())
    for other in results[1:]:
        for k in results[0]:
            assert torch.allclose(results[0][k], other[k], rtol=0, atol=1e-6), k


class Recorder(StepCallback):
    def __init__(self):
        self.calls, self.counter = [], 0

    def on_train_begin(self, model, total_steps):
        self.calls.append(("begin", total_steps))

    def on_optimizer_step(self, model, step):
        self.counter += 1
        self.calls.append(("step", step))

    def state_dict(self):
        return {"counter": self.counter, "t": torch.tensor([float(self.counter)])}

    def load_state_dict(self, state):
        self.counter = state["counter"]
        assert float(state["t"][0]) == self.counter


class StopAfter(TrainerCallback):
    def __init__(self, n):
        self.n = n

    def on_step_end(self, trainer, record):
        if record["step"] == self.n:
            trainer.request_stop()


def test_method_callbacks_are_called_and_their_state_resumes(tmp_path, monkeypatch):
    rec = Recorder()
    dm = lora_model()
    monkeypatch.setattr(dm, "training_callbacks", lambda: [rec])
    Trainer(dm, sft(), ROWS, None, cfg(tmp_path, epochs=2, batch_size=2),
            callbacks=[StopAfter(3)]).fit()
    assert rec.calls == [("begin", 8), ("step", 1), ("step", 2), ("step", 3)]
    rec2 = Recorder()
    dm2 = lora_model()
    monkeypatch.setattr(dm2, "training_callbacks", lambda: [rec2])
    Trainer(dm2, sft(), ROWS, None, cfg(tmp_path, epochs=2, batch_size=2)).fit(resume="auto")
    assert rec2.calls == [("step", s) for s in range(4, 9)]  # no second on_train_begin
    assert rec2.counter == 8


def test_best_model_and_early_stopping(tmp_path):
    class Scripted(CausalLMSFT):
        """Evaluation returns a scripted sequence of losses."""

        values = iter([3.0, 2.0, 2.5, 2.4, 1.0])

        def evaluate(self, model, examples, **kw):
            return {"loss": next(self.values)}

    task = Scripted(char_tokenizer(), chat_template=False)
    dm = lora_model()
    result = Trainer(dm, task, ROWS, ROWS[:2], cfg(tmp_path, epochs=5, batch_size=2,
                                                   eval_every=2, early_stopping_patience=2)).fit()
    assert result.stop_reason == "early-stopping"
    assert [e["loss"] for e in result.evals] == [3.0, 2.0, 2.5, 2.4]
    assert result.best["step"] == 4 and result.best["value"] == 2.0
    assert result.steps == 8 and (tmp_path / "best" / "delta.safetensors").is_file()
    assert (tmp_path / "adapter" / "delta.safetensors").is_file()


def test_gradient_checkpointing_changes_nothing(tmp_path):
    plain, ckpt = lora_model(), lora_model()
    Trainer(plain, sft(), ROWS, None, cfg(tmp_path / "a")).fit()
    Trainer(ckpt, sft(), ROWS, None, cfg(tmp_path / "b", gradient_checkpointing=True)).fit()
    assert ckpt.model.model.gradient_checkpointing
    a, b = plain.delta_state_dict(), ckpt.delta_state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    ref, low = lora_model(), lora_model()
    Trainer(ref, sft(), ROWS, None, cfg(tmp_path / "a", epochs=3, batch_size=2)).fit()
    # a second Trainer in the same process may use another precision
    trainer = Trainer(low, sft(), ROWS, None, cfg(tmp_path / "b", epochs=3, batch_size=2,
                                                   mixed_precision="bf16"))
    assert trainer.accelerator.mixed_precision == "bf16"
    res = trainer.fit()
    back = Trainer(lora_model(), sft(), ROWS, None, cfg(tmp_path / "c"))
    assert back.accelerator.mixed_precision == "no"
    assert all(torch.isfinite(t).all() for t in low.delta_state_dict().values())
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    a, b = ref.delta_state_dict(), low.delta_state_dict()
    rel = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a if a[k].norm() > 0)
    assert rel < 0.1


def test_classification_with_a_trainable_head_learns(tmp_path):
    rows = [{"text": t, "label": lab} for t, lab in
            [("aaaa", "a"), ("aaa", "a"), ("aa", "a"), ("zzzz", "z"), ("zzz", "z"), ("zz", "z")]]
    task = SequenceClassification(char_tokenizer())
    torch.manual_seed(0)
    dm = dt.attach(tiny_bert(num_labels=2), dt.LoraConfig(r=4, target_modules=["query", "value"],
                                                          modules_to_save=["classifier"]))
    before = Trainer(dm, task, rows, rows, cfg(tmp_path, lr=5e-2)).evaluate()
    result = Trainer(dm, task, rows, rows, cfg(tmp_path, epochs=15, batch_size=3,
                                               lr=5e-2)).fit()
    assert result.final_eval["loss"] < before["loss"] / 2
    assert result.final_eval["accuracy"] == 1.0


def test_full_fine_tuning_of_a_plain_module(tmp_path):
    model = tiny_llama()
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1." in n)
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = Trainer(model, sft(), ROWS, None, cfg(tmp_path)).fit()
    assert (tmp_path / "adapter" / "trainable.safetensors").is_file()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("layers.1." in n for n in changed)
    assert result.steps == 2


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logged_learning_rates_follow_the_schedule(tmp_path, schedule):
    from deltatune.train import lr_factor

    c = cfg(tmp_path, epochs=2, batch_size=2, schedule=schedule, warmup_steps=2)
    result = Trainer(lora_model(), sft(), ROWS, None, c).fit()
    assert [h["lr"] for h in result.history] == pytest.approx(
        [1e-2 * lr_factor(s, 8, c) for s in range(8)])


class Snapshots(TrainerCallback):
    """The delta tensors after every optimizer step."""

    def __init__(self):
        self.by_step = {}

    def on_step_end(self, trainer, record):
        model = trainer.raw_model
        self.by_step[record["step"]] = {k: v.clone() for k, v in
                                        model.delta_state_dict().items()}


def test_best_dir_holds_the_delta_of_the_best_evaluation(tmp_path):
    """best/ is the delta as it was at the best evaluation; adapter/ the one at the end."""
    class Scripted(CausalLMSFT):
        values = iter([3.0, 1.5, 2.5, 2.0])

        def evaluate(self, model, examples, **kw):
            return {"loss": next(self.values)}

    snaps = Snapshots()
    dm = lora_model()
    result = Trainer(dm, Scripted(char_tokenizer(), chat_template=False), ROWS, ROWS[:2],
                     cfg(tmp_path, epochs=2, batch_size=2, eval_every=2),
                     callbacks=[snaps]).fit()
    assert result.best["step"] == 4 and result.stop_reason == "completed"
    best = dt.load(tiny_llama(), tmp_path / "best").delta_state_dict()
    final = dt.load(tiny_llama(), tmp_path / "adapter").delta_state_dict()
    for k in best:
        assert torch.equal(best[k], snaps.by_step[4][k]), k
        assert torch.equal(final[k], snaps.by_step[8][k]), k
    assert any(not torch.equal(best[k], final[k]) for k in best)


def test_gradient_clipping_caps_the_global_norm_the_optimizer_sees(tmp_path):
    dm = lora_model()
    trainer = Trainer(dm, sft(), ROWS, None, cfg(tmp_path, batch_size=2, max_grad_norm=0.01))
    seen = []
    step = trainer.optimizer.step

    def recording_step(*a, **kw):
        grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))
        return step(*a, **kw)

    trainer.optimizer.step = recording_step
    result = trainer.fit()
    raw = [h["grad_norm"] for h in result.history]  # logged: the norm before clipping
    assert len(seen) == len(raw) == 4 and all(r > 0.01 for r in raw)
    assert seen == pytest.approx([min(r, 0.01) for r in raw], rel=1e-4)
