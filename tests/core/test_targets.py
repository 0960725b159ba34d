"""Target selection: suffixes, regexes, all-linear, layer filter, and its errors."""

from __future__ import annotations

import pytest
from torch import nn

from deltatune.core.errors import TargetError
from deltatune.core.targets import LINEAR_TYPES, count_layers, layer_index, select_targets
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

LIN = LINEAR_TYPES


def select(model, targets, **kw):
    return select_targets(model, targets, supported_types=LIN, method="lora", **kw)


def test_suffix_and_exact_names():
    m = tiny_llama()
    got = select(m, ["q_proj", "model.layers.1.self_attn.v_proj"])
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                   "model.layers.1.self_attn.v_proj"]


def test_regex_string_and_re_prefix():
    m = tiny_llama()
    assert select(m, r".*layers\.0\.mlp\..*_proj") == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj"]
    assert select(m, ["re:.*\\.1\\.self_attn\\.[kv]_proj"]) == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


def test_all_linear_never_takes_the_head():
    m = tiny_llama()
    got = select(m, "all-linear")
    assert len(got) == 2 * 7 and "lm_head" not in got
    b = tiny_bert()
    got = select(b, "all-linear")
    assert not any(n.startswith("classifier") for n in got)
    assert "bert.pooler.dense" in got


def test_layer_filter_and_out_of_range():
    m = tiny_llama()
    assert count_layers(m) == 2
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    got = select(m, ["q_proj", "v_proj"], layers=[1])
    assert got == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(TargetError, match=r"layers \[5\] are out of range: this model has 2"):
        select(m, ["q_proj"], layers=[5])


def test_no_match_lists_candidates_and_suggests():
    m = tiny_llama()
    with pytest.raises(TargetError, match=r"'q_prj' matched no module. Did you mean 'q_proj'"
                                          r".*Modules with a weight here are named: .*v_proj"):
        select(m, ["q_prj"])


def test_one_typo_among_several_entries_is_an_error():
    m = tiny_llama()
    with pytest.raises(TargetError, match="'v_prj' matched no module"):
        select(m, ["q_proj", "k_proj", "v_prj", "o_proj"])


def test_unsupported_module_type_is_named():
    m = tiny_llama()
    with pytest.raises(TargetError, match=r"matched model.layers.0.self_attn \(LlamaAttention\)"
                                          r".*Its wrappable sub-modules: k_proj, o_proj"):
        select(m, ["layers.0.self_attn"])


def test_conv1d_counts_as_linear():
    g = tiny_gpt2()
    got = select(g, ["c_attn"])
    assert got == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_plain_module():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert select(net, "all-linear") == ["0", "2"]
