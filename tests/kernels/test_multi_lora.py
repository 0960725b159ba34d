"""Mixed-adapter batches: the batched layouts against the per-adapter loop."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.kernels import fast_path
from deltatune.kernels.multi_lora import (
    AdapterBank,
    concat_mask,
    multi_lora_concat,
    multi_lora_gathered,
    multi_lora_reference,
    stack_concat,
    stack_padded,
)
from tests.conftest import randomize_deltas, tiny_gpt2, tiny_llama, token_batch

RANKS = (2, 5, 3)


def _adapters(d_in=12, d_out=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, d_in, generator=g, dtype=dtype) for r in RANKS]
    Bs = [torch.randn(d_out, r, generator=g, dtype=dtype) for r in RANKS]
    return As, Bs, [0.5, 2.0, 1.25]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tokens", [1, 4, 7])
def test_both_layouts_equal_the_per_adapter_loop(tokens):
    As, Bs, scales = _adapters()
    rows = [2, -1, 0, 2, 1, 0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(rows), tokens, 12, generator=g, dtype=torch.float64)
    y = torch.randn(len(rows), tokens, 10, generator=g, dtype=torch.float64)
    ref = multi_lora_reference(x, y, rows, As, Bs, scales)
    a_stack, b_stack = stack_padded(As, Bs, scales, torch.float64)
    index = torch.tensor([k if k >= 0 else len(As) for k in rows])
    gathered = multi_lora_gathered(x, y.clone(), index, a_stack, b_stack)
    a_cat, b_cat, offsets = stack_concat(As, Bs, scales, torch.float64)
    mask = concat_mask(rows, offsets, torch.float64, x.device)
    concat = multi_lora_concat(x, y.clone(), mask, a_cat, b_cat)
    assert _rel(gathered, ref) < 1e-12 and _rel(concat, ref) < 1e-12
    # The base row is untouched.
    assert torch.equal(gathered[1], y[1]) and torch.equal(concat[1], y[1])


def test_bank_rebuilds_when_an_adapter_changes_in_place():
    As, Bs, scales = _adapters()
    bank = AdapterBank()
    rows = [0, 1, 2]
    x = torch.randn(3, 16, 12, dtype=torch.float64)
    y = torch.zeros(3, 16, 10, dtype=torch.float64)
    first = bank.apply(["a", "b", "c"], As, Bs, scales, rows, x, y.clone())
    held = [id(t) for layout in bank._layouts.values() for t in layout
            if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        Bs[1].mul_(3.0)
    second = bank.apply(["a", "b", "c"], As, Bs, scales, rows, x, y.clone())
    ref = multi_lora_reference(x, y, rows, As, Bs, scales)
    assert _rel(second, ref) < 1e-12
    assert not torch.allclose(first[1], second[1])
    # rewritten in place, not rebuilt: a captured graph holding them sees the new values
    assert [id(t) for layout in bank._layouts.values() for t in layout
            if isinstance(t, torch.Tensor)] == held


def test_gradients_flow_through_the_batched_layouts():
    As, Bs, scales = _adapters()
    leaves = [t.clone().requires_grad_() for t in (*As, *Bs)]
    rows = [1, 0, -1, 2]
    x = torch.randn(4, 3, 12, dtype=torch.float64)
    y = torch.randn(4, 3, 10, dtype=torch.float64)
    for tokens_x in (x, torch.randn(4, 20, 12, dtype=torch.float64)):
        yy = torch.randn(*tokens_x.shape[:-1], 10, dtype=torch.float64)
        out = AdapterBank().apply(["a", "b", "c"], leaves[:3], leaves[3:], scales, rows,
                                  tokens_x, yy)
        fast = torch.autograd.grad(out.square().sum(), leaves)
        ref_out = multi_lora_reference(tokens_x, yy, rows, leaves[:3], leaves[3:], scales)
        ref = torch.autograd.grad(ref_out.square().sum(), leaves)
        for a, b in zip(fast, ref):
            assert _rel(a, b) < 1e-12
    del y


def _three_adapters(factory=tiny_llama):
    dm = dt.attach(factory(), dt.LoraConfig(r=4, target_modules="all-linear"), name="a")
    dm.add("b", dt.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear"))
    third = ["q_proj", "v_proj"] if factory is tiny_llama else ["c_attn"]
    dm.add("c", dt.LoraConfig(r=8, target_modules=third))
    randomize_deltas(dm, std=0.2)
    return dm.eval()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("length", [1, 20])  # concatenated (<= DECODE_TOKENS), padded
def test_model_mixed_batch_fast_equals_plain(length, factory):
    dm = _three_adapters(factory)
    ids = token_batch(5, length)
    names = ["a", None, "c", "b", "a"]
    with torch.no_grad(), fast_path("off"):
        ref = dm(input_ids=ids, delta_names=names).logits
    with torch.no_grad(), fast_path("on"):
        fast = dm(input_ids=ids, delta_names=names).logits
        again = dm(input_ids=ids, delta_names=names).logits  # from the cached layouts
    assert _rel(fast, ref) < 1e-5
    assert torch.equal(fast, again)


def test_generate_with_mixed_adapters_matches_plain_path():
    dm = _three_adapters()
    ids = token_batch(3, 5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with fast_path("off"):
        ref = dm.generate(ids, delta_names=["b", "a", None], **kw)
    with fast_path("on"):
        fast = dm.generate(ids, delta_names=["b", "a", None], **kw)
    assert torch.equal(fast, ref)


def test_replacing_an_adapter_under_the_same_name_is_not_served_from_the_cache():
    dm = _three_adapters()
    ids = token_batch(3, 1)
    names = ["a", "b", "c"]
    with torch.no_grad(), fast_path("on"):
        dm(input_ids=ids, delta_names=names)  # fills the caches
        dm.delete("b")
        dm.add("b", dt.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear"))
        for p in dm.get_delta("b").parameters():
            p.normal_(std=0.3)
        fast = dm(input_ids=ids, delta_names=names).logits
    with torch.no_grad(), fast_path("off"):
        ref = dm(input_ids=ids, delta_names=names).logits
    assert _rel(fast, ref) < 1e-5


def _layout_tensors(bank: AdapterBank) -> list[torch.Tensor]:
    return [t for layout in bank._layouts.values() for t in layout
            if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("length", [1, 20])  # the concatenated and the padded layout
def test_refresh_rewrites_the_cached_layouts_in_place(length):
    # what a captured decode graph needs after an in-place adapter switch: the same
    # tensors (the graph reads them where they are), now holding the new values
    from deltatune.kernels.multi_lora import refresh_layouts

    dm = _three_adapters()
    ids = token_batch(3, length)
    names = ["a", "c", "b"]
    with torch.no_grad(), fast_path("on"):
        dm(input_ids=ids, delta_names=names)  # fills the caches
    banks = [m.__dict__["_lora_bank"] for m in dm.model.modules()
             if "_lora_bank" in m.__dict__]
    assert banks
    before = [[t.data_ptr() for t in _layout_tensors(b)] for b in banks]
    assert refresh_layouts(dm) == 0  # nothing changed yet
    other = {k: v * 1.5 + 0.01 for k, v in dm.delta_state_dict("a").items()}
    dm.load_delta_state_dict(other, "a")  # "a" is on every linear layer
    assert refresh_layouts(dm) == len(banks)
    assert [[t.data_ptr() for t in _layout_tensors(b)] for b in banks] == before
    # each rewritten layout equals one built afresh from the new adapters
    bank = banks[0]
    current = bank._current
    n = len(current.tensors) // 2
    for kind, layout in current.layouts.items():
        fresh = bank._build(kind, current.tensors[:n], current.tensors[n:],
                            list(current.key[4]), current.key[2])
        for old, new in zip(layout, fresh):
            if isinstance(old, torch.Tensor):
                assert torch.equal(old, new)
    with torch.no_grad(), fast_path("on"):
        fast = dm(input_ids=ids, delta_names=names).logits
    with torch.no_grad(), fast_path("off"):
        ref = dm(input_ids=ids, delta_names=names).logits
    assert _rel(fast, ref) < 1e-5
    assert [[t.data_ptr() for t in _layout_tensors(b)] for b in banks] == before  # no rebuild


def test_refresh_drops_a_cache_whose_adapters_moved():
    from deltatune.kernels.multi_lora import refresh_layouts

    dm = _three_adapters()
    ids = token_batch(3, 1)
    with torch.no_grad(), fast_path("on"):
        dm(input_ids=ids, delta_names=["a", "b", "c"])
    for p in dm.get_delta("b").parameters():
        p.data = p.data.clone()  # new storage: a captured graph cannot follow
    assert refresh_layouts(dm) == 0
    banks = [m.__dict__["_lora_bank"] for m in dm.model.modules()
             if "_lora_bank" in m.__dict__]
    assert all(not b._layouts for b in banks)


def test_layouts_a_graph_captured_survive_batches_of_other_mixes(monkeypatch):
    # A decoder's CUDA graph reads its layouts where they are and runs no Python: a batch
    # of another adapter mix run eagerly in between must neither free nor rebuild them
    # (this once sent a pooled decoder's replays through freed memory on the GPU). On the
    # CPU the capture is simulated: the bank is told a capture is under way.
    import gc

    from deltatune.kernels import multi_lora, triton_lora

    As, Bs, scales = _adapters()
    bank = AdapterBank()
    x = torch.randn(3, 1, 12, dtype=torch.float64)
    y = torch.zeros(3, 1, 10, dtype=torch.float64)

    class Owner:  # stands for a decoder
        pass

    owner = Owner()
    monkeypatch.setattr(triton_lora, "capturing", lambda: True)
    with multi_lora.graph_owner(owner):
        bank.apply(["a", "b", "c"], As, Bs, scales, [0, 1, 2], x, y.clone())
    monkeypatch.setattr(triton_lora, "capturing", lambda: False)
    captured = bank._current
    held = [id(t) for t in _layout_tensors(bank)]
    assert captured.pinned and held

    def other_mix():  # two adapters only: another cache key
        out = bank.apply(["c", "a"], [As[2], As[0]], [Bs[2], Bs[0]], [scales[2], scales[0]],
                         [1, 0, -1], x, y.clone())
        ref = multi_lora_reference(x, y, [0, 2, -1], As, Bs, scales)
        assert _rel(out, ref) < 1e-12

    other_mix()
    assert bank._current is not captured
    assert bank._sets[captured.key] is captured  # kept, with the very same tensors
    assert [id(t) for layout in captured.layouts.values() for t in layout
            if isinstance(t, torch.Tensor)] == held
    # an in-place change reaches the captured set too (the decoder refreshes before replay)
    # when its owner refreshes; another decoder's refresh leaves it to its owner
    with torch.no_grad():
        As[1].mul_(2.0)
    fresh = AdapterBank._build("concat", As, Bs, scales, torch.float64)
    assert not bank.refresh(owner=Owner())
    assert not torch.equal(captured.layouts["concat"][0], fresh[0])
    assert bank.refresh(owner=owner)
    assert torch.equal(captured.layouts["concat"][0], fresh[0])
    # clear() forgets every set; the one a live graph reads stays allocated
    bank.clear()
    assert not bank._sets and bank._stale == [captured]
    other_mix()
    bank.apply(["a", "b", "c"], As, Bs, scales, [0, 1, 2], x, y.clone())
    assert bank._sets[captured.key] is not captured
    captured = bank._sets[captured.key]
    captured.pin()  # (outside any owner: pinned for good) ...
    captured.pinned_for_good = False
    captured.pinners.add(owner)  # ... or for the owner's life, as before
    other_mix()
    # the owner gone, the next new mix lets the captured set go (memory stays bounded)
    assert len(bank._sets) == 2
    del owner
    gc.collect()
    assert not captured.pinned
    bank.apply(["b"], [As[1]], [Bs[1]], [scales[1]], [0, -1, 0], x, y.clone())
    assert list(bank._sets) == [bank._current.key] and captured.key not in bank._sets
