"""DeltaModel bookkeeping: names, activation, module copies, reports, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import ConfigError, DeltaStateError, MergeError, NonFiniteError
from tests.conftest import model_inputs, randomize_deltas, tiny_bert, tiny_llama


def test_plain_module_works():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 6)
    expected = net(x)
    dm = dt.attach(net, dt.LoraConfig(r=2, target_modules="all-linear"))
    assert torch.equal(dm(x), expected)
    randomize_deltas(dm)
    assert not torch.allclose(dm(x), expected)


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "x" * 65, "with space", ".hidden"])
def test_unsafe_delta_names_are_refused(name):
    with pytest.raises(ConfigError, match="delta name"):
        dt.DeltaModel(tiny_llama()).add(name, dt.LoraConfig())


def test_duplicate_and_unknown_names():
    dm = dt.attach(tiny_llama(), dt.LoraConfig())
    with pytest.raises(DeltaStateError, match="already exists"):
        dm.add("default", dt.LoraConfig())
    with pytest.raises(DeltaStateError, match="no delta named 'x'; attached deltas: default"):
        dm.activate("x")


def test_modules_to_save_trains_a_copy_and_saves_it(tmp_path):
    model = tiny_bert()
    inputs = model_inputs("bert")
    expected = model(**inputs).logits
    dm = dt.attach(model, dt.LoraConfig(r=2, modules_to_save=["classifier"]))
    trainable = sorted(n for n, p in dm.named_parameters() if p.requires_grad)
    assert "model.classifier.copies.default.weight" in trainable
    assert torch.equal(dm(**inputs).logits, expected)
    with torch.no_grad():
        dm.model.classifier.copies["default"].weight.add_(1.0)
    changed = dm(**inputs).logits
    assert not torch.allclose(changed, expected)
    with dm.disabled():
        assert torch.equal(dm(**inputs).logits, expected)
    assert "classifier.weight" in dm.delta_state_dict()
    dm.save_delta(tmp_path / "d")
    again = dt.load(tiny_bert(), tmp_path / "d")
    assert torch.equal(again(**inputs).logits, changed)
    plain = dm.merge_and_unload()
    assert torch.allclose(plain(**inputs).logits, changed, atol=1e-6)


def test_report_counts_and_percent():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("a", dt.LoraConfig(r=2))
    dm.add("b", dt.LoraConfig(r=4), activate=False)
    rows = {r.name: r for r in dm.parameter_report()}
    assert rows["b"].parameters == 2 * rows["a"].parameters
    assert rows["a"].active and not rows["b"].active
    text = dm.describe_parameters()
    assert "a (lora)" in text and "[inactive]" in text
    assert sum(p.numel() for p in dm.trainable_parameters()) == rows["a"].parameters


def test_merge_refuses_nonfinite_and_leaves_base_untouched():
    dm = dt.attach(tiny_llama(), dt.LoraConfig(target_modules="all-linear"))
    randomize_deltas(dm)
    with torch.no_grad():
        dm.model.model.layers[1].mlp.down_proj.deltas["default"].lora_B[0, 0] = float("nan")
    before = {k: v.clone() for k, v in dm.model.state_dict().items() if "lora_" not in k}
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        dm.merge()
    assert all(torch.equal(v, before[k]) for k, v in dm.model.state_dict().items()
               if "lora_" not in k)
    assert not dm.get_delta("default").merged


def test_merge_twice_warns_and_does_nothing():
    dm = dt.attach(tiny_llama(), dt.LoraConfig())
    randomize_deltas(dm)
    dm.merge()
    w = dm.model.model.layers[0].self_attn.q_proj.base.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        dm.merge()
    assert torch.equal(dm.model.model.layers[0].self_attn.q_proj.base.weight, w)


def test_save_refuses_nonfinite(tmp_path):
    dm = dt.attach(tiny_llama(), dt.LoraConfig())
    with torch.no_grad():
        dm.get_delta("default").parameters()[0][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save"):
        dm.save_delta(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_modules_to_save_blocks_plain_merge():
    dm = dt.attach(tiny_bert(), dt.LoraConfig(modules_to_save=["classifier"]))
    with pytest.raises(MergeError, match="merge_and_unload"):
        dm.merge()


def test_extra_loss_is_added_in_training_mode():
    from deltatune.methods.lora import Lora

    class Penalised(Lora):
        def extra_loss(self, model, delta):
            return torch.tensor(5.0)

    dm = dt.attach(tiny_llama(), dt.LoraConfig())
    dm.get_delta("default").method = Penalised()
    ids = model_inputs("llama")["input_ids"]
    dm.eval()
    plain = dm(input_ids=ids, labels=ids).loss
    dm.train()
    assert dm(input_ids=ids, labels=ids).loss.item() == pytest.approx(plain.item() + 5.0)


def test_describe_parameters_is_one_coherent_line():
    # Counted by hand: tiny Llama has 26,784 parameters; LoRA r on q_proj (32 -> 32) and
    # v_proj (32 -> 16, 2 kv heads of 8) of 2 layers has 2 * r * ((32 + 32) + (32 + 16)).
    base = sum(p.numel() for p in tiny_llama().parameters())
    assert base == 26_784
    lora_a, lora_b = 2 * 2 * (64 + 48), 2 * 4 * (64 + 48)
    dm = dt.DeltaModel(tiny_llama())
    dm.add("default", dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    text = dm.describe_parameters()
    assert text == "trainable: 448 of 27,232 (1.6451%); delta: default (lora) 448"
    assert (lora_a, base + lora_a) == (448, 27_232) and f"{100 * 448 / 27_232:.4f}" == "1.6451"
    assert "\n" not in text
    # Several deltas: every parameter the model holds counts, inactive ones too (as PEFT's
    # "all params"); the share is of that one total, and each delta is listed.
    dm.add("b", dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), activate=False)
    total = base + lora_a + lora_b
    assert dm.describe_parameters() == (
        f"trainable: 448 of {total:,} ({100 * 448 / total:.4f}%); "
        f"deltas: default (lora) 448, b (lora) {lora_b:,} [inactive]")
    assert total == 28_128
    dm.set_trainable("default", False)
    assert dm.describe_parameters() == (
        "trainable: 0 of 28,128 (0.0000%); deltas: default (lora) 448 [frozen], "
        "b (lora) 896 [inactive]")
