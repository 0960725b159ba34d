"""Merged exports load in plain transformers; the export CLI; model cards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import deltatune as dt
from deltatune.cli import main
from tests.conftest import model_inputs, randomize_deltas, tiny_bert, tiny_llama
from tests.interop.helpers import CASES, logits, model_dir, peft_model, tiny_tokenizer

# Runs in a fresh interpreter in which `import deltatune` fails: the export must not need it.
_PLAIN_LOAD = """
import sys, torch
sys.modules["deltatune"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_merged_export_loads_in_plain_transformers_with_equal_outputs(tmp_path):
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_deltas(dm, std=0.2)
    ids = model_inputs("llama")["input_ids"]
    dm.merge()
    with torch.no_grad():
        ours_merged = dm(input_ids=ids).logits
    dm.unmerge()
    out = dt.export_merged(dm, tmp_path / "merged", tokenizer=tiny_tokenizer(),
                           max_shard_size="40KB")
    files = {p.name for p in out.iterdir()}
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert not any(n.endswith((".bin", ".pt")) for n in files)
    assert "tokenizer.json" in files
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(out), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, capture_output=True, timeout=300)
    plain = torch.load(tmp_path / "out.pt", weights_only=True)
    assert (plain - ours_merged).abs().max() < 1e-5
    card = _front_matter((out / "README.md").read_text())
    assert card["library_name"] == "transformers" and "lora" in card["tags"]


def test_cli_export_peft_then_merged_then_deltatune(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    base = model_dir(tmp_path / "base", tiny_bert())
    _arch, kwargs = CASES["bert-seqcls-head"]
    pm = peft_model(tiny_bert, **kwargs)
    pm.save_pretrained(tmp_path / "peft")
    expected = logits(pm, "bert")
    common = ["--model", str(base), "--task", "sequence-classification"]
    # PEFT -> deltatune format, then deltatune -> PEFT format.
    assert main(["export", *common, "--delta", str(tmp_path / "peft"), "--out",
                 str(tmp_path / "ours"), "--format", "deltatune"]) == 0
    assert (tmp_path / "ours" / "delta_config.json").exists()
    assert main(["export", *common, "--delta", str(tmp_path / "ours"), "--out",
                 str(tmp_path / "again")]) == 0
    assert "modules_to_save" in capsys.readouterr().out  # the serving note
    from peft import PeftModel

    again = PeftModel.from_pretrained(tiny_bert(), tmp_path / "again").eval()
    assert (logits(again, "bert") - expected).abs().max() < 1e-5
    # Merged: the trained classifier copy replaces the head.
    assert main(["export", *common, "--delta", str(tmp_path / "again"), "--out",
                 str(tmp_path / "merged"), "--format", "merged"]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert (logits(plain, "bert") - expected).abs().max() < 1e-5


def test_cli_export_reports_mismatch_as_error(tmp_path, capsys):
    base = model_dir(tmp_path / "base", tiny_llama(hidden_size=48))
    pm = peft_model(tiny_llama, r=2, target_modules=["q_proj"])
    pm.save_pretrained(tmp_path / "peft")
    code = main(["export", "--model", str(base), "--delta", str(tmp_path / "peft"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "48 x 48" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_legacy_bin_needs_the_flag(tmp_path, capsys):
    from safetensors.torch import load_file

    base = model_dir(tmp_path / "base", tiny_llama())
    pm = peft_model(tiny_llama, r=2, target_modules=["q_proj"])
    pm.save_pretrained(tmp_path / "peft")
    torch.save(load_file(tmp_path / "peft" / "adapter_model.safetensors"),
               tmp_path / "peft" / "adapter_model.bin")
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()
    args = ["export", "--model", str(base), "--delta", str(tmp_path / "peft"), "--out",
            str(tmp_path / "o")]
    assert main(args) == 2 and "--allow-pickle" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="pickle"):
        assert main([*args, "--allow-pickle"]) == 0
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_load_peft_without_a_model_uses_base_model_name_or_path(tmp_path):
    base = model_dir(tmp_path / "base", tiny_llama())
    pm = peft_model(tiny_llama, r=2, target_modules=["q_proj", "v_proj"])
    pm.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg.update(base_model_name_or_path=str(base), task_type="CAUSAL_LM")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    dm = dt.load_peft(tmp_path / "peft")
    assert (logits(dm, "llama") - logits(pm, "llama")).abs().max() < 1e-5


@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_every_saved_directory_has_a_hub_model_card(tmp_path, fmt):
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    card = {"base_model_name": "org/tiny-llama", "datasets": ["imdb"],
            "training_data": "imdb train split, 1 epoch", "metrics": {"accuracy": 0.91},
            "license": "apache-2.0"}
    dm.save_delta(tmp_path / "d", card=card, format=fmt)
    readme = (tmp_path / "d" / "README.md").read_text()
    meta = _front_matter(readme)
    assert meta["library_name"] == ("peft" if fmt == "peft" else "deltatune")
    assert meta["base_model"] == "org/tiny-llama" and meta["datasets"] == ["imdb"]
    assert "lora" in meta["tags"] and meta["license"] == "apache-2.0"
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"] == [{"type": "accuracy", "value": 0.91, "name": "accuracy"}]
    trainable = sum(p.numel() for p in dm.get_delta("default").parameters())
    assert f"| trainable parameters | {trainable:,}" in readme
    assert "imdb train split" in readme and "model.layers.1.self_attn.v_proj" in readme
