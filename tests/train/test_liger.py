"""Liger-Kernel's patches (integrations/liger.py): applied to one model, undone completely.

Liger's Triton kernels do not run on the CPU (nor in Triton's interpreter), so these tests
check what is patched and that the undo gives back the exact objects; the GPU run is in
docs/performance.md (bench/gpu_lora.py, "deltatune fast + Liger").
"""

from __future__ import annotations

import sys

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.core.layers import DeltaLayer
from tests.conftest import tiny_gpt2, tiny_llama

pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is in the dev extra")

from deltatune.integrations.liger import apply_liger, liger_kernels


def _state(model):
    from transformers.models.llama import modeling_llama

    return (dict(vars(modeling_llama)), {m: dict(vars(m)) for m in model.modules()})


def _same(before, after):
    (g0, m0), (g1, m1) = before, after
    assert g0.keys() == g1.keys() and all(g0[k] is g1[k] for k in g0)
    for module, d0 in m0.items():
        d1 = m1[module]
        assert d0.keys() == d1.keys() and all(d0[k] is d1[k] for k in d0), type(module)


def test_patches_norms_mlps_and_rope_then_undoes_everything():
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers.models.llama import modeling_llama

    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, target_modules="all-linear"))
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dm(input_ids=ids).logits
    before = _state(dm.model)
    rope = modeling_llama.apply_rotary_pos_emb
    with liger_kernels(dm, require_cuda=False):  # patched, not run
        layer = dm.model.model.layers[0]
        assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
        assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
        assert dm.model.model.norm.forward.__func__ is LigerRMSNorm.forward
        assert modeling_llama.apply_rotary_pos_emb is not rope
        # the LoRA'd projections stay ours: Liger's MLP calls them as modules
        assert isinstance(layer.mlp.gate_proj, DeltaLayer)
        assert dm.model.lm_head.forward.__func__ is not LigerRMSNorm.forward
    _same(before, _state(dm.model))
    assert modeling_llama.apply_rotary_pos_emb is rope
    with torch.no_grad():
        assert torch.equal(dm(input_ids=ids).logits, ref)
    # a model built afterwards is plain transformers again
    fresh = tiny_llama()
    assert type(fresh.model.norm) is modeling_llama.LlamaRMSNorm
    assert "forward" not in vars(fresh.model.norm)


def test_a_module_carrying_a_delta_is_refused_and_nothing_stays_changed():
    m = tiny_llama()
    m.model.norm = DeltaLayer(m.model.norm)  # as a method that tunes the final norm would
    before = _state(m)
    with pytest.raises(ConfigError, match="carry a delta"):
        apply_liger(m, require_cuda=False)
    _same(before, _state(m))


def test_missing_package_and_unsupported_architecture_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="has no kernels for model type 'gpt2'"):
        apply_liger(tiny_gpt2())
    # on the CPU Liger's kernels would fail in the first forward: refused before patching
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ConfigError, match="run on CUDA GPUs, and this model is on cpu"):
        apply_liger(model)
    _same(before, _state(model))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with pytest.raises(ConfigError, match="pip install liger-kernel"):
        apply_liger(tiny_llama())


def test_trainer_applies_liger_for_the_run_only(monkeypatch, tmp_path):
    from deltatune.integrations import liger
    from deltatune.tasks import CausalLMSFT
    from deltatune.train import TrainConfig, Trainer
    from tests.tiny_tokenizer import char_tokenizer

    events = []

    def fake_apply(model):
        events.append(("apply", type(model).__name__))
        return lambda: events.append(("undo",))

    monkeypatch.setattr(liger, "apply_liger", fake_apply)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    task = CausalLMSFT(char_tokenizer(), chat_template=False, max_length=16,
                       generate_examples=0)
    rows = [{"prompt": f"p{i}", "response": "ab"} for i in range(4)]
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2,
                         liger_kernel=True, progress=False, handle_signals=False)
    trainer = Trainer(dm, task, task.encode_rows(rows), config=config)
    trainer.fit()
    assert events == [("apply", "DeltaModel"), ("undo",)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_gradients_with_liger_match_without():
    dm = dt.attach(tiny_llama(hidden_size=64, intermediate_size=128).cuda(),
                   dt.LoraConfig(r=4, target_modules="all-linear"))
    from tests.conftest import randomize_deltas

    randomize_deltas(dm, std=0.1)
    dm.set_trainable("default")
    ids = torch.randint(3, 100, (2, 33), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    params = dm.trainable_parameters()

    def run():
        loss = dm(input_ids=ids, labels=ids).loss
        return loss.item(), torch.autograd.grad(loss, params)

    ref, ref_grads = run()
    with liger_kernels(dm):
        got, grads = run()
    assert abs(got - ref) < 1e-4 * abs(ref)
    for a, b in zip(grads, ref_grads):
        assert ((a - b).norm() / b.norm()).item() < 1e-3


def test_liger_loss_patches_the_models_forward_and_is_undone_too():
    m = tiny_llama()
    before = _state(m)
    with liger_kernels(m, liger_loss=True, require_cuda=False):
        assert "forward" in vars(m)  # Liger's fused linear + CE forward, on the instance
    _same(before, _state(m))
    assert "forward" not in vars(m)
