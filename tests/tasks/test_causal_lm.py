"""Causal-LM SFT encoding: tokens and loss masks by hand, loss against a hand computation."""

from __future__ import annotations

import pytest
import torch

from deltatune.core.errors import DataError
from deltatune.tasks import IGNORE, CausalLMSFT
from tests.conftest import tiny_llama
from tests.tiny_tokenizer import char_tokenizer, ids

PAD, BOS, EOS, START, END = 0, 1, 2, 4, 5


def test_plain_prompt_response_masks_the_prompt():
    task = CausalLMSFT(char_tokenizer(), chat_template=False)
    ex = task.encode({"prompt": "ab", "response": "cd"})
    prompt = ids("ab\n")
    assert ex["input_ids"] == prompt + ids("cd") + [EOS]
    assert ex["labels"] == [IGNORE] * 3 + ids("cd") + [EOS]
    assert ex["prompt_len"] == 3
    assert task.count_items(ex) == 3  # c, d, </s> are predicted; the prompt is not


def test_chat_template_supervises_the_assistant_turn_and_its_end_marker():
    task = CausalLMSFT(char_tokenizer(chat=True))
    ex = task.encode({"prompt": "ab", "response": "cd"})
    head = [START, *ids("user\nab"), END, *ids("\n"), START, *ids("assistant\n")]
    answer = [*ids("cd"), END, *ids("\n")]
    assert ex["input_ids"] == head + answer
    assert ex["labels"] == [IGNORE] * len(head) + answer
    assert ex["prompt_len"] == len(head)


def test_multi_turn_messages_supervise_every_assistant_turn_only():
    task = CausalLMSFT(char_tokenizer(chat=True))
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    ex = task.encode({"messages": msgs})
    supervised = [t for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE]
    assert supervised == [*ids("a1"), END, *ids("\n"), *ids("a2"), END, *ids("\n")]
    # generation prompt = everything before the last assistant answer
    assert ex["input_ids"][ex["prompt_len"]:] == [*ids("a2"), END, *ids("\n")]
    assert ex["references"] == ["a2"]


def test_collate_pads_on_the_right_and_masks_padding():
    task = CausalLMSFT(char_tokenizer(), chat_template=False)
    exs = [task.encode({"prompt": "a", "response": "b"}),
           task.encode({"prompt": "abc", "response": "de"})]
    batch = task.collate(exs)
    assert batch["input_ids"][0].tolist() == ids("a\nb") + [EOS] + [PAD] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 3
    assert batch["labels"][0].tolist() == [IGNORE] * 2 + ids("b") + [EOS] + [IGNORE] * 3


def test_loss_sum_equals_hand_computed_masked_cross_entropy():
    task = CausalLMSFT(char_tokenizer(), chat_template=False)
    exs = [task.encode({"prompt": "hi", "response": "yo"}),
           task.encode({"prompt": "hello", "response": "x"})]
    batch = task.collate(exs)
    model = tiny_llama().double()
    loss, n = task.loss_sum(model, batch)
    logp = torch.log_softmax(model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits, -1)
    expected, count = 0.0, 0
    for b, ex in enumerate(exs):
        for t in range(len(ex["input_ids"]) - 1):
            target = ex["labels"][t + 1]
            if target != IGNORE:
                expected -= float(logp[b, t, target].detach())
                count += 1
    assert n == count == 3 + 2  # "yo</s>" and "x</s>"
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_pad_equal_to_eos_is_replaced_by_a_distinct_pad_token():
    tok = char_tokenizer(pad=False)
    tok.pad_token = tok.eos_token
    task = CausalLMSFT(tok, chat_template=False)
    assert task.pad_id == PAD and task.pad_id != tok.eos_token_id
    assert "pad token set" in task.pad_note


def test_bad_rows_name_the_row_and_the_column():
    task = CausalLMSFT(char_tokenizer(), chat_template=False)
    with pytest.raises(DataError, match=r"training data row 2: missing column 'response'"):
        task.encode_rows([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "training data")
    with pytest.raises(DataError, match=r"row 1: column 'response' must be str, got int"):
        task.encode_rows([{"prompt": "a", "response": 3}])
    with pytest.raises(DataError, match="no 'assistant' message"):
        task.encode_rows([{"messages": [{"role": "user", "content": "x"}]}])


def test_truncation_is_counted_and_refused_above_the_threshold():
    task = CausalLMSFT(char_tokenizer(), chat_template=False, max_length=8)
    rows = [{"prompt": "a", "response": "b"}] * 3 + [{"prompt": "abc", "response": "defghij"}]
    with pytest.raises(DataError, match=r"1 of 4 examples are longer than max_length=8"):
        task.encode_rows(rows)
    lenient = CausalLMSFT(char_tokenizer(), chat_template=False, max_length=8, max_truncated=0.5)
    out = lenient.encode_rows(rows)
    assert lenient.stats.truncated == 1 and len(out[3]["input_ids"]) == 8
    # a prompt that fills max_length leaves no response token: the row is dropped, counted
    dropper = CausalLMSFT(char_tokenizer(), chat_template=False, max_length=4, max_truncated=1)
    out = dropper.encode_rows([{"prompt": "abcdef", "response": "x"}, {"prompt": "a",
                                                                       "response": "b"}])
    assert len(out) == 1 and dropper.stats.dropped == 1


def test_generate_greedy_matches_manual_argmax_decoding():
    task = CausalLMSFT(char_tokenizer(), chat_template=False, max_new_tokens=3)
    model = tiny_llama()
    exs = [task.encode({"prompt": "ab", "response": "c"}),
           task.encode({"prompt": "abcd", "response": "e"})]
    texts = task.generate(model, exs)
    for ex, text in zip(exs, texts):
        seq = torch.tensor([ex["input_ids"][:ex["prompt_len"]]])
        for _ in range(3):
            nxt = model(input_ids=seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
            if int(nxt) == EOS:
                break
        expect = task.tokenizer.decode(seq[0, ex["prompt_len"]:].tolist(),
                                       skip_special_tokens=True).strip()
        assert text == expect
