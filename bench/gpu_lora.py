"""deltatune vs HF peft on one GPU, in one run: LoRA training, one layer, inference.

    PYTHONPATH=src python bench/gpu_lora.py --check --layer --train --infer --shapes 1b

Sections (each optional):
  --check  fast paths against plain paths / float64 / peft on this GPU (fails loudly);
  --layer  one adapted linear (4096 -> 14336, bf16, r=16) forward + input gradient vs
           the frozen layer;
  --train  LoRA r=16 on all linear layers of a Llama-shaped model with random weights:
           step time, tokens/s, MFU (4N + attention per token), peak memory, with and
           without gradient checkpointing; peft default (fp32 adapters), peft with bf16
           adapters, deltatune plain path, deltatune fast path (+ fused CE), full FT;
           "peft bf16 + Liger" (in --variants) adds Liger's kernels (RMSNorm, RoPE,
           SwiGLU, fused linear + cross-entropy) to peft with bf16 adapters, and
           "deltatune fast + Liger" Liger's RMSNorm, RoPE and SwiGLU to deltatune
           (deltatune.integrations.liger, its own loss kept), when the
           liger-kernel wheel is carried: here `pip download --no-deps -d bench/wheels
           liger-kernel==0.8.5`, then on the GPU machine (carry bench/wheels)
           `pip install --no-deps bench/wheels/*.whl` before this script;
  --kernels  decode-sized LoRA linears in CUDA graphs: cuBLAS merged vs cuBLAS LoRA vs the
           Triton kernels (single adapter and 32-adapter BGMV); --sweep tries tile configs;
  --large-m N  the same at N rows (prefill/training shape 4096 -> 14336);
  --infer  prefill and decode (batch 1 and 32) for base, merged, unmerged, 4 and 32
           adapters mixed in one batch, for deltatune and peft.
Writes bench/results/gpu_lora-<time>.json (and $OUT/ when set) and prints ratios last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import deltatune as dt
from deltatune.integrations.liger import liger_kernels
from deltatune.kernels import fast_path
from deltatune.kernels.fused_ce import fused_linear_cross_entropy, linear_cross_entropy_reference
from deltatune.kernels.head_loss import causal_lm_loss
from deltatune.kernels.lora_linear import lora_linear, lora_linear_reference
from deltatune.kernels.multi_lora import AdapterBank, multi_lora_concat, multi_lora_reference
from deltatune.train.compile import compile_layers

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 datasheet figure, the MFU denominator
SHAPES = {
    # Llama 3.2 1B and Llama 3.1 8B shapes (random weights).
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS: dict = {"rows": []}


def log(*a) -> None:
    print(*a, flush=True)


def dev() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_once(fn) -> float:
    """Seconds of one ``fn()``: CUDA events on a GPU, the wall clock otherwise."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timeit(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    return statistics.median(time_once(fn) for _ in range(reps))


def peak_reset() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def build(shape: str, dtype=torch.bfloat16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(dev()):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model


def randomize(params, seed: int = 1, std: float = 0.02) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def attach_dt(model, r: int = 16, name: str = "default", dtype=None):
    cfg = dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    if isinstance(model, dt.DeltaModel):
        model.add(name, cfg, dtype=dtype)
        return model
    return dt.attach(model, cfg, name=name, dtype=dtype)


def attach_peft(model, r: int = 16, bf16: bool = False, name: str = "default"):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(model, cfg, adapter_name=name, autocast_adapter_dtype=not bf16)


def copy_dt_to_peft(dm, pm, name: str = "default") -> None:
    peft_sd = dict(pm.named_parameters())
    for key, tensor in dm.delta_state_dict(name).items():
        # deltatune keys: '<module>.lora_A'; peft: '...<module>.lora_A.<name>.weight'
        module, leaf = key.rsplit(".", 1)
        hits = [k for k in peft_sd if k.endswith(f"{module}.{leaf}.{name}.weight")]
        assert len(hits) == 1, (key, hits[:3])
        with torch.no_grad():
            peft_sd[hits[0]].copy_(tensor)


# --------------------------------------------------------------------------- check
def check() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    d = dev()
    failures = []

    def expect(name, value, limit):
        ok = value < limit and math.isfinite(value)
        log(f"  check {name:<48} {value:.2e} < {limit:g} {'ok' if ok else 'FAIL'}")
        RESULTS["rows"].append(dict(section="check", name=name, value=value, limit=limit))
        if not ok:
            failures.append(name)

    for dtype, limit in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        g = torch.Generator(device="cpu").manual_seed(7)
        x, w, b = (torch.randn(*s, generator=g).to(d, dtype).requires_grad_()
                   for s in ((4, 300, 512), (768, 512), (768,)))
        A = (torch.randn(16, 512, generator=g) * 0.1).to(d, dtype).requires_grad_()
        B = (torch.randn(768, 16, generator=g) * 0.1).to(d, dtype).requires_grad_()
        out = lora_linear(x, w, b, A, B, 2.0)
        out_check = out.detach().clone()
        gy = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, A, B), gy)
        ins = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
        ref = lora_linear_reference(*ins, 2.0)
        rgrads = torch.autograd.grad(ref, (ins[0], ins[3], ins[4]), gy.double())
        tag = str(dtype).split(".")[1]
        expect(f"lora_linear {tag} out vs float64", rel(out_check, ref), limit)
        # without autograd, one adapter on 1200 rows: folded into a scratch weight
        with torch.no_grad(), env_vars(DELTATUNE_FOLD_LORA="always"):
            folded = lora_linear(x.detach(), w.detach(), b.detach(), A.detach(), B.detach(),
                                 2.0)
        expect(f"folded lora_linear {tag} out vs float64", rel(folded, ref.detach()), limit)
        for n, a, r_ in zip(("dx", "dA", "dB"), grads, rgrads):
            expect(f"lora_linear {tag} {n} vs float64", rel(a, r_), limit)

        if dtype == torch.bfloat16 and d.type == "cuda":  # Triton kernels: GPU only
            # gB = g B and dB = s g^T h from one pass over g (opt-in kernels/lora_grad)
            from deltatune.kernels import lora_grad
            gs, bs_, hs_ = (torch.randn(*s, generator=g).to(d, dtype)
                            for s in ((8192, 4096), (4096, 16), (8192, 16)))
            os.environ["DELTATUNE_FUSED_LORA_GRAD"] = "1"
            try:
                gb, db = lora_grad.lora_grads(gs, bs_, hs_, 2.0)
            finally:
                os.environ.pop("DELTATUNE_FUSED_LORA_GRAD")
            expect("fused gB bf16 vs float64", rel(gb, gs.double() @ bs_.double()), limit)
            expect("fused dB bf16 vs float64", rel(db, 2.0 * gs.double().t() @ hs_.double()),
                   limit)
            # many rows, a wider output: the TMA GEMM with the expand in its epilogue
            from deltatune.kernels import tma_lora
            xs, ws, bs = (torch.randn(*s, generator=g).to(d, dtype)
                          for s in ((8192, 1024), (2048, 1024), (2048,)))
            As_, Bs_ = (torch.randn(*s, generator=g).to(d, dtype) * 0.1
                        for s in ((16, 1024), (2048, 16)))
            with torch.no_grad():
                got = lora_linear(xs, ws * 0.03, bs, As_, Bs_, 2.0)
            want = lora_linear_reference(xs.double(), ws.double() * 0.03, bs.double(),
                                         As_.double(), Bs_.double(), 2.0)
            expect(f"TMA LoRA GEMM bf16 (taken: {tma_lora.applies(xs, ws, 16)}) vs float64",
                   rel(got, want), limit)

        h = torch.randn(3000, 256, generator=g).to(d, dtype).requires_grad_()
        W = (torch.randn(5000, 256, generator=g) * 0.05).to(d, dtype).requires_grad_()
        t = torch.randint(0, 5000, (3000,), generator=g).to(d)
        t[::7] = -100
        loss = fused_linear_cross_entropy(h, W, None, t, chunk=700)
        gh, gw = torch.autograd.grad(loss, (h, W))
        hd, wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
        rl = linear_cross_entropy_reference(hd, wd, None, t)
        rh, rw = torch.autograd.grad(rl, (hd, wd))
        expect(f"fused CE {tag} loss vs float64", abs(loss.item() - rl.item()) / rl.item(),
               limit)
        expect(f"fused CE {tag} dh vs float64", rel(gh, rh), limit)
        expect(f"fused CE {tag} dW vs float64", rel(gw, rw), limit)

        As = [torch.randn(r, 512, generator=g).to(d, dtype) * 0.1 for r in (4, 16, 8)]
        Bs = [torch.randn(768, r, generator=g).to(d, dtype) * 0.1 for r in (4, 16, 8)]
        rows = [0, 2, -1, 1, 1, 0, 2, 2]
        for tokens in (1, 64):
            xx = torch.randn(8, tokens, 512, generator=g).to(d, dtype)
            yy = torch.randn(8, tokens, 768, generator=g).to(d, dtype)
            ref_m = multi_lora_reference(xx.double(), yy.double(), rows,
                                         [a.double() for a in As], [b_.double() for b_ in Bs],
                                         [1.0, 2.0, 0.5])
            got = AdapterBank().apply(["a", "b", "c"], As, Bs, [1.0, 2.0, 0.5], rows, xx,
                                      yy.clone())
            expect(f"multi-lora {tag} tokens={tokens} vs float64", rel(got, ref_m), limit)

    triton_checks(expect)

    # Whole model, fast path vs plain path vs peft with the same weights (float32).
    model = build("tiny", torch.float32)
    ids = torch.randint(3, 512, (2, 64), device=d)
    dm = attach_dt(model, r=8)
    randomize(lora_params(dm), std=0.1)
    dm.set_trainable("default")
    params = dm.trainable_parameters()
    dm.train()
    with fast_path("off"):
        ref = dm(input_ids=ids, labels=ids)
        rgrads = torch.autograd.grad(ref.loss, params)
    with fast_path("on"):
        fast_loss = causal_lm_loss(dm, ids, ids)
        fgrads = torch.autograd.grad(fast_loss, params)
        fast_logits = dm(input_ids=ids).logits
    expect("model fp32 logits fast vs plain", rel(fast_logits, ref.logits), 1e-5)
    expect("model fp32 loss fused vs HF", abs(fast_loss.item() - ref.loss.item()), 1e-5)
    expect("model fp32 lora grads fast vs plain",
           max(rel(a, b) for a, b in zip(fgrads, rgrads)), 1e-5)
    pm = attach_peft(build("tiny", torch.float32), r=8).to(d)
    copy_dt_to_peft(dm, pm)
    with torch.no_grad():
        peft_logits = pm(input_ids=ids).logits
    expect("model fp32 logits fast vs peft", rel(fast_logits, peft_logits), 1e-5)
    RESULTS["check_failures"] = failures
    if failures:
        raise SystemExit(f"correctness checks failed: {failures}")


