"""The causal LM task's loss through the fused head + cross-entropy, against the logits path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.kernels import fast_path
from deltatune.kernels.head_loss import PLAIN_HEAD_TYPES, causal_lm_loss_sum, plain_head
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.tasks import CausalLMSFT
from tests.conftest import randomize_deltas, tiny_gpt2, tiny_llama
from tests.helpers import count_calls
from tests.tiny_tokenizer import char_tokenizer

ROWS = [{"prompt": f"q{i}", "response": "abcdefg"[: 1 + i % 6]} for i in range(6)]


def _task():
    return CausalLMSFT(char_tokenizer(), chat_template=False, max_length=24,
                       generate_examples=0)


def _both(dm, batch):
    """(loss, count, gradients) of the task's loss on the plain path, then the fused one."""
    task = _task()
    params = dm.trainable_parameters()
    out = []
    for mode in ("off", "on"):
        with fast_path(mode):
            loss, count = task.loss_sum(dm, batch)
        out.append((loss, count, torch.autograd.grad(loss, params)))
    return out


def _gpt2_no_dropout():
    return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("factory", [tiny_llama, _gpt2_no_dropout], ids=["llama", "gpt2"])
@pytest.mark.parametrize("packed", [False, True])
def test_task_loss_and_gradients_equal_the_logits_path(monkeypatch, factory, packed):
    dm = dt.attach(factory(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_deltas(dm, std=0.2)
    dm.set_trainable("default")
    dm.train()
    task = _task()
    examples = task.encode_rows(ROWS)
    batch = task.collate(task.pack_examples(examples) if packed else examples)
    from deltatune.kernels import head_loss

    calls = count_calls(monkeypatch, head_loss, "fused_linear_cross_entropy")
    (ref, n_ref, g_ref), (got, n_got, g_got) = _both(dm, batch)
    assert calls["n"] == 1  # the fused path ran (once, for the "on" pass)
    assert n_got == n_ref > 0 and got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
    for a, b in zip(g_got, g_ref):
        assert _rel(a, b) < 1e-5
    # the head is back in place, and is the model's own
    assert isinstance(dm.model.lm_head, nn.Linear)


def test_prompt_tuning_virtual_tokens_are_cut_as_in_the_logits_path():
    # the DeltaModel's call edit (virtual tokens in front) and its output alignment apply
    dm = dt.attach(tiny_llama(), PromptTuningConfig(prompt_length=3, init="random"))
    dm.set_trainable("default")
    dm.train()
    task = _task()
    batch = task.collate(task.encode_rows(ROWS))
    (ref, n_ref, g_ref), (got, n_got, g_got) = _both(dm, batch)
    assert n_got == n_ref
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert _rel(g_got[0], g_ref[0]) < 1e-5


def test_autocast_hidden_states_meet_the_float32_head():
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_deltas(dm, std=0.2)
    task = _task()
    batch = task.collate(task.encode_rows(ROWS))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with fast_path("off"):
            ref, _ = task.loss_sum(dm, batch)
        with fast_path("on"):
            got, _ = task.loss_sum(dm, batch)
    assert abs(got.item() - ref.item()) < 2e-2 * abs(ref.item())


def test_heads_that_need_their_own_forward_fall_back():
    lora_head = dt.attach(tiny_llama(), dt.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    randomize_deltas(lora_head, std=0.2)
    assert plain_head(lora_head) is None
    with lora_head.disabled():
        assert plain_head(lora_head) is not None  # a disabled delta: the base head is plain
    assert plain_head(tiny_llama()) is not None
    soft = tiny_llama()
    soft.config.final_logit_softcapping = 30.0
    assert plain_head(soft) is None
    other = tiny_llama()
    other.config.model_type = "some_new_arch"
    assert plain_head(other) is None
    assert plain_head(torch.compile(tiny_llama())) is None
    # nothing runs when it does not apply
    ran = []
    assert causal_lm_loss_sum(soft, torch.zeros(1, 4, dtype=torch.long),
                              lambda: ran.append(1)) is None
    assert not ran


def test_a_failing_forward_puts_the_head_back():
    m = tiny_llama()
    head = m.lm_head

    def boom():
        assert isinstance(m.lm_head, nn.Identity)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        causal_lm_loss_sum(m, torch.zeros(1, 4, dtype=torch.long), boom)
    assert m.lm_head is head


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_task_loss_by_default_needs_less_memory_and_matches():
    # 8 x 1024 tokens of a 32k vocabulary: the logits path holds 0.5 GiB of bf16 logits and
    # 1 GiB of float32 ones for backward; the fused path one chunk of ~2100 tokens at a time
    m = tiny_llama(vocab_size=32000, max_position_embeddings=1024).cuda().bfloat16()
    dm = dt.attach(m, dt.LoraConfig(r=4, target_modules="all-linear"))
    dm.set_trainable("default")
    task = _task()
    ids = torch.randint(3, 32000, (8, 1024), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = {}
    for mode in ("off", "auto"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with fast_path(mode):
            loss, count = task.loss_sum(dm, batch)
            loss.backward()
        torch.cuda.synchronize()
        results[mode] = (loss.item(), count, torch.cuda.max_memory_allocated() - base)
    (ref, n_ref, peak_ref), (got, n_got, peak_got) = results["off"], results["auto"]
    assert n_got == n_ref and abs(got - ref) < 1e-2 * abs(ref)
    assert peak_got < 0.5 * peak_ref


_TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
_TINY_BY_TYPE = {
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=1, eos_token_id=2),
    "opt": dict(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                     eos_token_id=2),
}


@pytest.mark.parametrize("model_type", sorted(PLAIN_HEAD_TYPES))
def test_every_listed_architecture_returns_its_heads_input_unchanged(model_type):
    # the allowlist's promise: with the head swapped out, the model's loss is unchanged
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **_TINY_BY_TYPE.get(model_type, _TINY))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert plain_head(model) is not None
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss
        total, count = causal_lm_loss_sum(model, ids, lambda: model(input_ids=ids))
    assert count == 18 and abs(total.item() / count - ref.item()) < 1e-5 * ref.item()
