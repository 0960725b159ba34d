"""GraphDecoder: static-cache greedy decoding (eager on CPU, CUDA graph on GPU) against HF
``generate``, and adapter switching by in-place copy without a new capture."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.kernels.graph_decode import GraphDecoder


def _model(adapter_seed: int = 0) -> dt.DeltaModel:
    """A tiny Llama (the same base every time) with LoRA weights picked by ``adapter_seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=None)).eval()  # no EOS: HF would forbid it before min_new_tokens
    dm = dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    _randomize(dm, adapter_seed)
    return dm


def _randomize(dm: dt.DeltaModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in dm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _hf(dm: dt.DeltaModel, ids: torch.Tensor, new: int) -> torch.Tensor:
    out = dm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                      do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_static_cache_decode_matches_hf_generate_and_adapter_swap():
    dm = _model()
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    gd = GraphDecoder(dm, batch=3, max_len=16)
    assert torch.equal(gd.generate(ids, 8), _hf(dm, ids, 8))
    # swap in another adapter's weights in place: same decoder, the other adapter's tokens
    other = _model(adapter_seed=5)
    expect = _hf(other, ids, 8)
    dm.load_delta_state_dict(other.delta_state_dict())
    got = gd.generate(ids, 8)
    assert torch.equal(got, expect)
    assert not torch.equal(got, _hf(_model(), ids, 8))  # the swap changed the output


def test_decoder_refuses_a_prompt_that_does_not_fit():
    gd = GraphDecoder(_model(), batch=2, max_len=8)
    with pytest.raises(dt.ConfigError, match="does not fit"):
        gd.generate(torch.ones(2, 5, dtype=torch.long), 4)


def _left_padded(lengths: list[int], seed: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of these lengths, left-padded with token 0, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def test_left_padded_prompts_decode_as_hf_generate_and_as_each_row_alone():
    dm = _model()
    ids, mask = _left_padded([5, 2, 7])
    want = dm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                       pad_token_id=0)[:, ids.shape[1]:]
    gd = GraphDecoder(dm, 3, 20)
    got = gd.generate(ids, 8, attention_mask=mask)
    assert torch.equal(got, want)
    for row in range(3):  # the padding changes nothing: each prompt decoded alone
        alone = ids[row:row + 1, mask[row].bool()]
        assert torch.equal(GraphDecoder(dm, 1, 20).generate(alone, 8), got[row:row + 1])
    # equal lengths after padded ones: the unpadded path again, same tokens as without mask
    same, ones = _left_padded([4, 4, 4])
    assert torch.equal(gd.generate(same, 8, attention_mask=ones), gd.generate(same, 8))
    assert not gd.padded


def test_left_padding_positions_count_real_tokens_for_absolute_positions():
    # Llama's rotary positions are shift-invariant; GPT-2 adds absolute position
    # embeddings, so a row's positions must start at its first real token, as in HF
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=None,
        bos_token_id=None, tie_word_embeddings=False)).eval()
    with torch.no_grad():  # larger weights than the default init: tokens that vary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    dm = dt.attach(model, dt.LoraConfig(r=4, target_modules=["c_attn"]))
    ids, mask = _left_padded([5, 2, 7])
    want = dm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                       pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(GraphDecoder(dm, 3, 20).generate(ids, 8, attention_mask=mask), want)