def triton_checks(expect) -> None:
    """The Triton kernels (kernels/triton_lora.py) against float64, fp32 and bf16."""
    from deltatune.kernels import triton_lora as tlr
    from deltatune.kernels.multi_lora import stack_padded

    d = dev()
    with tlr.for_graphs():
        usable = tlr.available(torch.empty(0, device=d))
    if not usable:
        log("  check triton kernels: skipped (triton unavailable on this device)")
        return
    for dtype, limit in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        tag = str(dtype).split(".")[1]
        g = torch.Generator(device="cpu").manual_seed(11)

        def rn(*shape, std=1.0, g=g, dtype=dtype):
            return (torch.randn(*shape, generator=g) * std).to(d, dtype)

        for M, K, N, r in ((1, 2048, 512, 16), (5, 300, 777, 8), (37, 1024, 2048, 16),
                           (64, 512, 640, 32), (300, 512, 768, 16)):
            x, W, b = rn(M, K), rn(N, K, std=0.05), rn(N)
            A, B = rn(r, K, std=0.1), rn(N, r, std=0.1)
            ref = lora_linear_reference(*(t.double() for t in (x, W, b, A, B)), 2.0)
            out = torch.full((M, N), float("nan"), device=d, dtype=dtype)  # poisoned
            y, h = tlr.lora_matmul(x, W, b, A, B, 2.0, store_h=True, out=out)
            expect(f"triton lora_matmul {tag} M={M} K={K} N={N} r={r}", rel(y, ref), limit)
            expect(f"triton lora_matmul {tag} M={M} stored h",
                   rel(h, x.double() @ A.double().t()), limit)
            y2, _ = tlr.lora_matmul(x, W, None, A, B, 2.0, h=(x.double() @ A.double().t()).to(
                dtype))
            expect(f"triton lora_matmul {tag} M={M} given h", rel(y2, ref - b.double()), limit)
            Wt = rn(K, N, std=0.05)  # transposed (strided) weight: the input-gradient form
            y3, _ = tlr.lora_matmul(x, Wt.t(), None, A, B, 2.0)
            expect(f"triton lora_matmul {tag} M={M} strided weight", rel(y3, lora_linear_reference(
                x.double(), Wt.t().double(), None, A.double(), B.double(), 2.0)), limit)
        for M, K, N in ((1, 2048, 512), (8, 640, 384), (32, 2048, 2048), (64, 1024, 256)):
            ranks = (4, 16, 8, 16)
            As = [rn(r_, K, std=0.1) for r_ in ranks]
            Bs = [rn(N, r_, std=0.1) for r_ in ranks]
            scales = [1.0, 2.0, 0.5, 1.5]
            rows = [(i * 7) % 5 - 1 for i in range(M)]  # -1 = base rows, mixed in
            x, W, b = rn(M, K), rn(N, K, std=0.05), rn(N)
            a_st, b_st = stack_padded(As, Bs, scales, dtype)
            idx = torch.tensor([k if k >= 0 else len(As) for k in rows], device=d,
                               dtype=torch.int32)
            y = tlr.bgmv_matmul(x, W, b, a_st, b_st, idx)
            base = F.linear(x.double(), W.double(), b.double())
            ref = multi_lora_reference(x.double(), base, rows, [a.double() for a in As],
                                       [b_.double() for b_ in Bs], scales)
            expect(f"triton bgmv {tag} M={M} K={K} N={N}", rel(y, ref), limit)
            b_cat = tlr.concat_layout(b_st)
            for fused in (False, True):
                y = tlr.bgmv_matmul(x, W, b, a_st, b_st, idx, fused=fused, b_concat=b_cat)
                expect(f"triton bgmv concat {tag} M={M} K={K} N={N} fused={fused}",
                       rel(y, ref), limit)
        if d.type == "cuda":
            # captured in a CUDA graph, replayed on new inputs copied into place
            x, W = rn(4, 1024), rn(512, 1024, std=0.05)
            A, B = rn(16, 1024, std=0.1), rn(512, 16, std=0.1)
            tlr.lora_matmul(x, W, None, A, B, 2.0)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                yg, _ = tlr.lora_matmul(x, W, None, A, B, 2.0)
            x.copy_(rn(4, 1024))
            graph.replay()
            torch.cuda.synchronize()
            ref = lora_linear_reference(*(t.double() for t in (x, W)), None, A.double(),
                                        B.double(), 2.0)
            expect(f"triton lora_matmul {tag} CUDA graph replay", rel(yg, ref), limit)


