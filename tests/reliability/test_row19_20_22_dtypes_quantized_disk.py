"""RELIABILITY.md rows 19, 20 and 22 (library side).

Row 19 (dtype matrix): base float32/float16/bfloat16 x delta dtype auto/same/float32:
forward and backward run, the saved dtype is recorded, loading with another dtype
reports the cast, and a zero-init LoRA on a bf16 base gives the base output bit for bit.
Row 20 (quantized merge): merging into 4- and 8-bit fake-quantized weights (torch.ao QAT
layers) is refused by default, naming the output deviation it would cause (checked by
hand in float64), base untouched; ``allow_lossy_merge=True`` merges, reports the
per-layer deviation (warning, ``info["lossy_merge"]``, the merged model card) and still
unmerges bit for bit. Integer/packed weights are refused even then.
Row 22 (disk): a full disk (ENOSPC) or read-only file system (EROFS) during a save fails
atomically, keeps the previous directory intact, and says how much space is needed. The
trainer's out-of-memory report is tested with a fault hook as well.
"""

from __future__ import annotations

import errno
import json
import re

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import io
from deltatune.core.errors import MergeError
from deltatune.core.layers import DeltaLayer
from deltatune.kernels import fast_path
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
def qat_linear(linear: nn.Linear, bits: int, observe: bool = False) -> nn.Linear:
    """A torch.ao QAT copy of ``linear`` whose weight is fake-quantized to ``bits`` bits
    (symmetric, per output channel), calibrated on its weight; ``observe`` keeps the
    observer running (as during QAT), else it is frozen (as after)."""
    from torch.ao.nn.qat import Linear as QATLinear
    from torch.ao.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver, QConfig

    fq = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                quant_min=-(2 ** (bits - 1)), quant_max=2 ** (bits - 1) - 1,
                                dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    layer = QATLinear(linear.in_features, linear.out_features,
                      qconfig=QConfig(activation=nn.Identity, weight=fq))
    layer.load_state_dict(linear.state_dict(), strict=False)
    with torch.no_grad():
        layer(torch.zeros(1, linear.in_features))  # the observer sees the weight once
    if not observe:
        layer.weight_fake_quant.disable_observer()
    return layer.eval()


