"""Exact resume: an interrupted + resumed run ends bit-equal to an uninterrupted one (CPU).

Setting: shuffled data, LoRA dropout 0.1 (so the RNG matters), gradient accumulation 2,
an uneven last window per epoch, evaluation every step, several epochs.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.tasks import CausalLMSFT
from deltatune.train import TrainConfig, Trainer, TrainerCallback, list_checkpoints
from deltatune.train.checkpoint import ResumeError
from tests.conftest import tiny_llama
from tests.tiny_tokenizer import char_tokenizer

ROWS = [{"prompt": f"q{i} {w}", "response": f"{w} {w[::-1]}"}
        for i, w in enumerate(["cat", "dog", "emu", "yak", "owl", "bee", "ant", "elk", "fox",
                               "gnu", "hen"])]


def setup(tmp_path, seed=0, **overrides):
    """A fresh tiny Llama with one LoRA (dropout on), the SFT task and a config."""
    torch.manual_seed(123 + seed)  # LoRA A init differs per call; a resume must overwrite it
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                               target_modules=["q_proj", "v_proj"]))
    task = CausalLMSFT(char_tokenizer(), max_length=48, generate_examples=0)
    cfg = dict(output_dir=str(tmp_path), epochs=3, batch_size=2, grad_accum=2, lr=5e-3,
               schedule="cosine", warmup_steps=2, eval_every=2, seed=7, progress=False,
               keep_checkpoints=10)
    cfg.update(overrides)
    return dm, task, TrainConfig(**cfg)


class StopAt(TrainerCallback):
    """Request a stop once (step, micro) is reached."""

    def __init__(self, step: int, micro: int) -> None:
        self.target = (step, micro)

    def on_micro_step(self, trainer) -> None:
        if (trainer.step, trainer.micro) == self.target:
            trainer.request_stop()


def final_state(dm):
    return {k: v.clone() for k, v in dm.delta_state_dict().items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run."""
    out = tmp_path_factory.mktemp("straight")
    dm, task, cfg = setup(out)
    result = Trainer(dm, task, ROWS, ROWS[:3], cfg).fit()
    return final_state(dm), result


# 11 rows, batch 2 -> 6 micro-batches per epoch -> 3 windows (the last one has 2)
@pytest.mark.parametrize("stop", [(0, 1), (1, 2), (2, 1), (3, 2), (4, 1)],
                         ids=["mid-window-first-step", "step-boundary-mid-epoch",
                              "mid-window-at-epoch-end", "epoch-boundary", "mid-window-epoch2"])
def test_interrupted_then_resumed_is_bit_equal(tmp_path, straight, stop):
    ref_weights, ref = straight
    dm, task, cfg = setup(tmp_path)
    first = Trainer(dm, task, ROWS, ROWS[:3], cfg, callbacks=[StopAt(*stop)]).fit()
    assert first.stop_reason == "stopped"
    assert first.steps < ref.steps
    step, micro = stop
    expected_name = (f"step-{step:08d}-micro-{micro}" if micro < 2 else f"step-{step + 1:08d}")
    assert first.checkpoint.name == expected_name

    dm2, task2, cfg2 = setup(tmp_path, seed=1)
    resumed = Trainer(dm2, task2, ROWS, ROWS[:3], cfg2).fit(resume="auto")
    assert resumed.resumed_from == first.checkpoint
    got = final_state(dm2)
    assert got.keys() == ref_weights.keys()
    for k in got:
        assert torch.equal(got[k], ref_weights[k]), k
    assert resumed.history == ref.history  # losses, learning rates, grad norms, bit for bit
    assert resumed.evals == ref.evals


def test_reference_run_learns(straight):
    _, ref = straight
    assert ref.steps == 9 and ref.stop_reason == "completed"
    assert [h["step"] for h in ref.history] == list(range(1, 10))
    assert ref.history[-1]["loss"] < ref.history[0]["loss"]


def test_resume_refuses_changed_settings(tmp_path):
    dm, task, cfg = setup(tmp_path, epochs=1)
    Trainer(dm, task, ROWS, None, cfg, callbacks=[StopAt(0, 2)]).fit()
    dm2, task2, cfg2 = setup(tmp_path, epochs=1, lr=1e-3)
    with pytest.raises(ResumeError, match=r"lr: checkpoint 0.005, now 0.001"):
        Trainer(dm2, task2, ROWS, None, cfg2).fit(resume="auto")
    dm3, task3, cfg3 = setup(tmp_path, epochs=1)
    with pytest.raises(ResumeError, match="training data differs"):
        Trainer(dm3, task3, ROWS[:-1], None, cfg3).fit(resume="auto")


def test_auto_resume_skips_a_torn_checkpoint(tmp_path):
    dm, task, cfg = setup(tmp_path, epochs=1, eval_every=None, save_every=1)
    Trainer(dm, task, ROWS, None, cfg, callbacks=[StopAt(1, 2)]).fit()
    paths = list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["step-00000001", "step-00000002"]
    opt = paths[-1] / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-7])  # truncate the newest checkpoint's optimizer state
    dm2, task2, cfg2 = setup(tmp_path, epochs=1, eval_every=None, save_every=1)
    result = Trainer(dm2, task2, ROWS, None, cfg2).fit(resume="auto")
    assert result.resumed_from == paths[0]
    assert any("skipped step-00000002" in n and "optimizer.safetensors" in n
               for n in result.notes)


def test_missing_state_is_a_hard_error_unless_partial_resume_is_allowed(tmp_path):
    from deltatune.core.errors import AdapterFileCorrupt

    dm, task, cfg = setup(tmp_path, epochs=1, eval_every=None)
    first = Trainer(dm, task, ROWS, None, cfg, callbacks=[StopAt(1, 2)]).fit()
    (first.checkpoint / "optimizer.safetensors").unlink()
    (first.checkpoint / "optimizer.json").unlink()
    dm2, task2, cfg2 = setup(tmp_path, epochs=1, eval_every=None)
    with pytest.raises(AdapterFileCorrupt, match=r"optimizer\.(json|safetensors)"):
        Trainer(dm2, task2, ROWS, None, cfg2).fit(resume=first.checkpoint)
    dm3, task3, cfg3 = setup(tmp_path, epochs=1, eval_every=None, allow_partial_resume=True)
    result = Trainer(dm3, task3, ROWS, None, cfg3).fit(resume=first.checkpoint)
    assert result.steps == 3 and result.resumed_from == first.checkpoint
    assert any("no optimizer state: AdamW moments start from zero" in n for n in result.notes)