# --------------------------------------------------------------------------- kernels
def save_results(prefix: str, result: dict) -> None:
    """Write ``result`` as ``<prefix>-<UTC time>.json`` to bench/results/ and to $OUT (the
    folder the device tool brings back) when set."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for folder in filter(None, [os.environ.get("OUT"), "bench/results"]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{prefix}-{stamp}.json").write_text(json.dumps(result, indent=1))


@contextlib.contextmanager
def env_vars(**values: str):
    """Within: the given environment variables set (the kernels read them per call)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def tma_off():
    """Within: LoRA linears keep cuBLAS for many rows (no TMA GEMM, no folded weight)."""
    return env_vars(DELTATUNE_TMA_LORA="0", DELTATUNE_FOLD_LORA="0")


def _graph_time(calls, reps: int = 20) -> float:
    """Seconds per call of a captured sequence of ``calls`` (one CUDA graph), median."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


SWEEP = [(bn, bk, sk, 4, 3) for bn in (16, 32, 64) for bk in (128, 256) for sk in (1, 2, 4, 8)]
# --sweep-wide: warps and pipeline stages too (bytes in flight for a GEMV)
SWEEP_WIDE = [(bn, bk, sk, nw, ns) for bn in (32, 64) for bk in (128, 256) for sk in (1, 2, 4)
              for nw in (4, 8) for ns in (2, 3, 4, 5)]


def kernel_bench(sweep: bool, shapes: list[tuple[int, int]] | None = None,
                 rows: tuple[int, ...] = (1, 16, 32, 64), grid: list | None = None) -> None:
    """Decode-sized LoRA linears, each sequence captured in a CUDA graph: cuBLAS merged
    GEMV (the target), the cuBLAS LoRA path (3 kernels), the fused Triton kernel, and
    for 32 adapters in a batch of 32 the current concat path vs the Triton BGMV."""
    from deltatune.kernels import triton_lora as tlr
    from deltatune.kernels.lora_linear import _fused_forward
    from deltatune.kernels.multi_lora import concat_mask, stack_concat, stack_padded

    d, dtype, r = dev(), torch.bfloat16, 16
    shapes = shapes or [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048), (4096, 14336),
                        (14336, 4096)]

    def record(name, K, N, M, sec, **extra):
        RESULTS["rows"].append(dict(section="kernels", name=name, K=K, N=N, M=M,
                                    seconds=sec, **extra))

    with torch.no_grad():
        for K, N in shapes:
            sets = max(2, math.ceil(160e6 / (N * K * 2)))  # more bytes than the L2 holds
            Ws = [torch.randn(N, K, device=d, dtype=dtype) * 0.02 for _ in range(sets)]
            As = [torch.randn(r, K, device=d, dtype=dtype) * 0.02 for _ in range(sets)]
            Bs = [torch.randn(N, r, device=d, dtype=dtype) * 0.02 for _ in range(sets)]
            for M in rows:
                x = torch.randn(M, K, device=d, dtype=dtype)
                t = {}
                t["merged (cuBLAS)"] = _graph_time([lambda W=W, x=x: F.linear(x, W) for W in Ws])
                t["lora cuBLAS 3 kernels"] = _graph_time(
                    [lambda W=W, A=A, B=B, x=x: _fused_forward(x, W, None, A, B, 2.0)
                     for W, A, B in zip(Ws, As, Bs)])
                t["lora triton fused"] = _graph_time(
                    [lambda W=W, A=A, B=B, x=x: tlr.lora_matmul(x, W, None, A, B, 2.0)
                     for W, A, B in zip(Ws, As, Bs)])
                if sweep and M in (1, 32):
                    best = (math.inf, None)
                    for bn, bk, sk, nw, ns in grid or SWEEP:
                        if K // sk < bk:
                            continue
                        cfg = dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=bn, BLOCK_K=bk,
                                   GROUP_M=1, SPLIT_K=sk, num_warps=nw, num_stages=ns)
                        tlr.set_config_override(cfg)
                        try:
                            sec = _graph_time(
                                [lambda W=W, A=A, B=B, x=x: tlr.lora_matmul(x, W, None, A, B, 2.0)
                                 for W, A, B in zip(Ws, As, Bs)], 10)
                        except Exception as e:  # e.g. out of shared memory
                            sec = math.nan
                            log(f"    config {cfg} failed: {type(e).__name__}")
                        finally:
                            tlr.set_config_override(None)
                        record("sweep", K, N, M, sec, config=[bn, bk, sk, nw, ns])
                        log(f"    sweep K={K} N={N} M={M} {[bn, bk, sk, nw, ns]} "
                            f"{sec * 1e6:.1f}us")
                        if sec < best[0]:
                            best = (sec, [bn, bk, sk, nw, ns])
                    t["lora triton best of sweep"] = best[0]
                    record("sweep best", K, N, M, best[0], config=best[1])
                if M == 32:
                    n_ad = 32
                    Am = [torch.randn(r, K, device=d, dtype=dtype) * 0.02 for _ in range(n_ad)]
                    Bm = [torch.randn(N, r, device=d, dtype=dtype) * 0.02 for _ in range(n_ad)]
                    a_cat, b_cat, offs = stack_concat(Am, Bm, [2.0] * n_ad, dtype)
                    mask = concat_mask(list(range(32)), offs, dtype, d)
                    a_st, b_st = stack_padded(Am, Bm, [2.0] * n_ad, dtype)
                    b_st = tlr.expand_layout(b_st)
                    idx = torch.arange(32, device=d, dtype=torch.int32)
                    x3 = x.view(32, 1, K)
                    t["mixed-32 cuBLAS concat"] = _graph_time(
                        [lambda W=W, x3=x3, m=mask, a=a_cat, b=b_cat: multi_lora_concat(
                            x3, F.linear(x3, W), m, a, b)
                         for W in Ws])
                    t["mixed-32 triton bgmv 2 launches"] = _graph_time(
                        [lambda W=W, x=x, a=a_st, b=b_st, i=idx:
                         tlr.bgmv_matmul(x, W, None, a, b, i, fused=False)
                         for W in Ws])
                    t["mixed-32 triton bgmv fused"] = _graph_time(
                        [lambda W=W, x=x, a=a_st, b=b_st, i=idx:
                         tlr.bgmv_matmul(x, W, None, a, b, i)
                         for W in Ws])
                    b_cat = tlr.concat_layout(b_st)
                    for fused in (False, True):
                        t[f"mixed-32 triton concat {'fused' if fused else '2 launches'}"] = \
                            _graph_time([lambda W=W, x=x, a=a_st, b=b_st, i=idx, f=fused,
                                         c=b_cat: tlr.bgmv_matmul(x, W, None, a, b, i, fused=f,
                                                                  b_concat=c) for W in Ws])
                    # cuBLAS base, then the kernel adds only the LoRA term
                    for programs in (256, 512, 1024):
                        tlr.SHRINK_PROGRAMS, before = programs, tlr.SHRINK_PROGRAMS
                        t[f"mixed-32 cuBLAS + triton add gather, shrink {programs}"] = \
                            _graph_time([lambda W=W, x=x, a=a_st, b=b_st, i=idx:
                                         tlr.bgmv_matmul(x, None, None, a, b, i, fused=False,
                                                         out=F.linear(x, W)) for W in Ws])
                        tlr.SHRINK_PROGRAMS = before
                    for fused in (False, True):
                        for c in (None, b_cat):
                            kind = "concat" if c is not None else "gather"
                            launches = "fused" if fused else "2 launches"
                            t[f"mixed-32 cuBLAS + triton add {kind} {launches}"] = _graph_time(
                                [lambda W=W, x=x, a=a_st, b=b_st, i=idx, f=fused, c=c:
                                 tlr.bgmv_matmul(x, None, None, a, b, i, fused=f, b_concat=c,
                                                 out=F.linear(x, W)) for W in Ws])
                base = t["merged (cuBLAS)"]
                for name, sec in t.items():
                    record(name, K, N, M, sec, ratio_vs_merged=sec / base)
                log(f"  kernels K={K:<5} N={N:<5} M={M:<3} " + "  ".join(
                    f"{n}: {s * 1e6:6.1f}us ({s / base:.2f}x)" for n, s in t.items()))
            del Ws, As, Bs
            peak_reset()


def large_m_bench(tokens: int) -> None:
    """One adapted 4096 -> 14336 linear at ``tokens`` rows, forward only: cuBLAS merged,
    the cuBLAS LoRA path, the Triton kernel computing h per tile (mode 0) and with h
    computed once beforehand by cuBLAS (mode 1), for a few tile shapes."""
    from deltatune.kernels import triton_lora as tlr
    from deltatune.kernels.lora_linear import _fused_forward

    d, dtype, r = dev(), torch.bfloat16, 16
    K, N = 4096, 14336
    x = torch.randn(tokens, K, device=d, dtype=dtype)
    W = torch.randn(N, K, device=d, dtype=dtype) * 0.02
    A = torch.randn(r, K, device=d, dtype=dtype) * 0.02
    B = torch.randn(N, r, device=d, dtype=dtype) * 0.02
    t = {}
    with torch.no_grad():
        t["merged (cuBLAS)"] = timeit(lambda: F.linear(x, W), 20, 3)
        t["lora cuBLAS 3 kernels"] = timeit(lambda: _fused_forward(x, W, None, A, B, 2.0), 20, 3)
        for cfg in ((128, 128, 64, 8, 3, 8), (128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8),
                    (64, 256, 64, 4, 4, 8), (128, 128, 64, 4, 4, 8)):
            bm, bn, bk, nw, ns, gm = cfg
            tlr.set_config_override(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                                         SPLIT_K=1, num_warps=nw, num_stages=ns))
            try:
                t[f"triton h-in-loop {cfg}"] = timeit(
                    lambda: tlr.lora_matmul(x, W, None, A, B, 2.0), 20, 3)
                t[f"triton h-given {cfg}"] = timeit(
                    lambda: tlr.lora_matmul(x, W, None, A, B, 2.0, h=x @ A.t()), 20, 3)
                t[f"triton no-lora {cfg}"] = timeit(
                    lambda: tlr.lora_matmul(x, W, None, A, B * 0, 2.0, h=x[:, :r]), 20, 3)
            except Exception as e:
                log(f"    config {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
            finally:
                tlr.set_config_override(None)
    base = t["merged (cuBLAS)"]
    for name, sec in t.items():
        RESULTS["rows"].append(dict(section="large_m", name=name, tokens=tokens, K=K, N=N,
                                    seconds=sec, ratio_vs_merged=sec / base))
        log(f"  large-M {name:<44} {sec * 1e3:8.3f} ms  {sec / base:.3f}x merged")


# --------------------------------------------------------------------------- layer
BACK_TO_BACK = 10  # steps per timed sample in the layer's back-to-back rows


def layer_bench(tokens: int, reps: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    d, dtype = dev(), torch.bfloat16
    d_in, d_out, r = (4096, 14336, 16) if d.type == "cuda" else (64, 96, 4)
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out, bias=False, device=d, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, d_in, device=d, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, d_out, device=d, dtype=dtype)
    A = (torch.randn(r, d_in, device=d, dtype=dtype) * 0.02).requires_grad_()
    B = (torch.randn(d_out, r, device=d, dtype=dtype) * 0.02).requires_grad_()

    def step(f):
        def run():
            out = f()
            out.backward(gy)
            x.grad = None
            A.grad = B.grad = None
        return run

    rows = {}
    rows["frozen"] = timeit(step(lambda: lin(x)), reps)
    rows["deltatune fast"] = timeit(step(lambda: lora_linear(x, lin.weight, None, A, B, 2.0)),
                                    reps)
    with tma_off():
        rows["deltatune fast (cuBLAS, expand first)"] = timeit(
            step(lambda: lora_linear(x, lin.weight, None, A, B, 2.0)), reps)
    # opt-in until measured: gB and dB from one pass over the output gradient
    os.environ["DELTATUNE_FUSED_LORA_GRAD"] = "1"
    rows["deltatune fast (fused gB/dB backward)"] = timeit(
        step(lambda: lora_linear(x, lin.weight, None, A, B, 2.0)), reps)
    os.environ.pop("DELTATUNE_FUSED_LORA_GRAD")
    rows["deltatune plain"] = timeit(
        step(lambda: lora_linear_reference(x, lin.weight, None, A, B, 2.0)), reps)
    for label, fp32 in (("peft default (fp32 adapters)", True), ("peft bf16 adapters", False)):
        holder = nn.Module()
        holder.lin = lin
        holder = inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["lin"]), holder)
        for p in lora_params(holder):
            p.data = p.data.to(torch.float32 if fp32 else dtype)
        randomize(lora_params(holder), std=0.02)
        rows[label] = timeit(step(lambda h=holder: h.lin(x)), reps)
        holder.lin = holder.lin.base_layer  # unwrap for the next variant
    # Each row above is one step timed alone: the GPU idles while the host issues the
    # step's first kernels (for the fast path ~0.45 ms: the shrink, then the Triton
    # launch), which a model's next layer would hide. Steps issued back to back, as in
    # training, count only the GPU's time.
    for label, f in (("frozen", lambda: lin(x)),
                     ("deltatune fast", lambda: lora_linear(x, lin.weight, None, A, B, 2.0))):
        run = step(f)
        rows[f"{label}, {BACK_TO_BACK} back to back"] = timeit(
            lambda run=run: [run() for _ in range(BACK_TO_BACK)], reps) / BACK_TO_BACK
    for name, sec in rows.items():
        ref = rows[f"frozen, {BACK_TO_BACK} back to back" if "back to back" in name
                   else "frozen"]
        RESULTS["rows"].append(dict(section="layer", name=name, seconds=sec, tokens=tokens,
                                    shape=[d_in, d_out], r=r, ratio_vs_frozen=sec / ref))
        log(f"  layer {name:<32} {sec * 1e3:8.3f} ms  {sec / ref:.3f}x frozen")


# --------------------------------------------------------------------------- train
def dynamo_counts() -> dict:
    """torch._dynamo's compile counters: frames compiled, graphs, recompiles (guard failures)."""
    from torch._dynamo.utils import counters

    return dict(frames_ok=counters["frames"]["ok"], frames_total=counters["frames"]["total"],
                unique_graphs=counters["stats"]["unique_graphs"],
                recompiles=sum(counters["recompiles"].values()),
                graph_breaks=sum(counters["graph_break"].values()))


