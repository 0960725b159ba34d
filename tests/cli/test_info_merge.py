"""``deltatune info`` and ``deltatune merge`` on a tiny local model directory."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import deltatune as dt
from deltatune.cli import main
from tests.conftest import VOCAB, randomize_deltas, tiny_llama


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def saved(tmp_path):
    """A local base model directory and a trained-looking LoRA delta saved for it."""
    base_dir, delta_dir = tmp_path / "base", tmp_path / "delta"
    base = tiny_llama()
    base.save_pretrained(base_dir)
    _tiny_tokenizer().save_pretrained(base_dir)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8), name="defs")
    randomize_deltas(dm)
    dm.save_delta(delta_dir, name="defs")
    return base_dir, delta_dir, dm


def test_info_reports_what_the_directory_holds(saved, capsys):
    _, delta_dir, _dm = saved
    assert main(["info", str(delta_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # 2 layers x (q_proj 32->32, v_proj 32->16 with GQA): r * (d_in + d_out) each
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert info["parameters"] == expected
    assert info["method"] == "lora" and info["name"] == "defs"
    assert info["config"]["r"] == 4 and info["config"]["lora_alpha"] == 8
    assert len(info["targets"]) == 4
    assert info["base_parameters"] == sum(p.numel() for p in tiny_llama().parameters())
    assert main(["info", str(delta_dir)]) == 0
    text = capsys.readouterr().out
    assert f"{expected:,} parameters" in text and "lora" in text


def test_info_on_a_torn_directory_is_a_clean_error(saved, capsys):
    _, delta_dir, _ = saved
    weights = delta_dir / "delta.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["info", str(delta_dir)]) == 2
    err = capsys.readouterr().err
    assert "delta.safetensors" in err


def test_merge_writes_a_plain_model_equal_to_the_delta_model(saved, tmp_path, capsys):
    base_dir, delta_dir, dm = saved
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base_dir), "--delta", str(delta_dir),
                 "--out", str(out)]) == 0
    assert "merged delta 'defs'" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dm(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").exists()


def test_merge_refuses_a_delta_for_another_base(saved, tmp_path, capsys):
    _base_dir, delta_dir, _ = saved
    other = tmp_path / "other"
    tiny_llama(hidden_size=48, intermediate_size=96).save_pretrained(other)
    _tiny_tokenizer().save_pretrained(other)
    assert main(["merge", "--model", str(other), "--delta", str(delta_dir),
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "the delta was saved for" in err and "check_base" in err
    assert not (tmp_path / "m").exists()