def test_decoder_refuses_right_padding_and_a_mismatched_mask():
    gd = GraphDecoder(_model(), batch=2, max_len=16)
    ids, mask = _left_padded([3, 5])
    with pytest.raises(dt.ConfigError, match="padding_side='left'"):
        gd.generate(ids, 4, attention_mask=mask.flip(1))
    with pytest.raises(dt.ConfigError, match="at least one token"):
        gd.generate(ids, 4, attention_mask=torch.zeros_like(mask))
    with pytest.raises(dt.ConfigError, match="must match"):
        gd.generate(ids, 4, attention_mask=mask[:, 1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_with_left_padding_equals_eager():
    dm = _model().cuda()
    ids, mask = _left_padded([6, 3, 1, 5])
    ids, mask = ids.cuda(), mask.cuda()
    want = GraphDecoder(dm, 4, 32, use_graph=False).generate(ids, 10, attention_mask=mask)
    gd = GraphDecoder(dm, 4, 32)
    assert torch.equal(gd.generate(ids, 10, attention_mask=mask), want)
    other, other_mask = _left_padded([2, 6, 6, 4], seed=9)
    other, other_mask = other.cuda(), other_mask.cuda()
    want2 = GraphDecoder(dm, 4, 32, use_graph=False).generate(other, 10,
                                                              attention_mask=other_mask)
    assert torch.equal(gd.generate(other, 10, attention_mask=other_mask), want2)
    assert gd.captures == 2  # same prompt width: the padded step and prefill graphs reused
    plain = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(2)).cuda()
    assert torch.equal(gd.generate(plain, 10),
                       GraphDecoder(dm, 4, 32, use_graph=False).generate(plain, 10))
    assert gd.captures == 4  # the unpadded kind has graphs of its own


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager_and_swaps_without_recapture():
    dm = _model().cuda()
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(2)).cuda()
    eager = GraphDecoder(dm, 4, 32, use_graph=False).generate(ids, 10)
    gd = GraphDecoder(dm, 4, 32)
    assert torch.equal(gd.generate(ids, 10), eager)
    other = _model(adapter_seed=5).cuda()
    want = GraphDecoder(other, 4, 32, use_graph=False).generate(ids, 10)
    dm.load_delta_state_dict(other.delta_state_dict())
    # memory freed since the capture is handed out again: the graphs must not read any
    junk = [torch.full((1 << 14,), 7, device="cuda") for _ in range(64)]
    assert torch.equal(gd.generate(ids, 10), want)
    del junk
    assert gd.captures == 2  # the decode step and the 6-token prompt's prefill
    # another prompt length: one more prefill graph, tokens still those of eager decoding
    longer = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(3)).cuda()
    want = GraphDecoder(dm, 4, 32, use_graph=False).generate(longer, 10)
    assert torch.equal(gd.generate(longer, 10), want)
    assert gd.captures == 3
    eager_prefill = GraphDecoder(dm, 4, 32, graph_prefill=False)
    assert torch.equal(eager_prefill.generate(longer, 10), want)
    assert eager_prefill.captures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_batch_graph_follows_an_in_place_adapter_switch():
    # the mixed path reads cached side-by-side layouts; generate() rewrites them in place
    dm = _model().cuda()
    dm.add("b", dt.LoraConfig(r=4, target_modules="all-linear"))
    _randomize(dm, 3)
    kw = {"delta_names": ["default", "b", None, "default"]}
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(4)).cuda()
    gd = GraphDecoder(dm, 4, 32, forward_kwargs=kw)
    before = gd.generate(ids, 10)
    dm.load_delta_state_dict(_model(adapter_seed=5).delta_state_dict(), "default")
    want = GraphDecoder(dm, 4, 32, use_graph=False, forward_kwargs=kw).generate(ids, 10)
    got = gd.generate(ids, 10)
    assert torch.equal(got, want) and not torch.equal(got, before)
    assert gd.captures == 2


def test_mixed_batch_layouts_keep_their_tensors_across_a_switch():
    # what the CUDA-graph test above relies on, checked on the CPU: after an in-place
    # switch, decoding rewrites the cached layouts in place (same tensors, new values)
    from deltatune.kernels import fast_path

    dm = _model()
    dm.add("b", dt.LoraConfig(r=4, target_modules="all-linear"))
    _randomize(dm, 3)
    kw = {"delta_names": ["default", "b", None]}
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    with fast_path("on"):
        gd = GraphDecoder(dm, 3, 16, forward_kwargs=kw)
        before = gd.generate(ids, 6)
        banks = [m.__dict__["_lora_bank"] for m in dm.model.modules()
                 if "_lora_bank" in m.__dict__]
        held = [id(t) for b in banks for lay in b._layouts.values() for t in lay
                if isinstance(t, torch.Tensor)]
        assert held
        dm.load_delta_state_dict(_model(adapter_seed=5).delta_state_dict(), "default")
        got = gd.generate(ids, 6)
    with fast_path("off"):
        want = GraphDecoder(dm, 3, 16, forward_kwargs=kw).generate(ids, 6)
    assert torch.equal(got, want) and not torch.equal(got, before)
    assert [id(t) for b in banks for lay in b._layouts.values() for t in lay
            if isinstance(t, torch.Tensor)] == held


def test_prompt_runs_again_when_the_adapters_changed_behind_it(monkeypatch):
    # generate() launches the prompt before checking the adapters (the check overlaps it);
    # a change found then means the prompt read stale layouts: it runs again, from an
    # empty cache, and decoding equals a fresh decoder's
    from deltatune.kernels import multi_lora

    dm = _model()
    dm.add("b", dt.LoraConfig(r=4, target_modules="all-linear"))
    _randomize(dm, 3)
    kw = {"delta_names": ["default", "b", None]}
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    want = GraphDecoder(dm, 3, 16, forward_kwargs=kw).generate(ids, 6)
    gd = GraphDecoder(dm, 3, 16, forward_kwargs=kw)
    calls, changed = [], [0]
    prefill = gd._prefill
    monkeypatch.setattr(gd, "_prefill", lambda prompt: calls.append(1) or prefill(prompt))
    monkeypatch.setattr(multi_lora, "refresh_layouts", lambda banks, owner=None: changed[0])
    assert torch.equal(gd.generate(ids, 6), want) and len(calls) == 1
    changed[0] = 3
    assert torch.equal(gd.generate(ids, 6), want) and len(calls) == 3


