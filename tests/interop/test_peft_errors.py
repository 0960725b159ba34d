"""Bad PEFT input: refused options, wrong base models, pickles, corrupt files.

Every failure leaves the model exactly as it was (no wrapper, no delta).
"""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import (
    AdapterFileCorrupt,
    BaseModelMismatchError,
    ConfigError,
    UnknownMethodError,
    UnsafeFileError,
)
from deltatune.core.layers import DeltaLayer
from tests.conftest import FACTORIES, tiny_gpt2, tiny_llama
from tests.interop.helpers import logits, peft_model

LLAMA_LORA = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def llama_adapter(tmp_path):
    pm = peft_model(tiny_llama, **LLAMA_LORA)
    pm.save_pretrained(tmp_path / "a")
    return tmp_path / "a", logits(pm, "llama")


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _untouched(dm) -> bool:
    return not dm.delta_names and not any(isinstance(m, DeltaLayer) for m in dm.model.modules())


@pytest.mark.parametrize(("option", "value", "words"), [
    ("use_dora", True, "DoRA"),
    ("bias", "all", "bias"),
    ("lora_bias", True, "bias"),
    ("init_lora_weights", "pissa", "rewritten base weight"),
    ("layer_replication", [[0, 2]], "layer replication"),
])
def test_unsupported_peft_options_are_refused_by_name(llama_adapter, option, value, words):
    directory, _ = llama_adapter
    _edit_config(directory, **{option: value})
    dm = dt.DeltaModel(tiny_llama())
    with pytest.raises(ConfigError, match=words) as info:
        dm.load_delta(directory)
    assert info.value.field == option and option in str(info.value)
    assert _untouched(dm)


def test_dora_tensors_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"],
                                                     use_dora=True))
    pm.save_pretrained(tmp_path / "d")
    _edit_config(tmp_path / "d", use_dora=False)  # a lying config: the tensors still tell
    with pytest.raises(ConfigError, match="DoRA"):
        dt.load_peft(tmp_path / "d", model=tiny_llama())


def test_adapter_of_another_architecture_is_a_mismatch(tmp_path):
    pm = peft_model(tiny_gpt2, r=2, target_modules=["c_attn"])
    pm.save_pretrained(tmp_path / "g")
    dm = dt.DeltaModel(tiny_llama())
    with pytest.raises(BaseModelMismatchError, match="'gpt2'.*'llama'"):
        dm.load_delta(tmp_path / "g")
    assert _untouched(dm)
    # Without PEFT's auto_mapping the module names still give it away.
    _edit_config(tmp_path / "g", auto_mapping=None)
    with pytest.raises(BaseModelMismatchError, match="transformer.h.0.attn.c_attn"):
        dm.load_delta(tmp_path / "g")
    assert _untouched(dm)


def test_other_hidden_size_is_a_mismatch_naming_both_sizes(llama_adapter):
    directory, _ = llama_adapter
    dm = dt.DeltaModel(tiny_llama(hidden_size=48))
    with pytest.raises(BaseModelMismatchError, match="48 x 48.*expect 32 x 32"):
        dm.load_delta(directory)
    assert _untouched(dm)


def test_other_number_of_labels_in_a_saved_head_is_a_mismatch(tmp_path):
    from tests.conftest import tiny_bert

    pm = peft_model(tiny_bert, r=2, target_modules=["query"], task_type="SEQ_CLS")
    pm.save_pretrained(tmp_path / "b")
    dm = dt.DeltaModel(tiny_bert(num_labels=5))
    with pytest.raises(BaseModelMismatchError, match="classifier.*number of labels"):
        dm.load_delta(tmp_path / "b")
    assert _untouched(dm)


def test_our_peft_files_carry_the_full_fingerprint(tmp_path):
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2))
    dm.save_delta(tmp_path / "p", format="peft")
    sibling = dt.DeltaModel(tiny_llama(seed=7))  # same shapes, other weights
    with pytest.raises(BaseModelMismatchError, match="different weights"):
        sibling.load_delta(tmp_path / "p")
    assert _untouched(sibling)
    sibling.load_delta(tmp_path / "p", check_base="shapes")
    assert sibling.delta_names == ["default"]


def test_differing_saved_embedding_copy_is_refused(tmp_path):
    pm = peft_model(tiny_llama, r=2, target_modules=["embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "e")  # also saves the base embedding matrix
    dt.load_peft(tmp_path / "e", model=tiny_llama())  # same base: the copy is dropped
    dm = dt.DeltaModel(tiny_llama(seed=3))
    with pytest.raises(BaseModelMismatchError, match="embed_tokens.weight"):
        dm.load_delta(tmp_path / "e", check_base="off")
    assert _untouched(dm)


def test_legacy_bin_needs_allow_pickle_and_warns(llama_adapter):
    from safetensors.torch import load_file

    directory, expected = llama_adapter
    tensors = load_file(directory / "adapter_model.safetensors")
    (directory / "adapter_model.safetensors").unlink()
    torch.save(tensors, directory / "adapter_model.bin")
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        dt.load_peft(directory, model=tiny_llama())
    with pytest.warns(UserWarning, match="pickle"):
        dm = dt.load_peft(directory, model=tiny_llama(), allow_pickle=True)
    assert (logits(dm, "llama") - expected).abs().max() < 1e-5


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_allow_pickle_still_refuses_code(llama_adapter, capsys):
    directory, _ = llama_adapter
    (directory / "adapter_model.safetensors").unlink()
    with open(directory / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(AdapterFileCorrupt, match="weights_only"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dt.load_peft(directory, model=tiny_llama(), allow_pickle=True)
    assert "code ran" not in capsys.readouterr().out


def test_unknown_peft_type_names_readable_types(llama_adapter):
    directory, _ = llama_adapter
    _edit_config(directory, peft_type="VERA")
    with pytest.raises(UnknownMethodError, match="'VERA'.*LORA"):
        dt.load_peft(directory, model=tiny_llama())


@pytest.mark.parametrize("damage", ["json", "truncate", "missing", "rank"])
def test_corrupt_peft_directories(llama_adapter, damage):
    directory, _ = llama_adapter
    weights = directory / "adapter_model.safetensors"
    if damage == "json":
        (directory / "adapter_config.json").write_text("{not json")
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "missing":
        weights.unlink()
    else:
        _edit_config(directory, r=4)  # tensors have rank 2
    with pytest.raises(AdapterFileCorrupt):
        dt.load_peft(directory, model=tiny_llama())


def test_flipped_byte_in_our_peft_dir_is_caught_by_the_manifest(tmp_path):
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2))
    dm.save_delta(tmp_path / "p", format="peft")
    path = tmp_path / "p" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileCorrupt, match="sha256"):
        dt.load_peft(tmp_path / "p", model=tiny_llama())


def test_methods_without_a_peft_twin_are_refused_on_save(tmp_path, monkeypatch):
    from deltatune.interop import peft_format

    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2))
    monkeypatch.setattr(peft_format, "MAPPINGS", {})
    with pytest.raises(ConfigError, match="format='deltatune'"):
        dm.save_delta(tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_load_peft_refuses_a_deltatune_directory(tmp_path):
    dm = dt.attach(FACTORIES["llama"](), dt.LoraConfig(r=2))
    dm.save_delta(tmp_path / "d")
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        dt.load_peft(tmp_path / "d", model=tiny_llama())
