"""Combination: exact weighted sums (cat), SVD truncation, save as LoRA, merge, errors."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError, DeltaStateError, HyperparameterError
from tests.conftest import model_inputs, randomize_deltas, tiny_llama
from tests.helpers import logits, save_and_reload


def dense(layer, name):
    """The delta of ``name`` on ``layer`` as a dense d_out x d_in matrix (float64)."""
    d = layer.deltas[name]
    if hasattr(d, "lora_P"):
        return d.scale * (d.lora_P.double() * d.lora_Lambda.double()) @ d.lora_Q.double()
    if hasattr(d, "lora_A"):
        return d.scale * d.lora_B.double() @ d.lora_A.double()
    return d.delta_weight().double()


def two_loras():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("a", dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    dm.add("b", dt.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "down_proj"]))
    randomize_deltas(dm, std=0.3)
    return dm


def test_cat_is_the_exact_weighted_sum_with_different_ranks():
    dm = two_loras()
    dm.add("mix", dt.CombinationConfig(weights={"a": 0.7, "b": -0.4}))
    attn = dm.model.model.layers[0].self_attn
    q = attn.q_proj
    expected = 0.7 * dense(q, "a") - 0.4 * dense(q, "b")
    assert q.deltas["mix"].lora_A.shape[0] == 6  # 2 + 4
    assert torch.allclose(dense(q, "mix"), expected, atol=1e-6)
    # A layer only one source adapts gets that source's weighted delta.
    assert torch.allclose(dense(attn.v_proj, "mix"), 0.7 * dense(attn.v_proj, "a"), atol=1e-6)
    down = dm.model.model.layers[0].mlp.down_proj
    assert torch.allclose(dense(down, "mix"), -0.4 * dense(down, "b"), atol=1e-6)


def test_combined_output_equals_weighted_delta_outputs():
    dm = two_loras()
    inputs = model_inputs("llama")
    dm.add("mix", dt.CombinationConfig(weights={"a": 1.0, "b": 1.0}))
    mixed = logits(dm, inputs)
    dm.activate("a", "b")   # both active at once: W0 + dW_a + dW_b
    assert torch.allclose(mixed, logits(dm, inputs), atol=1e-5)


def test_svd_truncation_is_exact_at_full_rank_and_best_below():
    dm = two_loras()
    dm.add("exact", dt.CombinationConfig(weights={"a": 0.5, "b": 0.5}, combination="svd",
                                         svd_rank=6), activate=False)
    dm.add("low", dt.CombinationConfig(weights={"a": 0.5, "b": 0.5}, combination="svd",
                                       svd_rank=2), activate=False)
    q = dm.model.model.layers[1].self_attn.q_proj
    target = 0.5 * dense(q, "a") + 0.5 * dense(q, "b")
    assert torch.allclose(dense(q, "exact"), target, atol=1e-5)
    S = torch.linalg.svdvals(target)
    err = torch.linalg.matrix_norm(dense(q, "low") - target)
    assert err.item() == pytest.approx(S[2:].norm().item(), rel=1e-4)  # Eckart-Young
    # Default svd rank: the largest source rank (4).
    dm.add("default_rank", dt.CombinationConfig(weights={"a": 1.0, "b": 1.0},
                                                combination="svd"), activate=False)
    assert q.deltas["default_rank"].lora_A.shape[0] == 4


def test_adalora_and_loha_sources():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("ada", dt.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6.0,
                                   target_modules=["q_proj"]))
    dm.add("hada", dt.LoHaConfig(r=2, target_modules=["q_proj"]))
    randomize_deltas(dm, std=0.3)
    q = dm.model.model.layers[0].self_attn.q_proj
    dm.add("cat", dt.CombinationConfig(weights={"ada": 2.0}), activate=False)
    assert torch.allclose(dense(q, "cat"), 2.0 * dense(q, "ada"), atol=1e-5)
    with pytest.raises(HyperparameterError, match="svd"):
        dm.add("bad", dt.CombinationConfig(weights={"ada": 1.0, "hada": 1.0}))
    dm.add("svd", dt.CombinationConfig(weights={"ada": 1.0, "hada": 1.0}, combination="svd",
                                       svd_rank=32), activate=False)
    assert torch.allclose(dense(q, "svd"), dense(q, "ada") + dense(q, "hada"), atol=1e-4)


def test_saved_as_lora_and_independent_of_sources(tmp_path):
    dm = two_loras()
    dm.add("mix", dt.CombinationConfig(weights={"a": 0.3, "b": 0.6}))
    inputs = model_inputs("llama")
    expected = logits(dm, inputs)
    dm.delete("a")
    dm.delete("b")
    assert torch.equal(logits(dm, inputs), expected)
    loaded = save_and_reload(dm, tmp_path / "mix", tiny_llama)
    assert loaded.get_delta("mix").config.method == "lora"
    assert torch.allclose(logits(loaded, inputs), expected, atol=1e-6)


def test_merge_and_per_row():
    dm = two_loras()
    dm.add("mix", dt.CombinationConfig(weights={"a": 0.5, "b": 0.5}))
    inputs = model_inputs("llama", batch=2)
    unmerged = logits(dm, inputs)
    rows = logits(dm, {**inputs, "delta_names": ["mix", None]})
    assert torch.allclose(rows[:1], unmerged[:1], atol=1e-6)
    dm.merge("mix")
    assert (logits(dm, inputs) - unmerged).norm() / unmerged.norm() < 1e-5


def test_bad_inputs():
    with pytest.raises(ConfigError, match="weights"):
        dt.CombinationConfig()
    with pytest.raises(ConfigError, match="combination"):
        dt.CombinationConfig(weights={"a": 1.0}, combination="mean")
    dm = two_loras()
    with pytest.raises(DeltaStateError, match="'nope'"):
        dm.add("mix", dt.CombinationConfig(weights={"a": 1.0, "nope": 1.0}))
    assert "mix" not in dm.delta_names
    big = dt.DeltaModel(tiny_llama())
    big.add("x", dt.LoraConfig(r=20, target_modules=["q_proj"]))
    big.add("y", dt.LoraConfig(r=20, target_modules=["q_proj"]))
    with pytest.raises(HyperparameterError, match="svd_rank"):
        big.add("mix", dt.CombinationConfig(weights={"x": 1.0, "y": 1.0}))