def count_flops(shape: str, n_params: int, seq: int) -> float:
    """Training FLOPs per token with frozen weights: 4N + causal attention (fwd+2x bwd)."""
    s = SHAPES[shape]
    attn = 3 * 2 * s["num_hidden_layers"] * seq * s["hidden_size"]  # 4·T·d fwd, /2 causal
    return 4 * n_params + attn


def train_bench(shape: str, batch: int, seq: int, steps: int, variants: list[str],
                checkpointing: bool) -> None:
    d = dev()
    g = torch.Generator(device="cpu").manual_seed(0)
    vocab = SHAPES[shape]["vocab_size"]
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(d)
    for variant in variants:
        peak_reset()
        model = build(shape)
        n_params = sum(p.numel() for p in model.parameters())
        patches = contextlib.ExitStack()
        if variant.endswith("+ Liger"):
            try:
                # PEFT gets Liger's loss too (fused linear + CE); deltatune keeps its own
                # (what TrainConfig.liger_kernel runs)
                patches.enter_context(liger_kernels(
                    model, liger_loss=not variant.startswith("deltatune")))
            except Exception as e:  # not carried, or this transformers is not supported
                RESULTS["rows"].append(dict(
                    section="train", shape=shape, name=variant, checkpointing=checkpointing,
                    batch=batch, seq=seq, seconds=math.nan, tokens_per_s=math.nan,
                    mfu=math.nan, peak_gib=math.nan, dtype_adapters="-", error=str(e)))
                log(f"  train {shape} {variant}: {e}")
                continue
        if variant == "full FT":
            net, params = model, list(model.parameters())
        elif variant.startswith("peft"):
            net = attach_peft(model, bf16="bf16" in variant)
            params = lora_params(net)
        else:
            net = attach_dt(model)
            net.set_trainable("default")
            params = net.trainable_parameters()
        if variant != "full FT":
            randomize(params, std=0.02)
        if checkpointing:
            (net.model if isinstance(net, dt.DeltaModel) else net).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        compiled = variant.endswith(" compiled")
        if compiled:
            # one compiled decoder layer, reused by all of them (same code, same shapes):
            # fuses RMSNorm, RoPE, SiLU*mul and the residual adds around the matmuls
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()  # per-variant counts
            compile_layers(net)  # what TrainConfig(compile_layers=True) runs (PEFT too)
        net.train()
        opt = torch.optim.AdamW(params, lr=1e-5, fused=d.type == "cuda")
        mode = "off" if variant.startswith("deltatune plain") else "on" if d.type == "cpu" \
            else "auto"
        fused_ce = variant.startswith("deltatune fast") and "HF loss" not in variant

        def step(net=net, opt=opt, fused_ce=fused_ce, mode=mode):
            with fast_path(mode):
                if fused_ce:
                    loss = causal_lm_loss(net, ids, ids, use_cache=False)
                else:
                    loss = net(input_ids=ids, labels=ids, use_cache=False).loss
                # Inside the mode: checkpointed layers recompute in backward.
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        t0 = time.perf_counter()
        try:
            sec = timeit(step, steps, warmup=2)
            peak = peak_gib()
            err = None
        except Exception as e:  # out of memory or a compile failure: report, keep going
            sec, peak, err = float("nan"), float("nan"), f"{type(e).__name__}: " + \
                str(e).split("\n")[0][:300]
        extra = {}
        if compiled:
            extra = dict(compile_and_timing_s=time.perf_counter() - t0,
                         dynamo=dynamo_counts())
        tok = batch * seq
        mfu = count_flops(shape, n_params, seq) * tok / sec / (PEAK_TFLOPS * 1e12)
        row = dict(section="train", shape=shape, name=variant, checkpointing=checkpointing,
                   batch=batch, seq=seq, seconds=sec, tokens_per_s=tok / sec, mfu=mfu,
                   peak_gib=peak, dtype_adapters=str(params[0].dtype), error=err, **extra)
        RESULTS["rows"].append(row)
        log(f"  train {shape} ckpt={checkpointing!s:<5} {variant:<32} {sec:7.3f} s/step "
            f"{tok / sec:9.0f} tok/s  MFU {mfu * 100:5.1f}%  peak {peak:6.1f} GiB  "
            f"adapters {row['dtype_adapters']}{'  ' + err if err else ''}")
        patches.close()
        del net, model, opt, params, step
        peak_reset()


