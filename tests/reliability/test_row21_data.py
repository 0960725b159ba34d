"""RELIABILITY.md row 21 (bad input: data pipeline), on the readers and the SFT task.

Malformed JSONL rows are a ``DataError`` with the line number; an empty data set (or one
emptied by encoding) is a ``DataError`` naming the source before any training; examples
longer than ``max_length`` are cut and counted, and more than ``max_truncated`` of them
is an error; a tokenizer without a pad token gets a dedicated pad distinct from eos, so
EOS labels are never masked as padding; a training step whose labels are all masked is
skipped and counted, never a NaN loss.
"""

from __future__ import annotations

import pytest

from deltatune import data
from deltatune.core.errors import DataError
from deltatune.tasks import CausalLMSFT
from tests.tiny_tokenizer import char_tokenizer


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "respo\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2: not valid JSON"):
        data.read(path)
    path.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        data.read(path)


def test_an_empty_data_set_is_an_error_naming_the_source(tmp_path):
    task = CausalLMSFT(char_tokenizer(), max_length=40, generate_examples=0)
    with pytest.raises(DataError, match="train.jsonl"):
        path = tmp_path / "train.jsonl"
        path.write_text("")
        task.encode_rows(data.read(path), str(path))


def test_truncation_is_counted_and_too_much_is_an_error():
    task = CausalLMSFT(char_tokenizer(), max_length=24, generate_examples=0, max_truncated=0.5)
    rows = [{"prompt": "p", "response": "r" * n} for n in (2, 3, 40, 4)]
    examples = task.encode_rows(rows, "rows")
    assert len(examples) == 4 and all(len(e["input_ids"]) <= 24 for e in examples)
    strict = CausalLMSFT(char_tokenizer(), max_length=24, generate_examples=0,
                         max_truncated=0.1)
    with pytest.raises(DataError, match=r"truncat"):
        strict.encode_rows(rows, "rows")


def test_a_tokenizer_without_pad_gets_a_pad_distinct_from_eos():
    tok = char_tokenizer(pad=False)
    assert tok.pad_token is None
    task = CausalLMSFT(tok, max_length=40, generate_examples=0)
    assert task.pad_id != tok.eos_token_id
    example = task.encode_rows([{"prompt": "q", "response": "a"}], "rows")[0]
    batch = task.collate([example, task.encode_rows([{"prompt": "q", "response": "longer"}],
                                                    "rows")[0]])
    # The eos at the end of the short response is still a label, not masked as padding.
    labels = batch["labels"][0].tolist()
    assert tok.eos_token_id in labels


def test_an_all_masked_step_is_skipped_and_counted_never_nan(tmp_path):
    """Row 21, trainer side: a step whose batches have every label masked (-100) is
    skipped and counted, never a NaN loss; the weights are exactly those of the step
    before (checked against a run stopped there), and training goes on after it."""
    import torch

    import deltatune as dt
    from deltatune.tasks import Encoded
    from deltatune.train import TrainConfig, Trainer
    from tests.conftest import tiny_llama
    from tests.reliability._train_setup import ROWS

    task = CausalLMSFT(char_tokenizer(), max_length=40, generate_examples=0)
    examples = [task.encode(r) for r in ROWS[:6]]  # batch 2 -> 3 optimizer steps an epoch

    def trainer(data, max_steps: int, out: str) -> Trainer:
        torch.manual_seed(0)
        dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        return Trainer(dm, task, Encoded(data), None, TrainConfig(
            output_dir=str(tmp_path / out), epochs=1, max_steps=max_steps, batch_size=2,
            lr=1e-2, schedule="constant", seed=3, progress=False, save_every=None))

    (second,) = trainer(examples, 3, "probe").window(1)  # the examples of optimizer step 2
    masked = [dict(e, labels=[-100] * len(e["labels"])) if i in second else e
              for i, e in enumerate(examples)]
    run = trainer(masked, 3, "masked")
    result = run.fit()
    assert result.skipped_steps == 1
    assert {"step": 2, "skipped": "every label in this step's batches is masked"} in \
        result.history
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # Step 2 changed nothing: a run of 2 steps ends where a run of 1 step does ...
    two, one = trainer(masked, 2, "two"), trainer(masked, 1, "one")
    two.fit()
    one.fit()
    after_two, after_one = two.model.delta_state_dict(), one.model.delta_state_dict()
    assert all(torch.equal(after_two[k], v) for k, v in after_one.items())
    # ... and step 3 trained again.
    final = run.model.delta_state_dict()
    assert not all(torch.equal(final[k], v) for k, v in after_one.items())
