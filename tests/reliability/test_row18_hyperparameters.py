"""RELIABILITY.md row 18 (bad input: hyperparameters).

Hyperparameters are checked against the real layer shapes when the delta is attached,
with one policy per method: an error (``HyperparameterError`` naming the module, the
value and the limit) or a clamp with a warning. Never a silent acceptance, never a
crash at forward, and a refused delta leaves the model as it was. PEFT accepts LoRA
r=64 on a 10-dim layer silently.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError, HyperparameterError
from deltatune.core.layers import DeltaLayer
from tests.conftest import model_inputs, tiny_llama
from tests.reliability._toy import lora, state_hash, toy, toy_ids


def test_lora_rank_above_the_layer_is_an_error_naming_module_and_limit():
    model = toy()
    before = state_hash(model)
    dm = dt.DeltaModel(model)
    with pytest.raises(HyperparameterError, match=r"rank r=6 is larger than min\(d_in, d_out\) "
                       r"= min\(8, 5\) = 5 of module 'out'.*Use r <= 5") as info:
        dm.add("d", lora(r=6))
    assert info.value.field == "r"
    assert state_hash(model) == before
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


@pytest.mark.parametrize("r", [1, 3, 5])
def test_every_accepted_rank_runs_forward_and_backward(r):
    dm = dt.DeltaModel(toy())
    dm.add("d", lora(r=r))
    dm(toy_ids()).sum().backward()
    assert all(p.grad is not None for p in dm.trainable_parameters())


def test_rank_pattern_fixes_one_small_layer():
    dm = dt.DeltaModel(toy())
    dm.add("d", lora(r=8, targets=["emb", "proj", "out"], rank_pattern={"out": 4}))
    assert dm.get_delta("d").parts["out"].r == 4


@pytest.mark.parametrize(("values", "cls"), [({"r": 0}, ConfigError), ({"r": -1}, ConfigError),
                                             ({"lora_alpha": 0.0}, ConfigError),
                                             ({"lora_alpha": -2.0}, ConfigError)])
def test_non_positive_rank_or_alpha(values, cls):
    with pytest.raises(cls, match="out of range"):
        dt.LoraConfig(target_modules=["proj"], **values)


def test_pattern_keys_must_name_a_targeted_module():
    with pytest.raises(HyperparameterError, match=r"rank_pattern key 'projj' matches none of "
                       r"the targeted modules"):
        dt.DeltaModel(toy()).add("d", lora(rank_pattern={"projj": 2}))
    with pytest.raises(HyperparameterError, match="alpha_pattern key 're:nothing'"):
        dt.DeltaModel(toy()).add("d", lora(alpha_pattern={"re:nothing": 2.0}))
    with pytest.raises(HyperparameterError, match="must be >= 1"):
        lora(rank_pattern={"proj": 0})


# Per method: a config that does not fit tiny Llama's 32-dim layers (64 in the MLP).
OVERSIZED = {
    "lora": dict(r=40, target_modules=["q_proj"]),
    "adalora": dict(init_r=40, target_r=8, target_modules=["q_proj"]),
    "loha": dict(r=40, target_modules=["q_proj"]),
    "krona": dict(a_shape=[5, 3], target_modules=["q_proj"]),
    "unified": dict(bottleneck_size=10_000),
    "houlsby": dict(bottleneck_size=10_000),
    "pfeiffer": dict(reduction_factor=1000.0),
    "parallel_adapter": dict(bottleneck_size=10_000),
}


@pytest.mark.parametrize("method", sorted(OVERSIZED))
def test_an_oversized_hyperparameter_is_refused_or_clamped_with_a_warning(method):
    from deltatune.core.registry import config_class, known_methods

    if method not in known_methods():
        pytest.fail(f"method {method!r} is no longer registered; update OVERSIZED")
    config = config_class(method)(**OVERSIZED[method])
    model = tiny_llama()
    before = state_hash(model)
    dm = dt.DeltaModel(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dm.add("d", config)
        except (HyperparameterError, ConfigError) as exc:
            assert "d_" in str(exc) or "dim" in str(exc) or "size" in str(exc) or \
                "divide" in str(exc) or "rank" in str(exc), str(exc)
            assert state_hash(model) == before
            return
    # Clamp policy: it must say so, and then run.
    assert caught, f"{method}: an oversized value was accepted silently"
    with torch.no_grad():
        dm(**model_inputs("llama"))