def _three_adapters() -> dt.DeltaModel:
    """The tiny Llama with "default", "b" (all linears) and "c" (q and v only)."""
    dm = _model()
    dm.add("b", dt.LoraConfig(r=4, target_modules="all-linear"))
    dm.add("c", dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _randomize(dm, 3)
    return dm


def _pooled_tensors(dm) -> list[tuple[int, torch.Tensor]]:
    """(id, tensor) of every layout and pooled per-row tensor of the mixed-batch caches."""
    from deltatune.kernels.multi_lora import banks_of

    out = []
    for bank in banks_of(dm):
        out += [t for lay in bank._layouts.values() for t in lay if isinstance(t, torch.Tensor)]
        out += [e[1] for k, e in bank._rows.items() if k[0] == "pooled"]
    return [(id(t), t.clone()) for t in out]


def test_pooled_decoder_reroutes_rows_in_place_per_call():
    # adapters=[...]: the layouts stack all three adapters whatever the rows use, and
    # another row assignment rewrites the rows' index tensors in place (what a captured
    # graph needs: it runs no Python); tokens equal a decoder built for each assignment
    from deltatune.kernels import fast_path

    dm = _three_adapters()
    ids = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(4))
    first, second = ["default", "b", None, "c"], ["c", "c", "b", None]
    with fast_path("off"):
        want = [GraphDecoder(dm, 4, 16, forward_kwargs={"delta_names": rows}).generate(ids, 6)
                for rows in (first, second)]
    assert not torch.equal(want[0], want[1])
    with fast_path("on"):
        gd = GraphDecoder(dm, 4, 16, adapters=["default", "b", "c"])
        assert torch.equal(gd.generate(ids, 6, delta_names=first), want[0])
        held = _pooled_tensors(dm)
        assert len(held) > 14  # layouts of 14 linears plus their rows' index tensors
        assert torch.equal(gd.generate(ids, 6, delta_names=second), want[1])
        now = _pooled_tensors(dm)
        assert [i for i, _ in now] == [i for i, _ in held]  # the same tensors...
        assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(held, now))  # rewritten
        assert torch.equal(gd.generate(ids, 6, delta_names=first), want[0])
    # every row on the base model (no delta_names: the same)
    with fast_path("off"), dm.disabled():
        base = GraphDecoder(dm, 4, 16).generate(ids, 6)
    with fast_path("on"):
        assert torch.equal(gd.generate(ids, 6, delta_names=[None] * 4), base)
        assert torch.equal(gd.generate(ids, 6), base)


def test_pooled_decoder_refuses_rows_it_cannot_route():
    dm = _three_adapters()
    with pytest.raises(dt.ConfigError, match=r"'x', not among this decoder's adapters"):
        GraphDecoder(dm, 2, 16, adapters=["b"]).generate(
            torch.ones(2, 3, dtype=torch.long), 2, delta_names=["b", "x"])
    with pytest.raises(dt.ConfigError, match="2 entries for a batch of 3"):
        GraphDecoder(dm, 3, 16, adapters=["b"]).generate(
            torch.ones(3, 3, dtype=torch.long), 2, delta_names=["b", None])
    with pytest.raises(dt.ConfigError, match="build it with adapters="):
        GraphDecoder(dm, 2, 16).generate(torch.ones(2, 3, dtype=torch.long), 2,
                                         delta_names=["b", None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_pooled_decoder_reroutes_without_recapture():
    dm = _three_adapters().cuda()
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(4)).cuda()
    gd = GraphDecoder(dm, 4, 32, adapters=["default", "b", "c"])
    for rows in (["default", "b", None, "c"], ["c", "c", "b", None], [None] * 4,
                 ["b", "default", "default", "c"]):
        want = GraphDecoder(dm, 4, 32, use_graph=False,
                            forward_kwargs={"delta_names": rows}).generate(ids, 10)
        assert torch.equal(gd.generate(ids, 10, delta_names=rows), want)
    assert gd.captures == 2  # one step graph and one prompt graph for every assignment


def test_eos_stops_rows_and_decoding_as_hf_generate_does():
    dm = _model()
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    free = GraphDecoder(dm, 3, 40).generate(ids, 30)
    # an EOS that row 0 produces early and some other row later or never
    eos = int(free[0, 2])
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=eos)
    want = dm.generate(ids, attention_mask=torch.ones_like(ids), **kw)[:, ids.shape[1]:]
    gd = GraphDecoder(dm, 3, 40, eos_token_id=eos, pad_token_id=0)
    got = gd.generate(ids, 30)
    assert torch.equal(got, want)
    assert got[0, 2] == eos and (got[0, 3:] == 0).all()  # padded after its EOS
    # a second call starts every row afresh
    assert torch.equal(gd.generate(ids, 30), want)
    # every row finishing stops decoding early: the result ends where the last one did
    same = ids[:1].repeat(3, 1)  # identical rows finish together
    eos = int(GraphDecoder(dm, 3, 40).generate(same, 30)[0, 3])
    got = GraphDecoder(dm, 3, 40, eos_token_id=eos).generate(same, 30)
    want = dm.generate(same, attention_mask=torch.ones_like(same), **{**kw, "eos_token_id": eos})
    assert got.shape[1] <= 4 and torch.equal(got, want[:, same.shape[1]:])