def profile_step(shape: str, batch: int, seq: int) -> None:
    """Print the top GPU kernels of one 'deltatune fast' training step (where time goes)."""
    from torch.profiler import ProfilerActivity, profile

    d = dev()
    ids = torch.randint(3, SHAPES[shape]["vocab_size"], (batch, seq), device=d)
    net = attach_dt(build(shape))
    net.set_trainable("default")
    randomize(net.trainable_parameters())
    net.train()

    def step():
        loss = causal_lm_loss(net, ids, ids, use_cache=False)
        loss.backward()
        net.zero_grad(set_to_none=True)

    step()
    step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                      max_name_column_width=70)
    log(table)
    net = None
    peak_reset()


# --------------------------------------------------------------------------- infer
def infer_bench(shape: str, prefill_batch: int, prefill_len: int, decode_tokens: int,
                frameworks: list[str], reps: int) -> None:
    d = dev()
    vocab = SHAPES[shape]["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(3, vocab, (prefill_batch, prefill_len), generator=g).to(d)
    short = torch.randint(3, vocab, (32, 16), generator=g).to(d)
    names32 = [f"a{i}" for i in range(32)]

    def prefill(net, rows=None):
        kw = {} if rows is None else dict(**rows)
        with torch.no_grad():
            return net(input_ids=prompt, logits_to_keep=1, use_cache=False, **kw).logits

    def decode(net, batch, rows=None):
        kw = dict(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                  pad_token_id=0)
        if rows is not None:
            kw.update(rows)
        with torch.no_grad():
            net.generate(short[:batch], attention_mask=torch.ones_like(short[:batch]), **kw)

    def record(fw, what, sec, per_token=False, batch=None):
        RESULTS["rows"].append(dict(section="infer", shape=shape, framework=fw, name=what,
                                    seconds=sec, per_token=per_token, batch=batch))
        unit = "ms/token" if per_token else "ms"
        log(f"  infer {shape} {fw:<10} {what:<24} {sec * 1e3:9.3f} {unit}")

    for fw in frameworks:
        peak_reset()
        model = build(shape).eval()
        # Untimed warm-up: clocks, allocator, cuBLAS handles (the first framework would pay).
        prefill(model)
        decode(model, 1)
        decode(model, 32)
        record(fw, "prefill base", timeit(lambda m=model: prefill(m), reps))
        for b in (1, 32):
            record(fw, f"decode b{b} base",
                   timeit(lambda m=model, b=b: decode(m, b), 3, 1) / decode_tokens, True, b)
        if fw == "deltatune":
            net = attach_dt(model, name="a0")
            randomize(lora_params(net), seed=2)
            rowkw = "delta_names"
        else:
            net = attach_peft(model, bf16=fw == "peft-bf16", name="a0")
            randomize(lora_params(net), seed=2)
            rowkw = "adapter_names"
        net.eval()
        record(fw, "prefill unmerged", timeit(lambda n=net: prefill(n), reps))
        if fw == "deltatune":
            # the LoRA kernels, as before the folded weight (kernels/fold_lora.py)
            with env_vars(DELTATUNE_FOLD_LORA="0"):
                record(fw, "prefill unmerged (LoRA kernels)",
                       timeit(lambda n=net: prefill(n), reps))
            with tma_off():
                record(fw, "prefill unmerged (cuBLAS, expand first)",
                       timeit(lambda n=net: prefill(n), reps))
        for b in (1, 32):
            record(fw, f"decode b{b} unmerged",
                   timeit(lambda b=b, n=net: decode(n, b), 3, 1) / decode_tokens, True, b)
        if fw == "deltatune":
            net.merge()
        else:
            net.merge_adapter()
        record(fw, "prefill merged", timeit(lambda n=net: prefill(n), reps))
        for b in (1, 32):
            record(fw, f"decode b{b} merged",
                   timeit(lambda b=b, n=net: decode(n, b), 3, 1) / decode_tokens, True, b)
        if fw == "deltatune":
            net.unmerge()
        else:
            net.unmerge_adapter()
        for name in names32[1:]:
            if fw == "deltatune":
                attach_dt(net, name=name)
            else:
                from peft import LoraConfig
                net.add_adapter(name, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=TARGETS))
        if fw != "deltatune":
            for n, p in net.named_parameters():
                if "lora_" in n:
                    p.data = p.data.to(torch.bfloat16 if fw == "peft-bf16" else torch.float32)
            net.set_adapter("a0")
        randomize(lora_params(net), seed=3)
        for k in (4, 32):
            rows = {rowkw: [names32[i % k] for i in range(prefill_batch)]}
            record(fw, f"prefill mixed-{k}", timeit(
                lambda rows=rows, n=net: prefill(n, rows), reps))
            rows32 = {rowkw: [names32[i % k] for i in range(32)]}
            sec = timeit(lambda r_=rows32, n=net: decode(n, 32, r_), 1, 1)
            record(fw, f"decode b32 mixed-{k}", sec / decode_tokens, True, 32)
        net = model = None
        peak_reset()


