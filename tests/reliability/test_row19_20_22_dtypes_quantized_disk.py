"""RELIABILITY.md rows 19, 20 and 22 (library side).

Row 19 (dtype matrix): base float32/float16/bfloat16 x delta dtype auto/same/float32:
forward and backward run, the saved dtype is recorded, loading with another dtype
reports the cast, and a zero-init LoRA on a bf16 base gives the base output bit for bit.
Row 20 (quantized merge): merging into integer or quantized weights is refused, the
base untouched. (``allow_lossy_merge=True`` with a deviation report is not built.)
Row 22 (disk): a full disk (ENOSPC) or read-only file system (EROFS) during a save fails
atomically, keeps the previous directory intact, and says how much space is needed. The
trainer's out-of-memory report is tested with a fault hook as well.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import io
from deltatune.core.errors import MergeError
from deltatune.core.layers import DeltaLayer
from tests.reliability._toy import fill, lora, state_hash, toy, toy_ids

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# -- row 19 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("delta_dtype", ["auto", "same", "float32"])
@pytest.mark.parametrize("base_dtype", DTYPES, ids=str)
def test_row19_forward_backward_save_load_in_every_dtype(tmp_path, base_dtype, delta_dtype):
    dtype = {"auto": None, "same": base_dtype, "float32": torch.float32}[delta_dtype]
    dm = dt.DeltaModel(toy(dtype=base_dtype))
    dm.add("d", lora(), dtype=dtype)
    fill(dm, std=0.05)
    want = dtype or base_dtype
    assert all(p.dtype == want for p in dm.get_delta("d").parameters())
    out = dm(toy_ids())
    assert out.dtype == base_dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == want for p in dm.trainable_parameters())
    dm.save_delta(tmp_path / "d")
    payload = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert payload["dtype"] == str(want).removeprefix("torch.")
    back = dt.load(toy(dtype=base_dtype), tmp_path / "d")
    assert torch.equal(back(toy_ids()), dm(toy_ids()).detach())
    other = torch.float32 if want != torch.float32 else torch.bfloat16
    cast = dt.load(toy(dtype=base_dtype), tmp_path / "d", dtype=other)
    report = cast.get_delta("d").info["load_report"]
    assert report.casts and all(f"{want} -> {other}" in c for c in report.casts)


@pytest.mark.parametrize("base_dtype", DTYPES, ids=str)
def test_row19_zero_init_is_bitwise_the_base_in_low_precision(base_dtype):
    base = toy(dtype=base_dtype)(toy_ids())
    for dtype in (None, torch.float32):
        dm = dt.DeltaModel(toy(dtype=base_dtype))
        dm.add("d", lora(), dtype=dtype)
        with torch.no_grad():
            assert torch.equal(dm(toy_ids()), base)


# -- row 20 ------------------------------------------------------------------------------------
class FakeQuantLinear(nn.Linear):
    """A linear layer whose weight is fake-quantized (torch.ao QAT style)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.weight_fake_quant = nn.Identity()


def test_row20_merge_into_quantized_weights_is_refused():
    model = toy()
    fq = FakeQuantLinear(16, 12)
    fq.load_state_dict(model.proj.state_dict())
    model.proj = fq
    int8 = nn.Linear(8, 5)
    int8.weight = nn.Parameter(torch.randint(-8, 8, (5, 8), dtype=torch.int8),
                               requires_grad=False)
    for target, holder in (("proj", model), ("out", None)):
        m = model if holder else toy()
        if target == "out":
            m.out = int8
        dm = dt.DeltaModel(m)
        dm.add("d", lora(targets=[target]))
        fill(dm)
        before = state_hash(dm.model)
        with pytest.raises(MergeError, match=r"base weight is quantized.*Nothing was changed"):
            dm.merge()
        assert state_hash(dm.model) == before and not dm.get_delta("d").merged
        layer = dm.model.get_submodule(target)
        assert isinstance(layer, DeltaLayer) and not layer.merged


# -- row 22 ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "phrase"), [(errno.ENOSPC, "out of space"),
                                               (errno.EROFS, "read-only")])
def test_row22_disk_full_or_read_only_keeps_the_old_save_and_says_how_much(tmp_path,
                                                                          monkeypatch, code,
                                                                          phrase):
    dm = dt.DeltaModel(toy())
    dm.add("d", lora())
    fill(dm, seed=1)
    dm.save_delta(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    fill(dm, seed=2)

    def hook(stage: str) -> None:
        if stage == "mid-write:delta.safetensors":
            raise OSError(code, "simulated")

    monkeypatch.setattr(io, "FAULT_HOOK", hook)
    size = sum(t.numel() * t.element_size() for t in dm.delta_state_dict().values())
    with pytest.raises(OSError, match=rf"\({phrase}\); it needs about [\d,]+ bytes .* the "
                       r"previous d is intact") as info:
        dm.save_delta(tmp_path / "d")
    assert info.value.errno == code
    needed = int(str(info.value).split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert needed >= size
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_row22_out_of_memory_in_training_is_a_clean_error_with_a_suggestion(tmp_path,
                                                                           monkeypatch):
    from deltatune.train import Trainer, list_checkpoints
    from deltatune.train.trainer import TrainingOutOfMemory
    from tests.reliability._train_setup import ROWS, setup

    dm, task, cfg = setup(tmp_path, epochs=1)
    trainer = Trainer(dm, task, ROWS, None, cfg)
    real = task.loss_sum

    def loss_sum(model, batch):  # the fault hook: OOM at optimizer step 2
        if trainer.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch)

    monkeypatch.setattr(task, "loss_sum", loss_sum)
    with pytest.raises(TrainingOutOfMemory, match=r"out of memory at optimizer step 2.*"
                       r"batch_size=1 with grad_accum=4 \(same effective batch\)"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
