"""Prefix tuning: explicit past key/values, peft parity, padding, generate, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import deltatune as dt
from deltatune.core.errors import ConfigError, HyperparameterError
from tests.conftest import VOCAB, randomize_deltas, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from tests.helpers import adam_losses

P = 3


def _prefix_kv(dm, name="default"):
    """Return [(keys, values)] per attention site, each (1, kv_heads, P, head_dim)."""
    part = dm.get_delta(name).method.part(dm.get_delta(name))
    return [(p.keys, p.values) for p in (part.site_prefix(i, 1) for i in range(len(part.sites)))]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_prefix_equals_explicit_past_key_values(factory):
    # Reference: the base model with the prefix as an explicit cache. A cache shifts the
    # real tokens' positions by P, so our call passes the same positions.
    dm = dt.attach(factory(), dt.PrefixTuningConfig(prefix_length=P))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pos = torch.arange(P, P + 6).expand(2, -1)
    ours = dm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    cache = DynamicCache()
    for layer, (k, v) in enumerate(_prefix_kv(dm)):
        cache.update(k.expand(2, -1, -1, -1).detach(), v.expand(2, -1, -1, -1).detach(), layer)
    with dm.disabled():
        ref = dm.model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, P, dtype=torch.long),
                                                                mask], 1),
                       past_key_values=cache, position_ids=pos).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_peft_parity_prefix_reparameterised(factory):
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    dm = dt.attach(factory(), dt.PrefixTuningConfig(prefix_length=P, reparam_hidden=16))
    randomize_deltas(dm, std=0.3)
    part = dm.get_delta("default").method.part(dm.get_delta("default"))
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                  prefix_projection=True, encoder_hidden_size=16)
    pm = peft.get_peft_model(factory(), cfg)
    encoder = pm.prompt_encoder["default"]
    transform = {f"transform.{k}": v for k, v in part.transform.state_dict().items()}
    encoder.load_state_dict({"embedding.weight": part.embedding.weight, **transform})
    pos = torch.arange(P, P + 5).expand(2, -1)
    ours = dm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    theirs = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs[:, -5:], atol=1e-5, rtol=1e-5)


def _left_pad(rows, pad=0):
    n = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _right_pad(rows, pad=0):
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return ids, mask


ROWS = [[5, 9, 17, 33, 8, 41], [12, 70, 3]]


@pytest.mark.parametrize("mode", ["prefix", "embedding"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_batched_generate_with_left_padding_equals_unbatched(factory, mode):
    dm = dt.attach(factory(), dt.PrefixTuningConfig(prefix_length=P, mode=mode))
    randomize_deltas(dm, std=0.5)
    ids, mask = _left_pad(ROWS)
    batched = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                          pad_token_id=0)
    for i, row in enumerate(ROWS):
        single = dm.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row),
                             dtype=torch.long), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert batched[i, -5:].tolist() == single[0, -5:].tolist()
        assert single[0, :len(row)].tolist() == row


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_generate_equals_step_by_step_forward(factory):
    dm = dt.attach(factory(), dt.PrefixTuningConfig(prefix_length=P))
    randomize_deltas(dm, std=0.5)
    ids = torch.tensor([ROWS[0]])
    out = dm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(6):  # no cache: the whole sequence each step
        nxt = dm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert out.tolist() == seq.tolist()


@pytest.mark.parametrize("padding", [_left_pad, _right_pad])
def test_t5_padding_either_side_equals_unbatched(padding):
    dm = dt.attach(tiny_t5(), dt.PrefixTuningConfig(prefix_length=P, cross_attention=True))
    randomize_deltas(dm, std=0.5)
    ids, mask = padding(ROWS)
    batched = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for i, row in enumerate(ROWS):
        single = dm.generate(input_ids=torch.tensor([row]), max_new_tokens=4, do_sample=False)
        assert batched[i].tolist()[:single.shape[1]] == single[0].tolist()


def test_bert_right_padding_equals_unbatched():
    dm = dt.attach(tiny_bert(), dt.PrefixTuningConfig(prefix_length=P))
    randomize_deltas(dm, std=0.5)
    ids, mask = _right_pad(ROWS)
    batched = dm(input_ids=ids, attention_mask=mask).logits
    for i, row in enumerate(ROWS):
        single = dm(input_ids=torch.tensor([row])).logits
        torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-5)


def test_t5_prefix_on_encoder_and_decoder_changes_both():
    dm = dt.attach(tiny_t5(), dt.PrefixTuningConfig(prefix_length=P))
    part = dm.get_delta("default").method.part(dm.get_delta("default"))
    names = [s.name for s in part.sites]
    assert any(n.startswith("encoder.") for n in names)
    assert any(n.startswith("decoder.") for n in names)
    assert not any("EncDecAttention" in n for n in names)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_t5, tiny_bert])
def test_saved_prefix_drops_mlp_and_reloads_identically(tmp_path, factory):
    dm = dt.attach(factory(), dt.PrefixTuningConfig(prefix_length=P, reparam_hidden=8))
    randomize_deltas(dm, std=0.3)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if factory is tiny_t5:
        inputs["decoder_input_ids"] = ids[:, :3]
    before = dm(**inputs).logits
    dm.save_delta(tmp_path / "p")
    saved = dt.read_delta_directory(tmp_path / "p")
    assert set(saved.tensors) == {"prefix"}
    assert saved.config.reparameterize is False
    loaded = dt.load(factory(), tmp_path / "p")
    torch.testing.assert_close(loaded(**inputs).logits, before, atol=1e-6, rtol=1e-6)


def test_only_prefix_parameters_train_and_loss_falls():
    torch.manual_seed(0)
    dm = dt.attach(tiny_llama(), dt.PrefixTuningConfig(prefix_length=4, reparam_hidden=16))
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all("deltatune_model_deltas" in n for n in trainable)
    ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(5))
    losses = adam_losses(dm, lambda: dm(input_ids=ids, labels=ids).loss, steps=25, lr=5e-2)
    assert losses[-1] < losses[0] - 0.08  # a tiny random model: attention moves logits little


def test_init_from_real_token_activations():
    tokens = [7, 8, 9]
    dm = dt.attach(tiny_llama(), dt.PrefixTuningConfig(prefix_length=3, reparameterize=False,
                                                       init_token_ids=tokens))
    with dm.disabled():
        cache = dm.model(input_ids=torch.tensor([tokens]), use_cache=True).past_key_values
    for layer, (k, v) in enumerate(_prefix_kv(dm)):
        torch.testing.assert_close(k, cache.layers[layer].keys)
        torch.testing.assert_close(v, cache.layers[layer].values)


def test_infix_is_seen_only_from_y_on():
    dm = dt.attach(tiny_llama(), dt.PrefixTuningConfig(prefix_length=P, mode="infix"))
    randomize_deltas(dm, std=0.5)
    ids = torch.tensor([ROWS[0]])
    with dm.disabled():
        base = dm(input_ids=ids).logits
    out = dm(input_ids=ids, infix_position=torch.tensor([3])).logits
    torch.testing.assert_close(out[:, :3], base[:, :3])      # x does not see the infix
    assert (out[:, 3:] - base[:, 3:]).abs().max() > 1e-3     # y does
    with pytest.raises(ConfigError, match="infix_position"):
        dm(input_ids=ids)


def test_disabled_and_detached_give_base_outputs():
    base_model = tiny_gpt2()
    ids = torch.tensor([ROWS[0]])
    ref = base_model(input_ids=ids).logits
    dm = dt.attach(base_model, dt.PrefixTuningConfig(prefix_length=P))
    with dm.disabled():
        torch.testing.assert_close(dm(input_ids=ids).logits, ref)
    dm.delete("default")
    assert base_model.config._attn_implementation in ("eager", "sdpa")
    torch.testing.assert_close(dm(input_ids=ids).logits, ref)


def test_bad_configs():
    with pytest.raises(HyperparameterError):
        dt.PrefixTuningConfig(prefix_length=2, reparameterize=False, init_token_ids=[1])
    with pytest.raises(HyperparameterError):
        dt.PrefixTuningConfig(prefix_length=1, init_token_ids=[1])
    with pytest.raises(ConfigError):
        dt.PrefixTuningConfig(prefix_length=0)
    with pytest.raises(HyperparameterError):
        dt.attach(tiny_t5(), dt.PrefixTuningConfig(mode="infix"))
