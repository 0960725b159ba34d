"""RELIABILITY.md rows 7, 8, 9 and 10: invariants checked for every registered method.

Row 7 (merge algebra): merged ~ unmerged within the one tolerance table
(``tolerances.py``), in float32, float16 and bfloat16; merge -> unmerge restores every
base weight bit for bit; a second merge is a no-op with a warning; LoRA on Linear,
GPT-2 Conv1D and Embedding layers.
Row 8 (identity and disable): a method declaring ``identity_at_init`` gives the base
output bit for bit right after attach, a method declaring otherwise really differs;
``disabled()`` gives the base output bit for bit, also after merge/unmerge and while
merged, and leaving it restores the delta's output.
Row 9 (trainability and isolation): after optimizer steps only delta tensors changed,
``requires_grad`` is exactly the active trainable delta set, and a delta added, loaded
or activated on a model in eval mode runs in eval mode (two forwards are identical).
Row 10 (serialization): save -> load -> save gives byte-identical files; the saved
keys are exactly the delta's tensors and the manifest lists exactly the files; saving
one of several deltas gives the same files as saving it alone; the delta's name does
not change the tensor file.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core import io
from deltatune.core.errors import MergeError
from deltatune.core.registry import get_method
from tests.conftest import model_inputs, tiny_gpt2, tiny_llama
from tests.reliability._methods import example_config, mergeable_methods, methods
from tests.reliability._toy import fill, lora, state_hash, toy, toy_ids
from tests.reliability.tolerances import merge_rtol, relative_error

INPUTS = model_inputs("llama")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def logits(model, inputs=INPUTS):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def attached(method: str, dtype=torch.float32, seed: int = 3) -> dt.DeltaModel:
    dm = dt.attach(tiny_llama().to(dtype), example_config(method))
    fill(dm, seed=seed, std=0.05)
    return dm


# -- row 7 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", mergeable_methods())
def test_row7_merge_matches_unmerged_and_unmerge_is_bitwise(method, dtype):
    dm = attached(method, dtype)
    base = state_hash(dm.model)
    unmerged = logits(dm)
    dm.merge()
    err = relative_error(logits(dm), unmerged)
    assert err <= merge_rtol(method, dtype), f"{method} {dtype}: {err:.2e}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.merge()
    assert any("already merged" in str(w.message) for w in caught)
    assert relative_error(logits(dm), unmerged) == err  # the second merge changed nothing
    dm.unmerge()
    assert state_hash(dm.model) == base
    assert torch.equal(logits(dm), unmerged)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["toy: linear, conv1d, embedding", "gpt2: conv1d"])
def test_row7_lora_on_every_layer_kind(kind, dtype):
    if kind.startswith("toy"):
        model, inputs = toy(dtype=dtype), toy_ids()
        config = lora()
    else:
        model, inputs = tiny_gpt2().to(dtype), model_inputs("gpt2")
        config = dt.LoraConfig(r=2, target_modules=["c_attn", "c_fc"])
    dm = dt.attach(model, config)
    fill(dm, std=0.05)
    base = state_hash(dm.model)
    unmerged = logits(dm, inputs)
    dm.merge()
    assert relative_error(logits(dm, inputs), unmerged) <= merge_rtol("lora", dtype)
    dm.unmerge()
    assert state_hash(dm.model) == base


def test_row7_merging_into_a_tied_weight_is_refused():
    """GPT-2 ties wte and lm_head: a merge into wte would silently change the head too."""
    dm = dt.attach(tiny_gpt2(), dt.LoraConfig(r=2, target_modules=["wte", "c_attn"]))
    fill(dm, std=0.05)
    base = state_hash(dm.model)
    inputs = model_inputs("gpt2")
    unmerged = logits(dm, inputs)
    with pytest.raises(MergeError, match=r"into transformer\.wte: its weight is shared with "
                       r"lm_head\.weight \(tied weights\)"):
        dm.merge()
    assert state_hash(dm.model) == base and not dm.get_delta("default").merged
    assert torch.equal(logits(dm, inputs), unmerged)


# -- row 8 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", methods())
def test_row8_identity_at_init_is_declared_truthfully(method):
    base = logits(tiny_llama())
    dm = dt.attach(tiny_llama(), example_config(method))
    same = logits(dm).shape == base.shape and torch.equal(logits(dm), base)
    declared = get_method(method).identity_at_init
    assert same == declared, (f"{method} declares identity_at_init={declared} but its output "
                              f"{'equals' if same else 'differs from'} the base output")


@pytest.mark.parametrize("method", methods())
def test_row8_disabled_is_the_base_bitwise_and_leaving_restores(method):
    base = logits(tiny_llama())
    dm = attached(method)
    adapted = logits(dm)
    with dm.disabled():
        assert torch.equal(logits(dm), base)
    assert torch.equal(logits(dm), adapted)
    if get_method(method).mergeable:
        dm.merge()
        merged = logits(dm)
        with dm.disabled():
            assert torch.equal(logits(dm), base)
        assert torch.equal(logits(dm), merged)
        dm.unmerge()
        with dm.disabled():
            assert torch.equal(logits(dm), base)
        assert torch.equal(logits(dm), adapted)


# -- row 9 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", methods())
def test_row9_only_delta_tensors_change_and_requires_grad_is_the_delta(method):
    dm = attached(method)
    dm.train()
    delta_ids = {id(p) for n in dm.delta_names for p in dm.get_delta(n).parameters()}
    trainable = {id(p) for p in dm.trainable_parameters()}
    assert trainable and trainable <= delta_ids
    active = {id(p) for n in dm.active for p in dm.get_delta(n).parameters()}
    assert trainable == active
    before = {n: p.detach().clone() for n, p in dm.named_parameters()}
    opt = torch.optim.SGD(dm.trainable_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        dm(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
        opt.step()
    params = dict(dm.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed, f"{method}: nothing changed after two steps"
    assert all(id(params[n]) in delta_ids for n in changed), sorted(
        n for n in changed if id(params[n]) not in delta_ids)[:5]
    dm.eval()
    with dm.disabled():
        assert torch.equal(logits(dm), logits(tiny_llama()))


def _two_eval_forwards_equal(dm) -> bool:
    dm.eval()
    return torch.equal(logits(dm), logits(dm))


def test_row9_eval_mode_reaches_added_loaded_and_activated_deltas(tmp_path):
    dm = dt.DeltaModel(tiny_llama())
    dm.eval()
    dm.add("a", dt.LoraConfig(r=2, lora_dropout=0.5))
    fill(dm, "a")
    assert _two_eval_forwards_equal(dm)
    dm.save_delta(tmp_path / "a", "a")
    dm.load_delta(tmp_path / "a", name="b", trainable=True)
    assert dm.active == ["b"] and _two_eval_forwards_equal(dm)
    dm.activate("a", "b")
    assert _two_eval_forwards_equal(dm)
    dm.train()
    assert all(m.training for m in dm.modules())
    dm.eval()
    assert not any(m.training for m in dm.modules())


# -- row 10 ------------------------------------------------------------------------------------
def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("method", methods())
def test_row10_save_load_save_is_byte_identical(method, tmp_path):
    dm = attached(method)
    dm.save_delta(tmp_path / "one")
    again = dt.load(tiny_llama(), tmp_path / "one")
    again.save_delta(tmp_path / "two")
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    tensors, _ = io.load_tensors(tmp_path / "one" / "delta.safetensors")
    expected = dm.delta_state_dict()
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[k], expected[k].cpu()) for k in tensors)
    manifest = io.verify_manifest(tmp_path / "one")
    assert sorted(manifest["files"]) == sorted(set(_files(tmp_path / "one")) - {"manifest.json"})
    if method != "full":  # only the delta is saved, never the base weights
        assert sum(t.numel() for t in tensors.values()) < dm.base_parameter_count() / 4


def test_row10_one_of_several_deltas_and_the_name_do_not_change_the_tensors(tmp_path):
    alone = dt.DeltaModel(tiny_llama())
    alone.add("sql", lora(targets=["q_proj", "v_proj"]))
    fill(alone, "sql", seed=1)
    alone.save_delta(tmp_path / "alone")

    several = dt.DeltaModel(tiny_llama())
    several.add("sq", lora(targets=["q_proj"]))            # a name that is a prefix
    several.add("sql", lora(targets=["q_proj", "v_proj"]))
    several.add("lora_sql", lora(targets=["v_proj"]))      # a name that looks like a key
    fill(several, "sq", seed=9)
    fill(several, "sql", seed=1)
    fill(several, "lora_sql", seed=8)
    several.save_delta(tmp_path / "several", "sql")
    assert _files(tmp_path / "alone") == _files(tmp_path / "several")

    renamed = dt.load(tiny_llama(), tmp_path / "alone", name="other_name")
    renamed.save_delta(tmp_path / "renamed")
    a, b = _files(tmp_path / "alone"), _files(tmp_path / "renamed")
    assert a["delta.safetensors"] == b["delta.safetensors"]
    # The name is recorded (so load restores it), and it is the only difference.
    import json

    ca, cb = json.loads(a["delta_config.json"]), json.loads(b["delta_config.json"])
    assert (ca.pop("name"), cb.pop("name")) == ("sql", "other_name") and ca == cb
