"""``merge_and_unload`` returns a plain model: no deltatune module, hook or holder left.

For every mergeable method, with unmerged deltas of hook- and holder-based methods
(parallel adapter: a pre-hook on the FFN input; prompt tuning: a holder module and an
embedding wrapper; KronA^B_res: a block wrapper) attached beside it, the returned model
has exactly the module classes, hooks and state-dict keys of a fresh base (plus biases
BitFit adds), and computes what the merged delta alone computed. A LoRA merge is also
checked against W + s B A done by hand. Methods that cannot merge refuse by name and
leave the model working.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import MergeError
from deltatune.core.registry import config_class
from tests.conftest import model_inputs, randomize_deltas, tiny_llama
from tests.reliability._methods import example_config, mergeable_methods, methods
from tests.reliability.tolerances import merge_rtol, relative_error

INPUTS = model_inputs("llama")
# Non-mergeable deltas that leave something outside the wrapped layers while attached.
BYSTANDERS = {"pa": ("parallel_adapter", dict(bottleneck_size=4)),
              "pp": ("prompt", dict(prompt_length=3)),
              "kb": ("kronab", {})}
MERGEABLE = [*mergeable_methods(), "unified-linear"]


def _config(method: str):
    if method == "unified-linear":  # parallel low-rank on the query: a change of W_q
        return config_class("unified")(functional_form="low_rank", insertion="parallel",
                                       modified_representation=["query"], bottleneck_size=2)
    return example_config(method)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def _hooks(model) -> dict[str, int]:
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) +
            len(getattr(m, "_forward_hooks_with_kwargs", {}))
            for n, m in model.named_modules()}


def assert_plain(model, *, extra_bias: bool = False) -> None:
    """``model`` is structurally a fresh tiny Llama: classes, hooks, keys, attributes."""
    fresh = tiny_llama()
    ours = {n: type(m) for n, m in model.named_modules()}
    assert ours == {n: type(m) for n, m in fresh.named_modules()}
    assert not [n for n, t in ours.items() if t.__module__.startswith("deltatune")]
    assert _hooks(model) == _hooks(fresh)
    assert sum(_hooks(model).values()) == 0
    keys, base_keys = set(model.state_dict()), set(fresh.state_dict())
    if extra_bias:  # BitFit's add_missing_biases gives bias-less layers a (merged) bias
        assert keys >= base_keys and all(k.endswith(".bias") for k in keys - base_keys)
    else:
        assert keys == base_keys
    assert not any("deltatune" in name for name in vars(model))
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_and_unload_leaves_a_plain_model_computing_the_merged_delta(method):
    dm = dt.DeltaModel(tiny_llama())
    dm.add("m", _config(method))
    for name, (other, kwargs) in BYSTANDERS.items():
        dm.add(name, config_class(other)(**kwargs))
    randomize_deltas(dm, std=0.05, seed=3)
    dm.activate("m")
    expected = _logits(dm)  # the mergeable delta alone, unmerged
    dm.activate("m", "pa", "pp", "kb")
    assert not torch.equal(_logits(dm), expected)  # the bystanders are live
    with pytest.warns(UserWarning, match=r"merge_and_unload removed delta\(s\) 'pa', 'pp', "
                      r"'kb': they were not merged"):
        plain = dm.merge_and_unload("m")
    assert plain is dm.model and not dm.delta_names
    assert_plain(plain, extra_bias=method == "bitfit")
    err = relative_error(_logits(plain), expected)
    assert err <= merge_rtol(method.split("-")[0], torch.float32), f"{method}: {err:.2e}"


def test_lora_merge_reference_by_hand():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("lora", dt.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    dm.add("pa", config_class("parallel_adapter")(bottleneck_size=4))
    randomize_deltas(dm, std=0.2, seed=5)
    factors = {loc: (d.lora_A.detach().double(), d.lora_B.detach().double())
               for loc, d in dm.get_delta("lora").parts.items()}
    dm.activate("lora", "pa")
    with pytest.warns(UserWarning, match="'pa'"):
        plain = dm.merge_and_unload("lora")
    assert_plain(plain)
    mlp = plain.model.layers[0].mlp  # the parallel adapter's input hook is gone
    assert not mlp.gate_proj._forward_pre_hooks and not mlp.up_proj._forward_pre_hooks
    reference = tiny_llama()
    with torch.no_grad():
        for loc, (a, b) in factors.items():
            weight = reference.get_submodule(loc).weight
            weight.copy_((weight.double() + (6 / 2) * b @ a).float())
    torch.testing.assert_close(_logits(plain), _logits(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(set(methods()) - set(mergeable_methods())))
def test_methods_that_cannot_merge_refuse_and_keep_working(method):
    dm = dt.DeltaModel(tiny_llama())
    dm.add("d", example_config(method))
    randomize_deltas(dm, std=0.05, seed=3)
    before = _logits(dm)
    hooks = _hooks(dm.model)
    for call in (dm.merge_and_unload, dm.merge):
        with pytest.raises(MergeError, match=rf"delta 'd' \({method}\) cannot be merged into "
                           r"the base weights: its computation is not a change of weights"):
            call()
    assert dm.delta_names == ["d"] and not dm.get_delta("d").merged
    assert _hooks(dm.model) == hooks
    assert torch.equal(_logits(dm), before)
