"""RELIABILITY.md row 20 with real bitsandbytes layers (QLoRA on the CPU).

A LoRA on a bitsandbytes 4-bit NF4 (``Linear4bit``) or 8-bit (``Linear8bitLt``) layer:
the output is the quantized layer's own output plus the LoRA term, computed by hand;
gradients reach the adapter only and equal the hand formula's; merging is refused, with
or without ``allow_lossy_merge``, and changes nothing; a saved adapter loaded onto a
freshly quantized copy gives the same output, and adapters move between the float and
the quantized model (the fingerprint records a packed weight's logical shape: its storage
shape changes when bitsandbytes repacks it on the first CPU forward).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import MergeError
from tests.reliability._toy import state_hash

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")

SCALE = 8 / 4  # lora_alpha / r


def _quantized(linear: nn.Linear, bits: int) -> nn.Module:
    """``linear``'s weights in a bitsandbytes layer (quantized when moved to the device)."""
    if bits == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                  compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                         quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                                    has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                         has_fp16_weights=False)
    layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def _model(bits: int | None) -> nn.Sequential:
    """The same seeded model; its last layer quantized to ``bits`` (None: float)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
    head = nn.Linear(64, 32)
    model = nn.Sequential(*body, _quantized(head, bits) if bits else head)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _adapted(bits: int | None) -> dt.DeltaModel:
    dm = dt.DeltaModel(_model(bits))
    dm.add("d", dt.LoraConfig(r=4, lora_alpha=8, target_modules=["2"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dm.get_delta("d").parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return dm


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_bitsandbytes_layer_is_its_output_plus_the_hand_computed_term(bits):
    dm = _adapted(bits)
    layer = dm.model[2]
    assert type(layer.base).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    y = dm(x)
    hidden = dm.model[1](dm.model[0](x)).detach()
    delta = dm.get_delta("d").parts["2"]
    A = delta.lora_A.detach().clone().requires_grad_(True)
    B = delta.lora_B.detach().clone().requires_grad_(True)
    with torch.no_grad():
        quantized_out = layer.base(hidden)
    want = quantized_out + SCALE * (hidden @ A.t()) @ B.t()
    assert torch.allclose(y, want, atol=1e-6, rtol=1e-6)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * weights).sum().backward()
    (want * weights).sum().backward()
    assert torch.allclose(delta.lora_A.grad, A.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(delta.lora_B.grad, B.grad, atol=1e-6, rtol=1e-5)
    trained = {n for n, p in dm.named_parameters() if p.grad is not None}
    assert trained == {"model.2.deltas.d.lora_A", "model.2.deltas.d.lora_B"}


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_into_bitsandbytes_weights_is_refused_and_changes_nothing(bits):
    dm = _adapted(bits)
    before = state_hash(dm.model)
    kind = "torch.uint8, Linear4bit" if bits == 4 else "torch.int8, Linear8bitLt"
    for allow in (False, True):
        with pytest.raises(MergeError, match=rf"base weight is quantized \({kind}\) in a stored "
                           r"integer/packed format .*Nothing was changed"):
            dm.merge(allow_lossy_merge=allow)
        assert state_hash(dm.model) == before and not dm.get_delta("d").merged


@pytest.mark.parametrize("bits", [4, 8])
def test_adapter_saved_from_a_quantized_base_loads_onto_a_fresh_copy(tmp_path, bits):
    dm = _adapted(bits)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = dm(x)
    dm.save_delta(tmp_path / "d")
    back = dt.load(_model(bits), tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(back(x), want)


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_move_between_the_float_and_the_quantized_model(tmp_path, bits):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    for source, target in ((bits, None), (None, bits)):
        dm = _adapted(source)
        with torch.no_grad():
            dm(x)  # bitsandbytes repacks a 4-bit weight on its first CPU forward
        dm.save_delta(tmp_path / f"{source}")
        back = dt.load(_model(target), tmp_path / f"{source}")  # strict check passes
        delta, loaded = dm.get_delta("d").parts["2"], back.get_delta("d").parts["2"]
        assert torch.equal(delta.lora_A, loaded.lora_A)
        assert torch.equal(delta.lora_B, loaded.lora_B)
    # a model of another shape is still refused
    other = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), _quantized(nn.Linear(64, 24), bits))
    with pytest.raises(dt.BaseModelMismatchError, match=r"weight shape \[24, 64\]"):
        dt.load(other, tmp_path / f"{bits}")