def _by_hand(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Fake-quantize float32 ``w`` with the layer's per-channel scales: round(w * (1 /
    scale)) + zero point, clamp, rescale; returned in float64. (In float32 and through the
    inverse scale as torch does it: w / scale rounds some ties the other way.)"""
    fq = layer.weight_fake_quant
    scale, zp = fq.scale.float()[:, None], fq.zero_point.float()[:, None]
    q = torch.clamp(torch.round(w.float() * (1.0 / scale)) + zp, fq.quant_min, fq.quant_max)
    return ((q - zp) * scale).double()


def _qat_toy(bits: int, observe: bool = False) -> dt.DeltaModel:
    model = toy()
    model.proj = qat_linear(model.proj, bits, observe)
    dm = dt.DeltaModel(model)
    dm.add("d", lora(targets=["proj", "out"]))
    fill(dm, std=0.3)
    return dm


def _deviation_by_hand(dm: dt.DeltaModel) -> dict[str, float]:
    """The merge's output deviation on ``proj``, in float64: probe rows x ~ N(0, 1) from
    seed 0; unmerged x q(W)^T + b + s x A^T B^T, merged x q(W')^T + b, with q the layer's
    own per-channel fake quantization and W' = W + s B A the float32 weight the layer
    would hold (rounded like the merge does, so no rounding of W'/scale flips)."""
    layer = dm.model.proj
    lora_ = layer.deltas["d"]
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).double()
    w, b = layer.base.weight.detach(), layer.base.bias.detach().double()
    a, bb = lora_.lora_A.detach(), lora_.lora_B.detach()
    s = 4.0 / 2  # lora_alpha / r
    assert lora_.scale == s
    unmerged = x @ _by_hand(layer.base, w).T + b + s * x @ a.double().T @ bb.double().T
    merged = x @ _by_hand(layer.base, w + (bb @ a) * s).T + b
    dev = (merged - unmerged).abs()
    return {"max_abs": dev.max().item(), "mean_abs": dev.mean().item(),
            "max_rel": dev.max().item() / unmerged.abs().max().item()}


@pytest.mark.parametrize("bits", [4, 8])
def test_row20_merge_into_fake_quantized_weights_is_refused_with_the_measured_error(bits):
    dm = _qat_toy(bits, observe=True)  # the probe must not move the live observer either
    before = state_hash(dm.model)
    with pytest.raises(MergeError) as err:
        dm.merge()
    msg = str(err.value)
    found = re.search(r"changes this layer's output by up to (\S+) \((\S+)% of its largest "
                      r"output; mean (\S+)\) on a probe batch", msg)
    assert found, msg
    want = _deviation_by_hand(dm)
    # The fused LoRA kernel must not skip the layer's fake quantization.
    with fast_path("on"), pytest.raises(MergeError) as fused:
        dm.merge()
    assert str(fused.value) == msg
    # Printed with 3 significant digits (2 decimals for the percentage).
    assert float(found[1]) == pytest.approx(want["max_abs"], rel=5e-3)
    assert float(found[2]) / 100 == pytest.approx(want["max_rel"], rel=5e-3, abs=5e-5)
    assert float(found[3]) == pytest.approx(want["mean_abs"], rel=5e-3)
    assert want["max_abs"] > 1e-3  # quantizing the delta is not free at 4 or 8 bits
    assert "fake-quantized by FakeQuantize in Linear" in msg
    assert "allow_lossy_merge=True" in msg and "Nothing was changed" in msg
    assert state_hash(dm.model) == before and not dm.get_delta("d").merged
    assert not dm.model.proj.merged and not dm.model.out.merged  # all layers or none


@pytest.mark.parametrize("bits", [4, 8])
def test_row20_allow_lossy_merge_merges_reports_and_unmerges_bit_for_bit(bits):
    dm = _qat_toy(bits)
    before = state_hash(dm.model)
    ids = toy_ids()
    with torch.no_grad():
        unmerged = dm(ids)
    with pytest.warns(UserWarning, match=r"lossy merge of delta 'd' into quantized weights: "
                      r"output deviation on a probe batch up to .* at proj"):
        dm.merge(allow_lossy_merge=True)
    report = dm.get_delta("d").info["lossy_merge"]
    assert list(report) == ["proj"]  # `out` is a float layer: an exact merge, no report
    assert dm.lossy_merges == {"d": report}
    want = _deviation_by_hand(_qat_toy(bits))  # float32 in the layer, float64 here
    assert report["proj"] == pytest.approx(want, rel=1e-4)
    # The merged model computes x q(W + s B A)^T + b in proj: close to, not equal to, unmerged.
    with torch.no_grad():
        merged = dm(ids)
    gap = (merged - unmerged).abs().max().item()
    assert 0 < gap < 0.5 * unmerged.abs().max().item()
    dm.unmerge()
    assert state_hash(dm.model) == before and "lossy_merge" not in dm.get_delta("d").info
    assert dm.lossy_merges == {}
    with torch.no_grad():
        assert torch.equal(dm(ids), unmerged)


def test_row20_lossy_merge_is_written_into_the_merged_model_card(tmp_path):
    from deltatune.interop.export import export_merged
    from tests.conftest import tiny_llama

    model = tiny_llama()
    layer = model.model.layers[0].self_attn
    layer.q_proj = qat_linear(layer.q_proj, 4)
    dm = dt.DeltaModel(model)
    dm.add("d", dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    fill(dm, std=0.3)
    with pytest.raises(MergeError, match=r"base weight is quantized.*Nothing was changed"):
        export_merged(dm, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning, match="lossy merge"):
        export_merged(dm, tmp_path / "merged", allow_lossy_merge=True)
    dev = dm.lossy_merges["d"]["model.layers.0.self_attn.q_proj"]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "## Lossy merge" in card
    assert (f"| d | `model.layers.0.self_attn.q_proj` | {dev['max_abs']:.4g} | "
            f"{dev['mean_abs']:.4g} | {dev['max_rel']:.4%} |") in card


def test_row20_integer_or_packed_weights_are_refused_even_when_lossy_is_allowed():
    model = toy()
    int8 = nn.Linear(8, 5)
    int8.weight = nn.Parameter(torch.randint(-8, 8, (5, 8), dtype=torch.int8),
                               requires_grad=False)
    model.out = int8
    dm = dt.DeltaModel(model)
    dm.add("d", lora(targets=["out"]))
    fill(dm)
    before = state_hash(dm.model)
    for allow in (False, True):
        with pytest.raises(MergeError, match=r"base weight is quantized \(torch.int8, Linear\) "
                           r"in a stored integer/packed format .* even with "
                           r"allow_lossy_merge=True.*Nothing was changed"):
            dm.merge(allow_lossy_merge=allow)
        assert state_hash(dm.model) == before and not dm.get_delta("d").merged
        layer = dm.model.get_submodule("out")
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
