"""P-tuning v2: deep prompts + trained head, sequence labelling, shared prompts, save/load."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import DeltaStateError
from tests.conftest import VOCAB, randomize_deltas, tiny_bert, tiny_roberta
from tests.helpers import adam_losses, save_and_reload


def _train(dm, batch, steps=30, lr=5e-2):
    losses = adam_losses(dm, lambda: dm(**batch).loss, steps=steps, lr=lr)
    dm.eval()
    return losses


@pytest.mark.parametrize("factory", [tiny_bert, tiny_roberta])
def test_classification_trains_prompts_and_head_only(factory):
    dm = dt.attach(factory(), dt.PTuningV2Config(prompt_length=4))
    trainable = sorted(n for n, p in dm.named_parameters() if p.requires_grad)
    assert any(n.endswith("deltatune_model_deltas.default.prefix_weight") for n in trainable)
    assert all("deltatune_model_deltas" in n or ".copies.default." in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    ids = torch.randint(3, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 2
    losses = _train(dm, {"input_ids": ids, "labels": labels})
    assert losses[-1] < 0.6 * losses[0]


def test_sequence_labelling_bio_tags_and_right_padding():
    dm = dt.attach(tiny_bert(task="token-classification"), dt.PTuningV2Config(prompt_length=4))
    ids = torch.randint(3, VOCAB, (6, 7), generator=torch.Generator().manual_seed(1))
    tags = (ids % 3)                       # a learnable per-token rule: B/I/O from the id
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    tags[0, 5:] = -100
    losses = _train(dm, {"input_ids": ids, "attention_mask": mask, "labels": tags}, steps=40)
    assert losses[-1] < 0.7 * losses[0]
    # Per token: a padded row equals the same row alone, token for token.
    out = dm(input_ids=ids, attention_mask=mask).logits
    alone = dm(input_ids=ids[:1, :5]).logits
    torch.testing.assert_close(out[0, :5], alone[0], atol=1e-5, rtol=1e-5)
    assert out.shape == (6, 7, 3)          # no prompt positions: prompts live in attention


def test_save_load_with_head(tmp_path):
    dm = dt.attach(tiny_bert(), dt.PTuningV2Config(prompt_length=3))
    randomize_deltas(dm, std=0.3)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    before = dm(input_ids=ids).logits
    dm.save_delta(tmp_path / "v2")
    keys = set(dt.read_delta_directory(tmp_path / "v2").tensors)
    assert "prefix" in keys and any(k.startswith("classifier") for k in keys)
    loaded = dt.load(tiny_bert(), tmp_path / "v2")
    torch.testing.assert_close(loaded(input_ids=ids).logits, before)
    with loaded.disabled():
        assert (loaded(input_ids=ids).logits - before).abs().max() > 1e-3


def test_reparameterised_variant_saves_plain_prompts(tmp_path):
    dm = dt.attach(tiny_bert(), dt.PTuningV2Config(prompt_length=3, reparameterize=True,
                                                   reparam_hidden=8))
    randomize_deltas(dm, std=0.3)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    before = dm(input_ids=ids).logits
    loaded = save_and_reload(dm, tmp_path / "v2", tiny_bert)
    assert loaded.get_delta("default").config.reparameterize is False
    torch.testing.assert_close(loaded(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)


def test_prompts_shared_across_tasks():
    dm = dt.DeltaModel(tiny_bert())
    dm.add("task_a", dt.PTuningV2Config(prompt_length=3))
    dm.add("task_b", dt.PTuningV2Config(prompt_length=3, share_prompts_with="task_a"))
    a = dm.get_delta("task_a").method.part(dm.get_delta("task_a"))
    b = dm.get_delta("task_b").method.part(dm.get_delta("task_b"))
    assert a.prefix_weight is b.prefix_weight
    before = a.prefix_weight.detach().clone()
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(4))
    _train(dm, {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 0])}, steps=2)  # task_b
    assert not torch.equal(a.prefix_weight.detach(), before)   # task_a's prompts moved too
    with pytest.raises(DeltaStateError, match="share_prompts_with"):
        dm.add("task_c", dt.PTuningV2Config(share_prompts_with="missing"))