# --------------------------------------------------------------------------- graph decode
def at_same_position(dec, fn):
    """Return ``fn`` wrapped to put the static cache's fill counters back first.

    Every decode step advances them, so a step repeated for timing or profiling would run
    past the cache; restored (a device-to-device copy per layer) it decodes the same
    position each time.
    """
    restore = dec.restore_point()

    def again() -> None:
        restore()
        fn()
    return again


def time_step(dec, reps: int) -> float:
    """Median seconds of one decode step of ``dec`` (its graph replayed; eager on the CPU),
    the counter reset outside the timed region."""
    restore = dec.restore_point()
    replay = dec.graph.replay if dec.graph is not None else torch.no_grad()(dec._step)
    times = []
    for i in range(reps + 2):
        restore()
        sync()
        sec = time_once(replay)
        if i >= 2:
            times.append(sec)
    restore()
    return statistics.median(times)


def profile_replay(replay, label: str, top: int = 12) -> None:
    """Log the kernels of one graph replay (count, total us, top kernels by time)."""
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"
               and "Memcpy" not in e.name and "Memset" not in e.name]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    total = sum(sum(v) for v in by_name.values())
    log(f"  profile {label}: {len(kernels)} kernels, {total:.0f} us of kernel time")
    RESULTS["rows"].append(dict(section="decode_profile", name=label, kernels=len(kernels),
                                kernel_us=total, top={k: [len(v), sum(v)] for k, v in sorted(
                                    by_name.items(), key=lambda kv: -sum(kv[1]))[:top]}))
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        log(f"    {len(times):4d} x {sum(times) / len(times):7.2f} us = {sum(times):8.1f} us  "
            f"{name}")


