"""RELIABILITY.md row 17 (bad input: target selection).

Every pattern must match at least one module: a list with one typo among correct names
is a ``TargetError`` with difflib suggestions (PEFT silently adapts the others); a
regex matching nothing, a pattern matching a module type the method cannot wrap, and
layer indices out of range are errors too, and the model is left as it was. Before
training, ``target_table`` prints the matched modules, their parameter counts and the
trainable share.
"""

from __future__ import annotations

import pytest

import deltatune as dt
from deltatune.core.errors import TargetError
from deltatune.core.layers import DeltaLayer
from deltatune.core.summary import target_table
from tests.conftest import tiny_gpt2, tiny_llama
from tests.reliability._toy import lora, state_hash, toy


def _refused(model, config, phrase: str) -> None:
    before = state_hash(model)
    dm = dt.DeltaModel(model)
    with pytest.raises(TargetError, match=phrase):
        dm.add("d", config)
    assert state_hash(model) == before and dm.delta_names == []
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


@pytest.mark.parametrize(("targets", "typo", "suggestion"), [
    (["q_proj", "k_proj", "v_prj", "o_proj"], "v_prj", "v_proj"),
    (["q_proj", "gate_projj"], "gate_projj", "gate_proj"),
    (["self_attn.q_proj", "mlp.down_prj"], "mlp.down_prj", "down_proj"),
])
def test_one_typo_in_a_list_is_an_error_with_suggestions(targets, typo, suggestion):
    _refused(tiny_llama(), dt.LoraConfig(r=2, target_modules=targets),
             rf"target '{typo}' matched no module\. Did you mean .*'{suggestion}'")


def test_a_regex_matching_nothing_is_an_error():
    _refused(tiny_llama(), dt.LoraConfig(r=2, target_modules=r".*\.attention\.query"),
             r"matched no module")
    _refused(tiny_llama(), dt.LoraConfig(r=2, target_modules=["re:.*qproj"]),
             r"'re:\.\*qproj' matched no module")


def test_an_invalid_regex_is_an_error():
    _refused(tiny_llama(), dt.LoraConfig(r=2, target_modules="(unclosed"), "regex .* invalid")


def test_a_module_of_an_unsupported_type_is_named_with_what_is_wrappable():
    _refused(tiny_llama(), dt.LoraConfig(r=2, target_modules=["self_attn"]),
             r"matched model\.layers\.0\.self_attn \(LlamaAttention\), which lora cannot wrap"
             r".*Its wrappable sub-modules: .*q_proj")


def test_layers_out_of_range_are_an_error():
    _refused(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], layers=[1, 5]),
             r"layers \[5\] are out of range: this model has 2 layers")


def test_all_linear_skips_heads_and_matches_something():
    dm = dt.attach(tiny_gpt2(), dt.LoraConfig(r=2, target_modules="all-linear"))
    wrapped = [n for n, m in dm.model.named_modules() if isinstance(m, DeltaLayer)]
    assert wrapped and "lm_head" not in wrapped


def test_the_summary_table_lists_every_matched_module_and_the_trainable_share():
    dm = dt.DeltaModel(toy())
    dm.add("d", lora(r=2))
    table = target_table(dm)
    for module, shape, params in (("emb", "[32, 16]", 2 * (32 + 16)),
                                  ("proj", "[12, 16]", 2 * (16 + 12)),
                                  ("conv", "[12, 8]", 2 * (12 + 8)),
                                  ("out", "[5, 8]", 2 * (8 + 5))):
        line = next(li for li in table.splitlines() if li.split()[:1] == [module])
        assert shape in line and f"{params:,}" in line
    trainable = 2 * (48 + 28 + 20 + 13)
    base = sum(p.numel() for p in toy().parameters())
    assert f"trainable: {trainable:,} of {base + trainable:,}" in table
    assert f"({100 * trainable / (base + trainable):.4f}%)" in table