def test_several_eos_ids_stop_rows_as_hf_generate_does():
    dm = _model()
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    free = GraphDecoder(dm, 3, 40).generate(ids, 30)
    # two stop tokens: one that row 0 produces early, one that row 1 produces
    eos = [int(free[0, 2]), int(free[1, 4])]
    want = dm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30,
                       do_sample=False, pad_token_id=0, eos_token_id=eos)[:, ids.shape[1]:]
    got = GraphDecoder(dm, 3, 40, eos_token_id=eos, pad_token_id=0).generate(ids, 30)
    assert torch.equal(got, want)
    for row in got:  # padding after the first of either stop token
        stops = [i for i, t in enumerate(row.tolist()) if t in eos]
        assert stops and (row[stops[0] + 1:] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_with_eos_equals_eager():
    dm = _model().cuda()
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(2)).cuda()
    eos = int(GraphDecoder(dm, 4, 40).generate(ids, 20)[1, 4])
    want = GraphDecoder(dm, 4, 40, use_graph=False, eos_token_id=eos).generate(ids, 20)
    gd = GraphDecoder(dm, 4, 40, eos_token_id=eos)
    assert torch.equal(gd.generate(ids, 20), want) and torch.equal(gd.generate(ids, 20), want)


def test_pooled_left_padded_decoding_with_stop_tokens_matches_hf_generate():
    # everything at once: rows of different lengths, each through its own adapter (chosen
    # per call), two stop tokens; HF generate with the same routing is the reference
    dm = _three_adapters()
    ids, mask = _left_padded([5, 2, 7, 4])
    gd = GraphDecoder(dm, 4, 24, adapters=["default", "b", "c"], eos_token_id=None)
    for rows in (["default", "b", None, "c"], ["c", None, "b", "b"]):
        free = gd.generate(ids, 10, attention_mask=mask, delta_names=rows)
        eos = [int(free[0, 3]), int(free[2, 5])]
        want = dm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           pad_token_id=0, eos_token_id=eos, delta_names=rows)
        got = GraphDecoder(dm, 4, 24, adapters=["default", "b", "c"], eos_token_id=eos,
                           pad_token_id=0).generate(ids, 10, attention_mask=mask,
                                                    delta_names=rows)
        assert torch.equal(got, want[:, ids.shape[1]:ids.shape[1] + got.shape[1]])
        assert want.shape[1] - ids.shape[1] == got.shape[1]


def test_pooled_decoder_routes_other_methods_too():
    # IA3 rows take the generic per-row path (no stacked layouts); pooling changes nothing
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)).eval()
    dm = dt.attach(model, dt.IA3Config(), name="x")
    dm.add("y", dt.IA3Config())
    _randomize_all(dm)
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(8))
    gd = GraphDecoder(dm, 3, 16, adapters=["x", "y"])
    with dm.disabled():
        base = GraphDecoder(dm, 3, 16).generate(ids, 6)
    for rows in (["x", "y", None], [None, "x", "x"]):
        want = GraphDecoder(dm, 3, 16, forward_kwargs={"delta_names": rows}).generate(ids, 6)
        assert torch.equal(gd.generate(ids, 6, delta_names=rows), want)
        assert not torch.equal(want, base)  # the adapters change the tokens


def _randomize_all(dm: dt.DeltaModel) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in dm.delta_names:
            for p in dm.get_delta(name).parameters():
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.5)
