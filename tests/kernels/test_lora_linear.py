"""The fused LoRA linear Function against the plain composition (float64 and float32)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.kernels import fast_path, fast_path_enabled
from deltatune.kernels.lora_linear import LoraLinearFunction, lora_linear, lora_linear_reference
from tests.conftest import model_inputs, randomize_deltas, tiny_gpt2, tiny_llama


def _inputs(dtype, seed=0, n=(3, 5), d_in=12, d_out=10, r=3, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    return (rnd(*n, d_in), rnd(d_out, d_in), rnd(d_out) if bias else None, rnd(r, d_in),
            rnd(d_out, r))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    x, w, b, A, B = _inputs(torch.float64, bias=bias)
    assert torch.autograd.gradcheck(
        lambda *t: LoraLinearFunction.apply(*t, 0.7), (x, w, b, A, B))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_in_float32(seed):
    x, w, b, A, B = _inputs(torch.float32, seed=seed)
    fast = lora_linear(x, w, b, A, B, 1.5)
    gy = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (x, w, b, A, B), gy)
    ref = lora_linear_reference(x, w, b, A, B, 1.5)
    grads_ref = torch.autograd.grad(ref, (x, w, b, A, B), gy)
    assert _rel(fast, ref) < 1e-5
    for gf, gr in zip(grads_fast, grads_ref):
        assert _rel(gf, gr) < 1e-5


def test_fp32_master_adapters_on_bf16_input_return_fp32_grads():
    x, w, b, _, _ = _inputs(torch.bfloat16)
    _, _, _, A, B = _inputs(torch.float32, seed=4)
    out = lora_linear(x, w, b, A, B, 2.0)
    assert out.dtype == torch.bfloat16
    gy = torch.randn_like(out)
    gA, gB = torch.autograd.grad(out, (A, B), gy)
    assert gA.dtype == gB.dtype == torch.float32
    # Reference in float64 on the same (bf16-rounded) operands.
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    A64, B64 = (t.detach().bfloat16().double().requires_grad_() for t in (A, B))
    ref = lora_linear_reference(x64, w64, b64, A64, B64, 2.0)
    rA, rB = torch.autograd.grad(ref, (A64, B64), gy.double())
    assert _rel(out, ref) < 1e-2
    assert _rel(gA, rA) < 1e-2 and _rel(gB, rB) < 1e-2


def test_auto_mode_keeps_the_plain_path_on_cpu():
    assert not fast_path_enabled(torch.zeros(1))
    with fast_path("on"):
        assert fast_path_enabled(torch.zeros(1))
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    layer = dm.model.model.layers[0].self_attn.q_proj
    assert layer.deltas["default"].fast_forward(layer.base, torch.zeros(2, 32)) is None


def _loss_and_grads(dm, inputs):
    out = dm(**inputs, labels=inputs["input_ids"])
    params = dm.trainable_parameters()
    return out.logits.detach(), torch.autograd.grad(out.loss, params)


def _gpt2_no_dropout():
    return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.mark.parametrize("factory", [tiny_llama, _gpt2_no_dropout], ids=["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_fast_path_equals_plain_path(factory, checkpointing):
    dm = dt.attach(factory(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_deltas(dm, std=0.2)
    dm.set_trainable("default")
    if checkpointing:
        dm.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    dm.train()
    inputs = model_inputs("llama", batch=2, length=9)
    with fast_path("off"):
        ref_logits, ref_grads = _loss_and_grads(dm, inputs)
    with fast_path("on"):
        fast_logits, fast_grads = _loss_and_grads(dm, inputs)
    assert _rel(fast_logits, ref_logits) < 1e-5
    assert len(fast_grads) == len(ref_grads) > 0
    for gf, gr in zip(fast_grads, ref_grads):
        assert _rel(gf, gr) < 1e-5


def test_dropout_in_training_falls_back_to_the_plain_path():
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    layer = dm.model.model.layers[0].self_attn.q_proj
    delta = layer.deltas["default"]
    dm.train()
    with fast_path("on"):
        assert delta.fast_forward(layer.base, torch.randn(2, 32)) is None
        dm.eval()
        assert delta.fast_forward(layer.base, torch.randn(2, 32)) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_float64_reference():
    x, w, b, A, B = (t.detach().cuda().requires_grad_() if t is not None else None
                     for t in _inputs(torch.bfloat16, n=(64, 33), d_in=256, d_out=384, r=16))
    out = lora_linear(x, w, b, A, B, 2.0)
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, A, B), gy)
    ref_in = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
    ref = lora_linear_reference(*ref_in, 2.0)
    ref_grads = torch.autograd.grad(ref, (ref_in[0], ref_in[3], ref_in[4]), gy.double())
    assert _rel(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 1e-2


def test_autocast_keeps_the_plain_path():
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = dm.model.model.layers[0].self_attn.q_proj
    with fast_path("on"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.deltas["default"].fast_forward(layer.base, torch.randn(2, 32)) is None


def test_prefill_linears_reading_one_input_share_one_shrink_gemm(monkeypatch):
    # Many rows without autograd: after one pass, q/k/v (and gate/up) take their shrinks
    # from one GEMM through their A's side by side; logits stay the plain path's, also
    # after an in-place adapter change (the side-by-side copy is rebuilt).
    from deltatune.kernels import shared_input_shrink
    from deltatune.kernels.shared_input_shrink import SharedInputShrinks

    shared = SharedInputShrinks()
    monkeypatch.setattr(shared_input_shrink, "SHARED_INPUTS", shared)
    from deltatune.kernels import lora_linear as ll
    monkeypatch.setattr(ll, "SHARED_INPUTS", shared)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_deltas(dm, std=0.2)
    dm.eval()
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    gemms = {"n": 0}  # shared shrink GEMMs
    joined = shared_input_shrink._Group.joined

    def counted(self, dtype):
        gemms["n"] += 1
        return joined(self, dtype)

    monkeypatch.setattr(shared_input_shrink._Group, "joined", counted)

    def both():
        with torch.no_grad():
            with fast_path("off"):
                ref = dm(input_ids=ids).logits
            with fast_path("on"):
                return dm(input_ids=ids).logits, ref

    layers = len(dm.model.model.layers)
    got, ref = both()
    assert _rel(got, ref) < 1e-5
    assert len(shared._leaders) == 2 * layers  # q/k/v and gate/up, in every layer
    got, ref = both()
    assert _rel(got, ref) < 1e-5 and not shared._pending  # every member took its slice
    assert gemms["n"] == 2 * layers
    state = {k: v * 1.5 + 0.02 for k, v in dm.delta_state_dict().items()}
    dm.load_delta_state_dict(state)  # in place
    got, ref = both()
    assert _rel(got, ref) < 1e-5
    # inference tensors have no version counter: matched by identity alone
    with torch.inference_mode(), fast_path("on"):
        for _ in range(2):
            assert _rel(dm(input_ids=ids).logits, ref) < 1e-5


@pytest.mark.parametrize("rows,d_in,d_out,rank,taken", [
    (16384, 2048, 8192, 16, True),     # 1B up/gate: 0.85-0.87x cuBLAS + expand
    (16384, 4096, 14336, 16, True),    # 8B up/gate: 0.88-0.95x
    (4096, 4096, 14336, 8, True),      # 0.93x at 4096 rows
    (16384, 2048, 2048, 16, False),    # square: 0.97-1.14x, a wash
    (16384, 8192, 2048, 16, False),    # narrowing (down): 1.02-1.04x
    (16384, 2048, 512, 16, False),     # k/v: 1.25-1.32x
    (2048, 2048, 8192, 16, False),     # too few rows (not measured)
    (16384, 2048, 8192, 32, False),    # wider-rank tiles: 1.21x (seventh session)
])
def test_tma_gemm_is_taken_by_default_only_where_it_measured_faster(rows, d_in, d_out, rank,
                                                                    taken):
    from deltatune.kernels import tma_lora

    assert tma_lora.pays(rows, d_in, d_out, rank) is taken


def test_unknown_kernel_switch_values_warn_and_keep_the_default(monkeypatch):
    from deltatune.kernels import tma_lora, triton_lora

    monkeypatch.setenv("DELTATUNE_TMA_LORA", "yes please")
    with pytest.warns(UserWarning, match="DELTATUNE_TMA_LORA='yes please' is not one of"):
        assert tma_lora._mode() == "auto"
    monkeypatch.setenv("DELTATUNE_TRITON_PROMPT_ROWS", "many")
    with pytest.warns(UserWarning, match="DELTATUNE_TRITON_PROMPT_ROWS='many'"):
        assert triton_lora.prompt_rows() == 0
    monkeypatch.setenv("DELTATUNE_TMA_LORA", "OFF")
    assert tma_lora._mode() == "off"
    from deltatune.kernels import shared_shrink

    monkeypatch.setenv("DELTATUNE_STACK_SIBLINGS", "yes")
    with pytest.warns(UserWarning, match="DELTATUNE_STACK_SIBLINGS='yes' is not 0 or 1"):
        assert shared_shrink.stack_siblings() is False
    monkeypatch.setenv("DELTATUNE_STACK_SIBLINGS", " 1 ")
    assert shared_shrink.stack_siblings() is True
