"""MPT: decomposed prompts per row, distillation loss by hand, source and target stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.errors import ConfigError, DataError
from deltatune.methods.mpt import distill_step, distillation_loss, start_from_source
from tests.conftest import VOCAB, tiny_gpt2, tiny_t5

L = 3


def _part(dm, name="default"):
    return dm.get_delta(name).method.part(dm.get_delta(name))


def test_rows_get_their_tasks_prompt_shared_times_rank_one():
    dm = dt.attach(tiny_gpt2(), dt.MPTConfig(prompt_length=L, num_tasks=3))
    part = _part(dm)
    with torch.no_grad():
        part.task_cols.normal_()
        part.task_rows.normal_()
    ids = torch.randint(5, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    tasks = torch.tensor([2, 0])
    ours = dm(input_ids=ids, task_ids=tasks).logits
    for row, k in enumerate(tasks.tolist()):
        # P_k = P* ∘ (u_k v_k^T), u_k: l x 1, v_k: 1 x e
        prompt = part.shared * (part.task_cols[k] @ part.task_rows[k])
        embeds = torch.cat([prompt[None], dm.model.get_input_embeddings()(ids[row:row + 1])], 1)
        with dm.disabled():
            ref = dm.model(inputs_embeds=embeds.detach()).logits
        torch.testing.assert_close(ours[row:row + 1], ref, atol=1e-5, rtol=1e-5)


def test_init_makes_every_task_prompt_the_shared_prompt():
    dm = dt.attach(tiny_gpt2(), dt.MPTConfig(prompt_length=L, num_tasks=2))
    part = _part(dm)
    torch.testing.assert_close(part.task_prompts(torch.tensor([0, 1])),
                               part.shared.expand(2, -1, -1))


def test_distillation_loss_by_hand():
    class Out:
        def __init__(self, logits, hidden):
            self.logits, self.hidden_states = logits, (hidden * 0, hidden)

    gen = torch.Generator().manual_seed(0)
    s = Out(torch.randn(2, 6, 5, generator=gen), torch.randn(2, 6, 4, generator=gen))
    t = Out(torch.randn(2, 7, 5, generator=gen), torch.randn(2, 7, 4, generator=gen))
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    got = distillation_loss(s, t, attention_mask=mask, temperature=2.0)
    sl, tl = s.logits[:, -4:][mask.bool()], t.logits[:, -4:][mask.bool()]
    kl = F.kl_div(F.log_softmax(sl / 2, -1), F.log_softmax(tl / 2, -1), log_target=True,
                  reduction="batchmean") * 4
    sh, th = s.hidden_states[-1][:, -4:][mask.bool()], t.hidden_states[-1][:, -4:][mask.bool()]
    torch.testing.assert_close(got, kl + F.mse_loss(sh, th))
    assert distillation_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_source_stage_distils_teachers_and_target_stage_starts_from_shared_prompt():
    dm = dt.DeltaModel(tiny_gpt2())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(5, VOCAB, (4, 6), generator=gen) for _ in range(2)]
    for k in range(2):   # one prompt-tuning teacher per source task (a real run trains them)
        dm.add(f"teacher{k}", dt.PromptTuningConfig(prompt_length=L, init="random", seed=k))
    dm.add("source", dt.MPTConfig(prompt_length=L, num_tasks=2))
    opt = torch.optim.Adam(_part(dm, "source").parameters(), lr=3e-2)
    dm.train()
    losses = []
    for _ in range(12):
        total = 0.0
        for k, ids in enumerate(batches):
            loss = distill_step(dm, {"input_ids": ids, "labels": ids}, task_id=k,
                                teacher=f"teacher{k}", student="source")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total)
    assert losses[-1] < losses[0]
    for k in range(2):     # teachers are frozen while distilling
        assert not any(p.requires_grad for p in dm.get_delta(f"teacher{k}").parameters())
    dm.add("target", dt.MPTConfig(prompt_length=L))
    start_from_source(dm, "target", "source")
    tgt = _part(dm, "target")
    torch.testing.assert_close(tgt.shared, _part(dm, "source").shared)
    assert torch.equal(tgt.task_cols, torch.ones_like(tgt.task_cols))
    dm(input_ids=batches[0])    # one task: task_ids may be left out


def test_save_load_and_t5(tmp_path):
    dm = dt.attach(tiny_t5(), dt.MPTConfig(prompt_length=L, num_tasks=2))
    with torch.no_grad():
        _part(dm).task_rows.normal_()
    ids = torch.randint(5, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :2], "task_ids": torch.tensor([1, 0])}
    before = dm(**inputs).logits
    dm.save_delta(tmp_path / "m")
    assert set(dt.read_delta_directory(tmp_path / "m").tensors) == {"shared", "task_cols",
                                                                    "task_rows"}
    loaded = dt.load(tiny_t5(), tmp_path / "m")
    torch.testing.assert_close(loaded(**inputs).logits, before)
    out = loaded.generate(input_ids=ids, task_ids=torch.tensor([1, 0]), max_new_tokens=3)
    assert out.shape[0] == 2


def test_bad_task_ids():
    dm = dt.attach(tiny_gpt2(), dt.MPTConfig(prompt_length=L, num_tasks=2))
    ids = torch.randint(5, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ConfigError, match="task_ids"):
        dm(input_ids=ids)
    with pytest.raises(DataError, match="outside"):
        dm(input_ids=ids, task_ids=torch.tensor([0, 5]))
    with pytest.raises(DataError, match="entries"):
        dm(input_ids=ids, task_ids=torch.tensor([0]))