def graph_decode_bench(shape: str, decode_tokens: int, reps: int,
                       profile: bool = False) -> None:
    """Decode per token with every step replayed from a CUDA graph (static KV cache), for
    base, merged, unmerged and mixed batches alike, plus an adapter switch by copy_."""
    from deltatune.kernels.graph_decode import GraphDecoder

    d = dev()
    vocab = SHAPES[shape]["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    short = torch.randint(3, vocab, (32, 16), generator=g).to(d)
    max_len = short.shape[1] + decode_tokens
    names32 = [f"a{i}" for i in range(32)]

    def record(what, batch, sec, **extra):
        RESULTS["rows"].append(dict(section="graph_decode", shape=shape, framework="deltatune",
                                    name=what, seconds=sec, per_token=True, batch=batch,
                                    **extra))
        log(f"  graph {shape} {what:<26} b{batch:<3} {sec * 1e3:8.3f} ms/token "
            f"{' '.join(f'{k}={v}' for k, v in extra.items())}")

    # left-padded prompts: row i has i % 8 pad tokens (GraphDecoder's padded graphs)
    padding = torch.ones_like(short)
    for i in range(padding.shape[0]):
        padding[i, :i % 8] = 0

    def run(net, what, batches=(1, 32), rows=None, padded=False, sampling=None):
        for b in batches:
            kw = None if rows is None else {"delta_names": rows[:b]}
            mask = padding[:b] if padded else None
            opts = dict(forward_kwargs=kw, sampling=sampling)

            def gen(dec, b=b, mask=mask):
                return dec.generate(short[:b], decode_tokens, attention_mask=mask)
            try:
                dec = GraphDecoder(net, b, max_len, **opts)
                sec = timeit(lambda dec=dec: gen(dec), reps, 1)
                # one decode step alone (the captured graph replayed at the last position)
                step = time_step(dec, 4 * reps)
                # the prompt's forward pass run eagerly, as before prefill graphs
                old = GraphDecoder(net, b, max_len, graph_prefill=False, **opts)
                sec_eager_prefill = timeit(lambda dec=old: gen(dec), reps, 1)
                # the same static-cache steps without the graph: the replay must agree
                # (sampled tokens differ by design: not compared)
                eager = GraphDecoder(net, b, max_len, use_graph=False, **opts)
                same = math.nan if sampling else float(
                    (gen(dec) == gen(eager)).float().mean())
                from deltatune.kernels.multi_lora import banks_of
                groups = sum(bank.shrink_group is not None and bank.shrink_group.banks[0] is bank
                             for bank in banks_of(net))
                whole = sum(bank.shrink_group is not None and bank.shrink_group.banks[0] is bank
                            and bank.shrink_group.b_joined is not None
                            for bank in banks_of(net))
                record(what, b, sec / decode_tokens, captures=dec.captures, shrink_groups=groups,
                       whole_groups=whole,
                       tokens_equal_eager=round(same, 4), step_ms=round(step * 1e3, 4),
                       eager_prefill_ms_per_token=round(sec_eager_prefill / decode_tokens
                                                        * 1e3, 4))
                if profile and dec.graph is not None:
                    profile_replay(at_same_position(dec, dec.graph.replay),
                                   f"{what} b{b} replay")
            except Exception as e:  # report, keep going
                log(traceback.format_exc(limit=-4))
                record(what, b, math.nan, error=f"{type(e).__name__}: {str(e)[:300]}")
            dec = old = None

    model = build(shape).eval()
    run(model, "base")
    net = attach_dt(model, name="a0")
    randomize(lora_params(net), seed=2)
    net.eval()
    run(net, "unmerged")
    run(net, "unmerged, left-padded", (32,), padded=True)
    from deltatune.kernels.sampling import Sampling
    run(net, "unmerged, sampled", (32,), sampling=Sampling(temperature=0.7, top_k=50,
                                                           top_p=0.9))
    net.merge()
    run(net, "merged")
    run(net, "merged, left-padded", (32,), padded=True)
    net.unmerge()
    for name in names32[1:]:
        attach_dt(net, name=name)
    randomize(lora_params(net), seed=3)
    for k in (4, 32):
        run(net, f"mixed-{k}", (32,), [names32[i % k] for i in range(32)])
    previous = os.environ.get("DELTATUNE_TRITON_BGMV")
    # "mixed-32" above is the default (auto) choice per linear; two layouts everywhere for
    # comparison. (Settled and dropped from the run: the Triton "concat" and "add-concat"
    # layouts, 128 shrink programs, the add at 8192 inputs and gathered prompts, all
    # slower in runs 165900-172626; see docs/performance.md.)
    os.environ["DELTATUNE_TRITON_BGMV"] = "0"
    run(net, "mixed-32 (cuBLAS concat)", (32,), [names32[i % 32] for i in range(32)])
    if previous is None:
        os.environ.pop("DELTATUNE_TRITON_BGMV")
    else:
        os.environ["DELTATUNE_TRITON_BGMV"] = previous
    # siblings sharing only their shrink (the sixth session's whole-output groups off);
    # groups form with the layouts, so the layers' caches are dropped before and after
    from deltatune.kernels import multi_lora, shared_shrink
    for whole in (False, True):
        for bank in multi_lora.banks_of(net):
            bank.clear()
        shared_shrink.WHOLE_GROUPS = whole
        if not whole:
            run(net, "mixed-32 (shrink-only groups)", (32,),
                [names32[i % 32] for i in range(32)])
    # opt-in: sibling base weights stacked (a copy) for one GEMV per group. (Settled and
    # dropped from the run: DELTATUNE_TRITON_PROMPT_ROWS, the prompt through the Triton
    # add layouts, 0.793 / 0.834 against 0.810 / 0.835 in run 20261201-202720.)
    for what, env in (("stacked sibling weights", {"DELTATUNE_STACK_SIBLINGS": "1"}),):
        os.environ.update(env)
        run(net, f"mixed-32 ({what})", (32,), [names32[i % 32] for i in range(32)])
        for key in env:
            os.environ.pop(key)
    dec = None
    try:
        # the same with a mixed batch: its graph reads the AdapterBank's side-by-side
        # layouts, which generate() rewrites in place when an adapter changed
        kw = {"delta_names": [names32[i % 32] for i in range(32)]}
        dec = GraphDecoder(net, 32, max_len, forward_kwargs=kw)
        before = dec.generate(short, decode_tokens)
        net.load_delta_state_dict(net.delta_state_dict("a2"), "a1")
        after = dec.generate(short, decode_tokens)
        want = GraphDecoder(net, 32, max_len, use_graph=False,
                            forward_kwargs=kw).generate(short, decode_tokens)
        same = float((after == want).float().mean())
        changed = bool((after != before).any())
        RESULTS["rows"].append(dict(section="graph_decode", shape=shape,
                                    name="mixed adapter switch", captures=dec.captures,
                                    tokens_equal_eager_after_switch=same, changed=changed))
        log(f"  graph {shape} mixed-32 adapter switch by copy_: captures {dec.captures}, "
            f"replay after switch equal to eager {same:.3f}, output changed {changed}")
    except Exception as e:  # report, keep going
        log(f"  graph {shape} mixed adapter switch failed: {type(e).__name__}: {e}")
    dec = None
    try:
        # a pooled decoder (adapters=[...]): another row assignment per call, same graphs
        dec = GraphDecoder(net, 32, max_len, adapters=names32)
        shuffled = [names32[(7 * i + 3) % 32] for i in range(32)]
        for rows in ([names32[i % 32] for i in range(32)], shuffled):
            sec = timeit(lambda rows=rows, pooled=dec: pooled.generate(
                short, decode_tokens, delta_names=rows), 3, 1)
            step = time_step(dec, 12)
            want = GraphDecoder(net, 32, max_len, use_graph=False,
                                forward_kwargs={"delta_names": rows}).generate(short,
                                                                               decode_tokens)
            same = float((dec.generate(short, decode_tokens, delta_names=rows) == want)
                         .float().mean())
            record("mixed-32 pooled, rerouted" if rows is shuffled else "mixed-32 pooled", 32,
                   sec / decode_tokens, captures=dec.captures, tokens_equal_eager=same,
                   step_ms=round(step * 1e3, 4))
    except Exception as e:  # report, keep going
        log(traceback.format_exc(limit=-4))
        log(f"  graph {shape} pooled decoder failed: {type(e).__name__}: {e}")
    dec = None
    try:
        # adapter switch: copy a1's tensors into a0's (what a server does between
        # requests), a0 being the one active delta; the captured decoder replays the same
        # graph and must give what an eager decode with the new weights gives.
        net.activate("a0")
        dec = GraphDecoder(net, 32, max_len)
        before = dec.generate(short, decode_tokens)
        a1 = net.delta_state_dict("a1")
        sync()
        t0 = time.perf_counter()
        net.load_delta_state_dict(a1, "a0")
        sync()
        switch = time.perf_counter() - t0
        after = dec.generate(short, decode_tokens)
        want = GraphDecoder(net, 32, max_len, use_graph=False).generate(short, decode_tokens)
        same = float((after == want).float().mean())
        changed = bool((after != before).any())
        RESULTS["rows"].append(dict(section="graph_decode", shape=shape, name="adapter switch",
                                    seconds=switch, captures=dec.captures,
                                    tokens_equal_eager_after_switch=same, changed=changed))
        log(f"  graph {shape} adapter switch by copy_: {switch * 1e3:.2f} ms, captures "
            f"{dec.captures}, replay after switch equal to eager {same:.3f}, output changed "
            f"{changed}")
    except Exception as e:  # report, keep going
        RESULTS["rows"].append(dict(section="graph_decode", shape=shape,
                                    name="adapter switch", seconds=math.nan,
                                    error=f"{type(e).__name__}: {str(e)[:300]}"))
        log(f"  graph {shape} adapter switch failed: {e}")
    del dec, net, model
    peak_reset()


# --------------------------------------------------------------------------- summary
def div(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or either is missing."""
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def summary() -> None:
    rows = RESULTS["rows"]

    def get(**kw):
        hits = [r for r in rows if all(r.get(k) == v for k, v in kw.items())]
        return hits[0]["seconds"] if hits else float("nan")

    log("\n=== ratios (lower is better unless noted) ===")
    lay = {r["name"]: r for r in rows if r["section"] == "layer"}
    for name, r in lay.items():
        log(f"layer  {name:<34} {r['ratio_vs_frozen']:.3f}x frozen layer (target <= 1.10)")
    for r in rows:
        if r["section"] == "train":
            log(f"train {r['shape']} ckpt={r['checkpointing']!s:<5} {r['name']:<30} "
                f"{r['seconds']:.3f}s  MFU {r['mfu'] * 100:5.1f}%  peak {r['peak_gib']:.1f} GiB")
    shapes = sorted({r["shape"] for r in rows if r["section"] == "train"})
    for shape in shapes:
        for ck in (False, True):
            fast = get(section="train", shape=shape, name="deltatune fast", checkpointing=ck)
            pdef = get(section="train", shape=shape, name="peft default", checkpointing=ck)
            pbf = get(section="train", shape=shape, name="peft bf16", checkpointing=ck)
            liger = get(section="train", shape=shape, name="peft bf16 + Liger",
                        checkpointing=ck)
            mem = {r["name"]: r["peak_gib"] for r in rows if r["section"] == "train"
                   and r["shape"] == shape and r["checkpointing"] == ck}
            log(f"train {shape} ckpt={ck}: fast/peft-default {div(fast, pdef):.3f} (target <= 0.55)"
                f"  fast/peft-bf16 {div(fast, pbf):.3f} (target <= 0.8)  peak fast/peft-default "
                f"{div(mem.get('deltatune fast', math.nan), mem.get('peft default', math.nan)):.3f}"
                f" (target <= 0.6)  peak fast/full-FT "
                f"{div(mem.get('deltatune fast', math.nan), mem.get('full FT', math.nan)):.3f}"
                f"  fast/peft-bf16+Liger {div(fast, liger):.3f}")
    fws = sorted({r["framework"] for r in rows if r["section"] == "infer"})
    for shape in sorted({r["shape"] for r in rows if r["section"] in ("infer", "graph_decode")}):
        for fw in fws:
            def s(name, fw=fw, shape=shape):
                return get(section="infer", shape=shape, framework=fw, name=name)
            log(f"infer {shape} {fw:<10} prefill unmerged/merged "
                f"{div(s('prefill unmerged'), s('prefill merged')):.3f} (<=1.05; LoRA kernels "
                f"{div(s('prefill unmerged (LoRA kernels)'), s('prefill merged')):.3f})  "
                f"mixed-4/base {div(s('prefill mixed-4'), s('prefill base')):.3f}  "
                f"mixed-32/base {div(s('prefill mixed-32'), s('prefill base')):.3f}  "
                f"throughput mixed-32 vs unmerged "
                f"{div(s('prefill unmerged'), s('prefill mixed-32')):.3f} (>=0.85)")
            log(f"infer {shape} {fw:<10} decode unmerged/merged b1 "
                f"{div(s('decode b1 unmerged'), s('decode b1 merged')):.3f} b32 "
                f"{div(s('decode b32 unmerged'), s('decode b32 merged')):.3f} (<=1.10)  "
                f"b32 mixed-32 throughput vs unmerged "
                f"{div(s('decode b32 unmerged'), s('decode b32 mixed-32')):.3f} (>=0.85)")
        gd = {(r["name"], r["batch"]): r["seconds"] for r in rows
              if r["section"] == "graph_decode" and r["shape"] == shape and r.get("batch")}
        if gd:
            def q(name, b, gd=gd):
                return gd.get((name, b), math.nan)
            eager_b1 = get(section="infer", shape=shape, framework="deltatune",
                           name="decode b1 merged")
            log(f"graph {shape} decode unmerged/merged b1 "
                f"{div(q('unmerged', 1), q('merged', 1)):.3f} b32 "
                f"{div(q('unmerged', 32), q('merged', 32)):.3f} (<=1.10)  b32 mixed-32 "
                f"throughput vs unmerged {div(q('unmerged', 32), q('mixed-32', 32)):.3f} "
                f"(>=0.85; " + ", ".join(
                    f"{what} {div(q('unmerged', 32), q(f'mixed-32 ({what})', 32)):.3f}"
                    for what in ("stacked sibling weights",)) + ")"
                f"  merged b1 graph/eager {div(q('merged', 1), eager_b1):.3f}")
            steps = {(r["name"], r["batch"]): r.get("step_ms", math.nan) for r in rows
                     if r["section"] == "graph_decode" and r["shape"] == shape
                     and r.get("batch")}

            def st(name, b, steps=steps):
                return steps.get((name, b), math.nan)
            log(f"graph {shape} one decode step unmerged/merged b1 "
                f"{div(st('unmerged', 1), st('merged', 1)):.3f} b32 "
                f"{div(st('unmerged', 32), st('merged', 32)):.3f} (<=1.10)  b32 mixed-32 "
                f"throughput vs unmerged {div(st('unmerged', 32), st('mixed-32', 32)):.3f} "
                f"(>=0.85), shrink-only groups "
                f"{div(st('unmerged', 32), st('mixed-32 (shrink-only groups)', 32)):.3f}"
                ", stacked sibling weights "
                f"{div(st('unmerged', 32), st('mixed-32 (stacked sibling weights)', 32)):.3f}"
                ", cuBLAS concat "
                f"{div(st('unmerged', 32), st('mixed-32 (cuBLAS concat)', 32)):.3f}")
        if "deltatune" in fws:
            for fw in fws:
                if fw == "deltatune":
                    continue
                for name in ("prefill unmerged", "prefill mixed-4", "prefill mixed-32",
                             "decode b1 unmerged", "decode b32 unmerged", "decode b32 mixed-32"):
                    ours = get(section="infer", shape=shape, framework="deltatune", name=name)
                    theirs = get(section="infer", shape=shape, framework=fw, name=name)
                    log(f"infer {shape} deltatune/{fw:<10} {name:<22} {div(ours, theirs):.3f}")


def environment(argv: list[str]) -> dict:
    import peft
    import transformers

    info = dict(command="PYTHONPATH=src python bench/gpu_lora.py " + " ".join(argv),
                python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__,
                deltatune=dt.__version__, host=platform.node(),
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):
            import triton
            info["triton"] = triton.__version__
    return info


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--layer", action="store_true")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--infer", action="store_true")
    ap.add_argument("--profile", action="store_true", help="top kernels of one fast step")
    ap.add_argument("--profile-decode", action="store_true",
                    help="with --graph-decode: the kernels of one decode step per variant")
    ap.add_argument("--graph-decode", action="store_true",
                    help="decode with CUDA graphs (static KV cache) for every variant")
    ap.add_argument("--shapes", default="1b", help="comma list of 1b, 8b, tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--ckpt", default="0,1", help="gradient checkpointing settings to run")
    ap.add_argument("--variants", default="peft default,peft bf16,deltatune plain,"
                                          "deltatune fast (HF loss),deltatune fast,full FT")
    ap.add_argument("--frameworks", default="deltatune,peft,peft-bf16")
    ap.add_argument("--prefill", default="32x512", help="BATCHxLEN of the prefill batch")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--layer-tokens", type=int, default=16384)
    ap.add_argument("--kernels", action="store_true",
                    help="decode-sized LoRA linears: cuBLAS vs the Triton kernels (graphs)")
    ap.add_argument("--sweep", action="store_true", help="with --kernels: tile-config sweep")
    ap.add_argument("--sweep-wide", action="store_true",
                    help="with --kernels: warps and stages too, at --kernel-shapes, 1 and 32 rows")
    ap.add_argument("--kernel-shapes", default=None,
                    help="KxN list for --kernels (default: the 1B and 8B shapes; with "
                         "--sweep-wide 2048x8192,2048x2048)")
    ap.add_argument("--kernel-rows", default="1,16,32,64", help="rows for --kernels")
    ap.add_argument("--large-m", type=int, default=0,
                    help="tokens for the large-M Triton vs cuBLAS forward comparison (0: skip)")
    ap.add_argument("--train-shapes", default=None, help="shapes for --train (default --shapes)")
    args = ap.parse_args(argv)
    RESULTS["environment"] = environment(argv)
    log(json.dumps(RESULTS["environment"]))
    try:
        if args.check:
            check()
        if args.kernels:
            shapes = [tuple(int(v) for v in kn.split("x"))
                      for kn in args.kernel_shapes.split(",")] if args.kernel_shapes else None
            if args.sweep_wide:
                kernel_bench(True, shapes or [(2048, 8192), (2048, 2048)], (1, 32), SWEEP_WIDE)
            else:
                kernel_bench(args.sweep, shapes, tuple(int(v) for v in args.kernel_rows.split(",")))
        if args.large_m:
            large_m_bench(args.large_m)
        if args.layer:
            layer_bench(args.layer_tokens, args.reps * 2)
        for shape in (args.train_shapes or args.shapes).split(","):
            if not args.train:
                break
            for ck in args.ckpt.split(","):
                # "deltatune fast (HF loss)" uses the fused layers with HF's loss.
                variants = args.variants.split(",")
                train_bench(shape, args.batch, args.seq, args.steps, variants, ck == "1")
        if args.profile:
            profile_step(args.shapes.split(",")[0], args.batch, args.seq)
        if args.graph_decode:
            for shape in args.shapes.split(","):
                graph_decode_bench(shape, args.decode_tokens, 3, args.profile_decode)
        if args.infer:
            pb, pl = (int(v) for v in args.prefill.split("x"))
            for shape in args.shapes.split(","):
                infer_bench(shape, pb, pl, args.decode_tokens, args.frameworks.split(","),
                            args.reps)
    finally:
        save_results("gpu_lora", RESULTS)
    summary()


if __name__ == "__main__":
    main()
