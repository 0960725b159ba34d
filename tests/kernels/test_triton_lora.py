"""The Triton LoRA kernels against float64 references.

On a machine without CUDA they run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
float32 and float16: the interpreter cannot read bfloat16); bfloat16 and CUDA-graph
capture are checked on CUDA only. Without triton installed everything here skips.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.kernels import fast_path, multi_lora, triton_lora
from deltatune.kernels.lora_linear import lora_linear, lora_linear_reference
from deltatune.kernels.multi_lora import multi_lora_reference, stack_padded
from tests.conftest import randomize_deltas, tiny_gpt2, tiny_llama, token_batch
from tests.helpers import count_calls

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton's interpreter must be chosen before triton is first imported (its own library
# functions are compiled-only otherwise), so on CPU the kernel tests run in a child
# pytest started with TRITON_INTERPRET=1 (test_kernels_in_the_cpu_interpreter).
kernel_test = pytest.mark.skipif(not (CUDA or INTERPRETED),
                                 reason="runs on CUDA, or in the interpreter's child pytest")


@pytest.mark.skipif(CUDA or INTERPRETED, reason="CPU only; the child itself runs the tests")
def test_kernels_in_the_cpu_interpreter():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__).resolve())], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.fixture
def dev(monkeypatch):
    """The device the kernels run on: CUDA, else the CPU through Triton's interpreter.

    The kernels are taken everywhere (not only under GraphDecoder), BGMV included.
    """
    monkeypatch.setenv("DELTATUNE_TRITON", "always")
    monkeypatch.setenv("DELTATUNE_TRITON_BGMV", "1")
    return torch.device("cuda" if CUDA else "cpu")


def test_kernels_only_under_graph_decoding_by_default(monkeypatch):
    monkeypatch.delenv("DELTATUNE_TRITON", raising=False)
    x = torch.zeros(2, 4, device="cuda" if CUDA else "cpu")
    if not CUDA and not INTERPRETED:
        assert not triton_lora.available(x)  # CPU tensors never, whatever the scope
        return
    assert not triton_lora.available(x)
    with triton_lora.for_graphs():
        assert triton_lora.available(x)
    monkeypatch.setenv("DELTATUNE_TRITON", "0")
    with triton_lora.for_graphs():
        assert not triton_lora.available(x)


def test_mixed_decode_layout_by_input_width(monkeypatch):
    """Default: the cuBLAS base plus the Triton LoRA add up to BGMV_ADD_MAX_K inputs, the
    cuBLAS concatenated path above (as measured); the variable forces a layout or none."""
    monkeypatch.delenv("DELTATUNE_TRITON_BGMV", raising=False)
    limit = triton_lora.BGMV_ADD_MAX_K
    assert triton_lora.bgmv_layout(limit) == "add-gather"
    assert triton_lora.bgmv_layout(limit + 1) is None
    for value, layout in [("0", None), ("1", "gather"), ("concat", "concat"),
                          ("add", "add-gather"), ("add-concat", "add-concat")]:
        monkeypatch.setenv("DELTATUNE_TRITON_BGMV", value)
        assert triton_lora.bgmv_layout(2 * limit) == layout


DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-2)] + (
    [(torch.bfloat16, 1e-2)] if CUDA else [])


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _rand(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g) * std


@kernel_test
@pytest.mark.parametrize("dtype,limit", DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(1, 96, 80, 8), (19, 70, 33, 16), (64, 128, 48, 4)])
def test_lora_matmul_matches_float64(dev, dtype, limit, M, K, N, r):
    g = torch.Generator().manual_seed(M + K)
    x, W, b = _rand(g, M, K), _rand(g, N, K, std=0.2), _rand(g, N)
    A, B = _rand(g, r, K, std=0.3), _rand(g, N, r, std=0.3)
    ref = lora_linear_reference(x.double(), W.double(), b.double(), A.double(), B.double(),
                                1.5)
    on = [t.to(dev, dtype) for t in (x, W, b, A, B)]
    out = torch.full((M, N), float("nan"), device=dev, dtype=dtype)  # every element written
    y, h = triton_lora.lora_matmul(*on, 1.5, store_h=True, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert _rel(y, ref) < limit
    assert _rel(h, on[0].double() @ on[3].double().t()) < limit
    # h given instead of computed; no bias
    y2, none = triton_lora.lora_matmul(on[0], on[1], None, on[3], on[4], 1.5,
                                       h=(on[0].double() @ on[3].double().t()).to(dtype))
    assert none is None and _rel(y2, ref - b.double()) < limit
    # a transposed (strided) weight: the input-gradient form g W
    Wt = _rand(g, K, N, std=0.2).to(dev, dtype)
    y3, _ = triton_lora.lora_matmul(on[0], Wt.t(), None, on[3], on[4], 1.5)
    ref3 = lora_linear_reference(x.double(), Wt.t().double().cpu(), None, A.double(),
                                 B.double(), 1.5)
    assert _rel(y3, ref3) < limit


@kernel_test
@pytest.mark.parametrize("dtype,limit", DTYPES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("layout", ["gather", "concat"])
@pytest.mark.parametrize("base", ["in the kernel", "added to out"])
def test_bgmv_matmul_matches_the_per_adapter_loop(dev, dtype, limit, fused, layout, base):
    g = torch.Generator().manual_seed(4)
    M, K, N, ranks, scales = 9, 80, 40, (4, 16, 8), [1.0, 2.0, 0.5]
    As = [_rand(g, r, K, std=0.3) for r in ranks]
    Bs = [_rand(g, N, r, std=0.3) for r in ranks]
    rows = [0, 2, -1, 1, 1, 0, 2, -1, 2]
    x, W, b = _rand(g, M, K), _rand(g, N, K, std=0.2), _rand(g, N)
    ref = multi_lora_reference(x.double(), F.linear(x.double(), W.double(), b.double()), rows,
                               [a.double() for a in As], [b_.double() for b_ in Bs], scales)
    a_st, b_st = stack_padded([a.to(dev, dtype) for a in As], [b_.to(dev, dtype) for b_ in Bs],
                              scales, dtype)
    idx = torch.tensor([k if k >= 0 else len(As) for k in rows], dtype=torch.int32,
                       device=dev)
    b_concat = triton_lora.concat_layout(b_st) if layout == "concat" else None
    if b_concat is not None:  # adapter e's column k is row e r_max + k
        assert b_concat.shape == (3 * 16, N)
        assert torch.equal(b_concat[16 + 3], b_st[1, :, 3])
    xd, Wd, bd = x.to(dev, dtype), W.to(dev, dtype), b.to(dev, dtype)
    if base == "in the kernel":
        y = triton_lora.bgmv_matmul(xd, Wd, bd, a_st, b_st, idx, fused=fused, b_concat=b_concat)
    else:  # only the LoRA term, added in place to the base output
        out = F.linear(xd, Wd, bd)
        y = triton_lora.bgmv_matmul(xd, None, None, a_st, b_st, idx, fused=fused,
                                    b_concat=b_concat, out=out)
        assert y is out
    assert _rel(y, ref) < limit
    # every semaphore is back at zero for the next launch (or the next graph replay)
    for cnt in triton_lora._COUNTERS.values():
        assert int(cnt.abs().sum()) == 0


def _count_calls(monkeypatch):
    calls = {"lora_matmul": 0, "bgmv_matmul": 0}
    for name in calls:
        original = getattr(triton_lora, name)

        def counted(*a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(*a, **k)

        monkeypatch.setattr(triton_lora, name, counted)
    return calls


@kernel_test
def test_lora_linear_inference_takes_the_kernel_for_few_rows(dev, monkeypatch):
    calls = _count_calls(monkeypatch)
    g = torch.Generator().manual_seed(2)
    x, W, b = _rand(g, 2, 3, 24).to(dev), _rand(g, 20, 24).to(dev), _rand(g, 20).to(dev)
    A, B = _rand(g, 4, 24).to(dev), _rand(g, 20, 4).to(dev)
    with torch.no_grad():
        y = lora_linear(x, W, b, A, B, 0.7)
    assert calls["lora_matmul"] == 1 and y.shape == (2, 3, 20)
    ref = lora_linear_reference(*(t.double() for t in (x, W, b, A, B)), 0.7)
    assert _rel(y, ref) < 1e-5
    big = _rand(g, triton_lora.SMALL_M + 1, 24).to(dev)
    with torch.no_grad():
        lora_linear(big, W, b, A, B, 0.7)  # more rows than SMALL_M: the cuBLAS path
    assert calls["lora_matmul"] == 1


@kernel_test
@pytest.mark.parametrize("bgmv", ["1", "concat", "add", "add-concat"])
def test_model_decode_paths_equal_the_plain_path(dev, monkeypatch, bgmv):
    """A tiny Llama, one adapter and a mixed batch of two adapters plus base rows, a few
    tokens per row: the Triton paths give the plain path's logits (float32)."""
    monkeypatch.setenv("DELTATUNE_TRITON_BGMV", bgmv)
    calls = _count_calls(monkeypatch)
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                   name="a")
    dm.add("b", dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_deltas(dm, std=0.1)
    dm.to(dev).eval()
    ids = token_batch(3, 4).to(dev)
    names = ["a", None, "b"]
    with torch.no_grad():
        with fast_path("off"):
            ref_mixed = dm(input_ids=ids, delta_names=names).logits
            ref_one = dm(input_ids=ids).logits
        with fast_path("on"):
            mixed = dm(input_ids=ids, delta_names=names).logits
            one = dm(input_ids=ids).logits
    assert calls["bgmv_matmul"] == 14 and calls["lora_matmul"] == 14  # 7 linears x 2 layers
    assert _rel(mixed, ref_mixed) < 1e-5
    assert _rel(one, ref_one) < 1e-5


@kernel_test
@pytest.mark.parametrize("whole,stacked", [(True, False), (False, False), (True, True)])
def test_layers_reading_one_input_share_one_shrink(dev, monkeypatch, whole, stacked):
    """q, k, v (and gate, up) read the same tensor: after one pass has shown it, the first
    of them computes all their shrinks in one launch, and the logits stay the plain path's,
    also after an in-place adapter switch (the shared stack is rewritten in place). With
    whole groups (the default) the first also computes every member's output: one add
    launch for the group, the members return their blocks."""
    from deltatune.kernels import shared_shrink

    monkeypatch.setenv("DELTATUNE_TRITON_BGMV", "add")
    monkeypatch.setattr(shared_shrink, "WHOLE_GROUPS", whole)
    # stacked (opt-in): the members' base weights copied side by side, one GEMV
    monkeypatch.setenv("DELTATUNE_STACK_SIBLINGS", "1" if stacked else "0")
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                   name="a")
    dm.add("b", dt.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    randomize_deltas(dm, std=0.1)
    dm.to(dev).eval()
    # three tokens per row: with one, attention would ignore k (a wrong k output would pass)
    ids, names = token_batch(3, 3).to(dev), ["a", None, "b"]
    launches = {"shrink": 0, "add": 0, "group add": 0}
    shrink, matmul, group = (triton_lora.bgmv_shrink, triton_lora.bgmv_matmul,
                             triton_lora.bgmv_add_group)

    def counted_shrink(*a, **k):
        launches["shrink"] += 1
        return shrink(*a, **k)

    def counted_matmul(*a, **k):
        launches["add"] += 1
        k["fused"] = False  # the shrink as its own launch (fused by default on CPU)
        return matmul(*a, **k)

    def counted_group(*a, **k):
        launches["group add"] += 1
        return group(*a, **k)

    monkeypatch.setattr(triton_lora, "bgmv_shrink", counted_shrink)
    monkeypatch.setattr(triton_lora, "bgmv_matmul", counted_matmul)
    monkeypatch.setattr(triton_lora, "bgmv_add_group", counted_group)

    def both():
        for k in launches:
            launches[k] = 0
        # inference mode: inputs without version counters are matched by identity
        with torch.inference_mode():
            with fast_path("off"):
                ref = dm(input_ids=ids, delta_names=names).logits
            with fast_path("on"):
                return dm(input_ids=ids, delta_names=names).logits, ref

    alone = {"shrink": 14, "add": 14, "group add": 0}  # 7 linears x 2 layers
    # per layer: one shrink for q/k/v, one for gate/up, o and down alone; whole groups
    # add q/k/v's and gate/up's LoRA terms in one launch each
    grouped = ({"shrink": 8, "add": 4, "group add": 4} if whole else
               {"shrink": 8, "add": 14, "group add": 0})
    got, ref = both()
    assert launches == alone and _rel(got, ref) < 1e-5
    for _ in range(2):
        got, ref = both()
        assert launches == grouped and _rel(got, ref) < 1e-5
    dm.load_delta_state_dict(dm.delta_state_dict("b"), "a")  # in place: a's values = b's
    got, ref = both()
    assert launches == grouped and _rel(got, ref) < 1e-5
    groups = {id(b.shrink_group): b.shrink_group for b in multi_lora.banks_of(dm)
              if b.shrink_group is not None}
    assert groups and all((g._stack is not None) == stacked for g in groups.values())
    # other rows: the layers re-lay out their adapters, the groups dissolve and re-form
    names[:] = ["b", "a", "a"]
    for want in (alone, grouped):
        got, ref = both()
        assert launches == want and _rel(got, ref) < 1e-5


@kernel_test
@pytest.mark.parametrize("rows", [1, 5, 19])
def test_group_add_equals_each_members_own_lora_term(dev, rows):
    """bgmv_add_group against float64: three members of odd widths (tiles end inside a
    member), ranks 4 + 4 + 4 side by side in h, a base-model row, outputs one after
    another in one buffer."""
    g = torch.Generator().manual_seed(11)
    widths, r, adapters, K = [20, 12, 36], 4, 3, 24
    x = _rand(g, rows, K)
    As = [[_rand(g, r, K) for _ in range(adapters)] for _ in widths]
    Bs = [[_rand(g, n, r) for _ in range(adapters)] for n in widths]
    scales = [0.5, 2.0, 1.0]
    row_adapter = [(i % (adapters + 1)) - 1 for i in range(rows)]  # -1: the base model
    index = torch.tensor([k if k >= 0 else adapters for k in row_adapter], dtype=torch.int32)
    stacks = [stack_padded(a, b, scales, torch.float32) for a, b in zip(As, Bs)]
    a_joined = torch.cat([a for a, _ in stacks], 1)  # (E, 3r, K)
    b_joined = torch.cat([b.transpose(1, 2) for _, b in stacks], 2)  # (E, r, sum N)
    base = [_rand(g, rows, n) for n in widths]
    flat = torch.cat([y.reshape(-1) for y in base])
    x_d, idx_d = x.to(dev), index.to(dev)
    h = triton_lora.bgmv_shrink(x_d, a_joined.to(dev), idx_d, widths[0])
    block_n = triton_lora.group_block_n(rows, sum(widths))
    tiles = triton_lora.group_tiles(widths, [r] * 3, block_n, dev)
    out = flat.to(dev)
    triton_lora.bgmv_add_group(out, b_joined.to(dev), h, idx_d, tiles, rows, block_n)
    first = 0
    for j, n in enumerate(widths):
        got = out[rows * first:rows * (first + n)].view(rows, n)
        want = multi_lora_reference(x.double(), base[j].double(), row_adapter,
                                    [a.double() for a in As[j]],
                                    [b.double() for b in Bs[j]], scales)
        assert _rel(got, want) < 1e-5, j
        first += n


@kernel_test
def test_mixed_prompt_rows_take_the_add_layouts_when_asked(dev, monkeypatch):
    """DELTATUNE_TRITON_PROMPT_ROWS: a mixed prompt of more rows than SMALL_M takes the
    cuBLAS base + Triton shrink/add (whole groups included); logits stay the plain path's."""
    monkeypatch.setenv("DELTATUNE_TRITON_BGMV", "add")
    monkeypatch.setattr(triton_lora, "SMALL_M", 8)
    dm = _two_loras(tiny_llama(), dev)
    ids, names = token_batch(3, 5).to(dev), ["a", None, "b"]  # 15 rows > 8
    adds = count_calls(monkeypatch, triton_lora, "bgmv_add_group")
    for prompt_rows, used in (("0", False), ("64", True)):
        monkeypatch.setenv("DELTATUNE_TRITON_PROMPT_ROWS", prompt_rows)
        for _ in range(2):  # the second pass runs the groups the first one showed
            _assert_fast_path_matches_plain(dm, ids, names)
        assert (adds["n"] > 0) == used


@kernel_test
@pytest.mark.parametrize("stacked", [False, True])
def test_group_member_with_a_replaced_base_weight_computes_its_own_output(dev, monkeypatch,
                                                                          stacked):
    """The leader computes members' outputs from their weights as last called: a member
    whose base weight became another Parameter still gets its own; one changed in place,
    or given other storage (the stacked copy is rewritten), reaches the leader."""
    from deltatune.core.layers import DeltaLayer

    monkeypatch.setenv("DELTATUNE_TRITON_BGMV", "add")
    monkeypatch.setenv("DELTATUNE_STACK_SIBLINGS", "1" if stacked else "0")
    dm = _two_loras(tiny_llama(), dev)
    # several tokens per row: with one, attention ignores k entirely
    ids, names = token_batch(3, 4).to(dev), ["a", None, "b"]

    for _ in range(2):
        _assert_fast_path_matches_plain(dm, ids, names)
    attn = dm.model.model.layers[0].self_attn
    k_proj, v_proj = attn.k_proj, attn.v_proj
    assert isinstance(k_proj, DeltaLayer) and k_proj.__dict__["_lora_bank"].shrink_group
    g = torch.Generator().manual_seed(8)
    w = k_proj.base.weight
    k_proj.base.weight = torch.nn.Parameter(  # another tensor: the member's own output
        (torch.randn(w.shape, generator=g) * 0.3).to(w.device, w.dtype), requires_grad=False)
    with torch.no_grad():
        v_proj.base.weight.mul_(1.7)  # in place: the leader reads the new values
    for _ in range(2):
        _assert_fast_path_matches_plain(dm, ids, names)
    # the same Parameter given other storage: the stacked copy is rewritten
    v_proj.base.weight.data = v_proj.base.weight.detach() * -0.5
    for _ in range(2):
        _assert_fast_path_matches_plain(dm, ids, names)
    group = v_proj.__dict__["_lora_bank"].shrink_group
    assert group is not None and (group._stack is not None) == stacked


def _assert_fast_path_matches_plain(dm, ids, names) -> None:
    """Mixed-batch logits by the fast paths equal the plain path's (no autograd)."""
    with torch.no_grad():
        with fast_path("off"):
            ref = dm(input_ids=ids, delta_names=names).logits
        with fast_path("on"):
            got = dm(input_ids=ids, delta_names=names).logits
    assert _rel(got, ref) < 1e-5


def _two_loras(model, dev) -> dt.DeltaModel:
    """``model`` with LoRA deltas "a" and "b" (r=4, every linear), random, on ``dev``."""
    dm = dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear"), name="a")
    dm.add("b", dt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_deltas(dm, std=0.1)
    return dm.to(dev).eval()


@kernel_test
def test_pooled_rows_reroute_the_kernels_index_in_place(dev, monkeypatch):
    """Under row_pool the BGMV index of the rows is one tensor rewritten per assignment."""
    from deltatune.core.layers import row_pool

    monkeypatch.setenv("DELTATUNE_TRITON_BGMV", "add")
    dm = _two_loras(tiny_llama(), dev)
    ids = token_batch(3, 1).to(dev)
    seen = []
    for names in (["a", None, "b"], ["b", "b", None], ["a", None, "b"]):
        with torch.no_grad():
            with fast_path("off"):
                ref = dm(input_ids=ids, delta_names=names).logits
            with fast_path("on"), row_pool(["a", "b"]):
                got = dm(input_ids=ids, delta_names=names).logits
        assert _rel(got, ref) < 1e-5
        index = {id(bank): bank._rows[("pooled", "tokens", 1, 3)][1]
                 for bank in multi_lora.banks_of(dm)}
        seen.append(({k: id(v) for k, v in index.items()},
                     {k: v.clone() for k, v in index.items()}))
    assert seen[0][0] == seen[1][0] == seen[2][0]  # the same tensors every time
    assert any(not torch.equal(seen[0][1][k], seen[1][1][k]) for k in seen[0][1])


@kernel_test
def test_layers_reading_different_inputs_keep_their_own_shrinks(dev, monkeypatch):
    """GPT-2: c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj each read their own tensor."""
    monkeypatch.setenv("DELTATUNE_TRITON_BGMV", "add")
    dm = _two_loras(tiny_gpt2(), dev)
    ids, names = token_batch(2, 1).to(dev), ["a", "b"]
    for _ in range(2):
        _assert_fast_path_matches_plain(dm, ids, names)
    banks = multi_lora.banks_of(dm)
    assert banks and all(bank.shrink_group is None for bank in banks)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_kernels_replay_inside_a_cuda_graph(dev):
    d, g = torch.device("cuda"), torch.Generator().manual_seed(9)
    x, W = _rand(g, 4, 512).to(d, torch.bfloat16), _rand(g, 384, 512, std=0.05).to(
        d, torch.bfloat16)
    A, B = _rand(g, 16, 512, std=0.1).to(d, torch.bfloat16), _rand(g, 384, 16, std=0.1).to(
        d, torch.bfloat16)
    a_st, b_st = stack_padded([A, A * 2], [B, B], [1.0, 0.5], torch.bfloat16)
    idx = torch.tensor([0, 1, 2, 0], dtype=torch.int32, device=d)
    b_cat = triton_lora.concat_layout(b_st)
    triton_lora.lora_matmul(x, W, None, A, B, 2.0)
    triton_lora.bgmv_matmul(x, W, None, a_st, b_st, idx)
    triton_lora.bgmv_matmul(x, W, None, a_st, b_st, idx, fused=True, b_concat=b_cat)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y1, _ = triton_lora.lora_matmul(x, W, None, A, B, 2.0)
        y2 = triton_lora.bgmv_matmul(x, W, None, a_st, b_st, idx)
        y3 = triton_lora.bgmv_matmul(x, W, None, a_st, b_st, idx, fused=True, b_concat=b_cat)
        y4 = triton_lora.bgmv_matmul(x, None, None, a_st, b_st, idx, fused=True,
                                     out=F.linear(x, W))
    for _ in range(3):  # replays reuse the semaphores: each must leave them at zero
        x.copy_(_rand(g, 4, 512).to(d, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        ref1 = lora_linear_reference(x.double(), W.double(), None, A.double(), B.double(), 2.0)
        base = F.linear(x.double(), W.double())
        ref2 = multi_lora_reference(x.double(), base, [0, 1, -1, 0],
                                    [A.double(), 2 * A.double()], [B.double(), B.double()],
                                    [1.0, 0.5])
        assert _rel(y1, ref1) < 1e-2 and _rel(y2, ref2) < 1e-2 and _rel(y3, ref2) < 1e-2
        assert _rel(y4, ref2) < 1e-2


@kernel_test
@pytest.mark.skipif(CUDA and torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA descriptors need compute capability 9")
@pytest.mark.parametrize("rows,d_in,d_out,r,bias", [(70, 64, 96, 16, False),
                                                     (33, 48, 80, 4, True),
                                                     (129, 96, 40, 24, True)])
def test_tma_lora_gemm_matches_float64(dev, monkeypatch, rows, d_in, d_out, r, bias):
    """x W^T + b + s (x A^T) B^T by the TMA GEMM with the expand in its epilogue: odd tile
    edges, ranks padded to 16, through lora_linear's fast path (forward and backward)."""
    from deltatune.kernels import tma_lora

    monkeypatch.setenv("DELTATUNE_TMA_LORA", "always")
    dtype = torch.float16
    g = torch.Generator().manual_seed(3)
    x = _rand(g, rows, d_in).to(dev, dtype)
    W = _rand(g, d_out, d_in, std=d_in ** -0.5).to(dev, dtype)
    b = _rand(g, d_out).to(dev, dtype) if bias else None
    A, B = _rand(g, r, d_in, std=0.2).to(dev, dtype), _rand(g, d_out, r, std=0.2).to(dev, dtype)
    assert tma_lora.applies(x, W, r)
    want = lora_linear_reference(x.double(), W.double(), None if b is None else b.double(),
                                 A.double(), B.double(), 1.5)
    assert _rel(tma_lora.lora_gemm(x, W, b, x @ A.t(), B, 1.5), want) < 2e-3
    # inside lora_linear (many rows: the large-M path), gradients by the usual backward
    monkeypatch.setattr(triton_lora, "SMALL_M", 8)
    A.requires_grad_(True)
    got = lora_linear(x, W, b, A, B, 1.5)
    assert _rel(got, want) < 2e-3
    got.float().square().sum().backward()
    A64 = A.detach().double().requires_grad_(True)
    lora_linear_reference(x.double(), W.double(), None if b is None else b.double(), A64,
                          B.double(), 1.5).square().sum().backward()
    assert _rel(A.grad, A64.grad) < 5e-3


@kernel_test
@pytest.mark.skipif(CUDA and torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA descriptors need compute capability 9")
def test_tma_configuration_the_gpu_refuses_falls_back_to_cublas(dev, monkeypatch):
    """Out of shared memory for a tile configuration: the cuBLAS path answers, and the
    configuration is not tried again."""
    from triton.runtime.errors import OutOfResources

    from deltatune.kernels import tma_lora

    monkeypatch.setenv("DELTATUNE_TMA_LORA", "always")
    monkeypatch.setattr(triton_lora, "SMALL_M", 8)
    monkeypatch.setattr(tma_lora, "_REFUSED", set())
    tries = {"n": 0}

    def refuse(*a, **k):
        tries["n"] += 1
        raise OutOfResources(240000, 232448, "shared memory")

    monkeypatch.setattr(tma_lora, "launch", refuse)
    g = torch.Generator().manual_seed(5)
    x, W = _rand(g, 40, 32).to(dev, torch.float16), _rand(g, 48, 32, std=0.2).to(dev, torch.float16)
    A, B = _rand(g, 16, 32, std=0.2).to(dev, torch.float16), _rand(g, 48, 16).to(dev, torch.float16)
    want = lora_linear_reference(x.double(), W.double(), None, A.double(), B.double(), 2.0)
    for _ in range(2):
        with torch.no_grad():
            assert _rel(lora_linear(x, W, None, A, B, 2.0), want) < 2e-3
    assert tries["n"] == 1


@kernel_test
@pytest.mark.parametrize("tokens,d_out,r", [(70, 100, 4), (33, 48, 16), (129, 40, 24)])
def test_fused_lora_grads_match_float64(dev, monkeypatch, tokens, d_out, r):
    """gB = g B and dB = s g^T h from one pass over g (row blocks, column slices summed by
    atomics), alone and inside LoraLinearFunction's backward (dx, dA, dB)."""
    from deltatune.kernels import lora_grad

    monkeypatch.setenv("DELTATUNE_FUSED_LORA_GRAD", "1")
    dtype = torch.float16 if INTERPRETED and not CUDA else torch.bfloat16
    limit = 2e-3 if dtype == torch.float16 else 1e-2
    gen = torch.Generator().manual_seed(4)
    g = _rand(gen, tokens, d_out).to(dev, dtype)
    B, h = _rand(gen, d_out, r, std=0.3).to(dev, dtype), _rand(gen, tokens, r).to(dev, dtype)
    assert lora_grad.applies(g, B, h)
    gb, db = lora_grad.lora_grads(g, B, h, 1.5)
    assert _rel(gb, g.double() @ B.double()) < limit
    assert _rel(db, 1.5 * g.double().t() @ h.double()) < limit
    # through the Function: every gradient against float64
    d_in = 24
    x = _rand(gen, tokens, d_in).to(dev, dtype).requires_grad_(True)
    W = _rand(gen, d_out, d_in, std=0.2).to(dev, dtype)
    A = _rand(gen, r, d_in, std=0.3).to(dev, dtype).requires_grad_(True)
    Bp = B.clone().requires_grad_(True)
    gy = _rand(gen, tokens, d_out).to(dev, dtype)
    got = torch.autograd.grad(lora_linear(x, W, None, A, Bp, 1.5), (x, A, Bp), gy)
    ins = [t.detach().double().requires_grad_(True) for t in (x, A, Bp)]
    want = torch.autograd.grad(lora_linear_reference(ins[0], W.double(), None, ins[1], ins[2],
                                                     1.5), ins, gy.double())
    for a, b in zip(got, want):
        assert _rel(a, b) < limit
