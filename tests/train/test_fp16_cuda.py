"""fp16 autocast + GradScaler through the trainer on CUDA (skipped without a CUDA device).

accelerate creates a GradScaler only on CUDA, so the CPU suite cannot reach this path; the
tests ran on an H200 through the device tool (docs/performance.md).
"""

from __future__ import annotations

import pytest
import torch

from deltatune.train import TrainConfig, Trainer
from tests.train.test_features import ROWS, lora_model, sft

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), epochs=3, batch_size=2, lr=1e-2, progress=False,
                max_grad_norm=1.0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_fp16_with_grad_scaler_trains_like_fp32(tmp_path):
    ref, low = lora_model(), lora_model()
    ref_res = Trainer(ref, sft(), ROWS, None, _cfg(tmp_path / "a")).fit()
    trainer = Trainer(low, sft(), ROWS, None, _cfg(tmp_path / "b", mixed_precision="fp16"))
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    res = trainer.fit()
    # the scaler ran: its scale is a finite power of two (65536 start, halved per overflow)
    scale = scaler.get_scale()
    assert scale > 0 and float(torch.log2(torch.tensor(scale))).is_integer()
    losses = [r["loss"] for r in res.history if "loss" in r]
    ref_losses = [r["loss"] for r in ref_res.history]
    assert len(losses) == len(ref_losses) == 12
    # fp16 autocast against float32: every step's loss within 1%, and it learns
    for a, b in zip(ref_losses, losses):
        assert abs(a - b) <= 1e-2 * abs(a), (a, b)
    assert losses[-1] < losses[0]
    a, b = ref.delta_state_dict(), low.delta_state_dict()
    assert all(torch.isfinite(t).all() for t in b.values())
    rel = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a if a[k].norm() > 0)
    assert rel < 0.1


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    dm = lora_model()
    before = {k: v.clone() for k, v in dm.delta_state_dict().items()}
    trainer = Trainer(dm, sft(), ROWS, None, _cfg(tmp_path, max_steps=1, max_grad_norm=None,
                                                   mixed_precision="fp16"))
    # a scale of 2**100 overflows any fp16 gradient: the scaler must skip the update
    trainer.accelerator.scaler._init_scale = 2.0 ** 100
    trainer.fit()
    assert trainer.accelerator.optimizer_step_was_skipped
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 99  # backoff factor 0.5
    after = dm.delta_state_dict()
    for k in before:
        assert torch.equal(before[k].cpu(), after[k].cpu()), k
