"""Can a Triton GEMM with TMA loads carry the LoRA expand in its epilogue at cuBLAS speed?

The one-layer (<= 1.10x frozen) and prefill (<= 1.05x merged) targets of issue 11 are
bounded by the expand pass: cuBLAS cannot add ``s h B^T`` inside its GEMM, so the fast path
writes it first and lets the GEMM read it back (``addmm`` with beta = 1). A GEMM of our own
could add it in the epilogue, but a plain Triton GEMM ran 1.43x cuBLAS on an H200 (third
session). This probe times a persistent Triton GEMM fed by tensor-memory-accelerator (TMA)
descriptors, with and without the epilogue, against cuBLAS alone and cuBLAS + expand pass,
at the layer and 1B prefill shapes (bf16). Correctness first (against float32 torch), then
a table; JSON to bench/results/.

    PYTHONPATH=src python bench/tma_probe.py
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = [(16384, 4096, 14336), (16384, 2048, 8192), (16384, 2048, 2048),
          (16384, 8192, 2048), (16384, 2048, 512), (4096, 2048, 8192),
          (4096, 2048, 2048), (4096, 4096, 14336)]  # (M, K, N)
CONFIGS = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8),
           (128, 128, 64, 3, 4), (64, 256, 64, 4, 4)]  # BM, BN, BK, stages, warps
# (128, 256, 64, 4, 8) and (128, 128, 128, 3, 8) need more than the H200's 227 KiB of
# shared memory (tma_probe-20261201-185349)
RANK = 16


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemm_lora(x_desc, w_desc, y_desc, h_desc, b_desc, M, N, K,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr,
                  GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, LORA: tl.constexpr):
        # persistent: each program walks tiles PROGRAMS apart, grouped along M so that a
        # band of W tiles stays in L2; y = x W^T (+ h B^T, the scale folded into h)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        for tile in tl.range(tl.program_id(0), num_m * num_n, PROGRAMS, flatten=True):
            per_group = GROUP_M * num_n
            first_m = (tile // per_group) * GROUP_M
            size_m = tl.minimum(num_m - first_m, GROUP_M)
            off_m = (first_m + (tile % per_group) % size_m) * BM
            off_n = ((tile % per_group) // size_m) * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(k_tiles):
                xt = x_desc.load([off_m, ki * BK])
                wt = w_desc.load([off_n, ki * BK])
                acc = tl.dot(xt, wt.T, acc)
            if LORA:
                ht = h_desc.load([off_m, 0])
                bt = b_desc.load([off_n, 0])
                acc = tl.dot(ht, bt.T, acc)
            y_desc.store([off_m, off_n], acc.to(y_desc.dtype))

    return triton, gemm_lora


def triton_gemm(x, W, h, B, cfg, lora: bool, out=None):
    """y = x W^T (+ h B^T) by the persistent TMA kernel with tile configuration ``cfg``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    triton, kernel = _kernel()
    bm, bn, bk, stages, warps = cfg
    M, K = x.shape
    N = W.shape[0]
    y = out if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    kernel[(min(programs, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(W, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]), TensorDescriptor.from_tensor(h, [bm, RANK]),
        TensorDescriptor.from_tensor(B, [bn, RANK]), M, N, K,
        BM=bm, BN=bn, BK=bk, R=RANK, GROUP_M=8, PROGRAMS=programs, LORA=lora,
        num_stages=stages, num_warps=warps)
    return y


def cublas_expand_first(x, W, h, B):
    """The fast path's order: e = h B^T, then y = e + x W^T (cuBLAS reads e as C)."""
    return torch.addmm(h @ B.t(), x, W.t())


def timed(fn, reps: int = 10) -> float:
    """Milliseconds per call, median of ``reps`` after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def main() -> None:
    if not torch.cuda.is_available():
        print("tma_probe: no CUDA device; nothing to measure")
        return
    import triton

    dev, dtype = torch.device("cuda"), torch.bfloat16
    result = dict(environment=dict(
        command="PYTHONPATH=src python bench/tma_probe.py " + " ".join(sys.argv[1:]),
        torch=torch.__version__, triton=triton.__version__,
        gpu=torch.cuda.get_device_name(), host=platform.node(),
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())), rows=[])
    g = torch.Generator(device="cpu").manual_seed(0)
    print(f"{'M x K -> N':<22}{'cuBLAS':>8}{'+expand':>9}{'best TMA':>10}{'TMA+LoRA':>10}"
          f"{'TMA/cuBLAS':>12}{'TMA+LoRA/(cuBLAS+expand)':>26}  config")
    for M, K, N in SHAPES:
        x = torch.randn(M, K, generator=g).to(dev, dtype)
        W = (torch.randn(N, K, generator=g) * K ** -0.5).to(dev, dtype)
        h = (torch.randn(M, RANK, generator=g) * 0.1).to(dev, dtype)
        B = (torch.randn(N, RANK, generator=g) * 0.1).to(dev, dtype)
        ref = (x[:512].float() @ W.float().t() + h[:512].float() @ B.float().t())
        row = dict(M=M, K=K, N=N, configs={})
        row["cublas_ms"] = timed(lambda x=x, W=W: x @ W.t())
        row["cublas_expand_ms"] = timed(lambda x=x, W=W, h=h, B=B: cublas_expand_first(x, W, h, B))
        best = None
        for cfg in CONFIGS:
            try:
                got = triton_gemm(x, W, h, B, cfg, True)
                err = ((got[:512].float() - ref).norm() / ref.norm()).item()
                plain = timed(lambda c=cfg, a=(x, W, h, B): triton_gemm(*a, c, False))
                fused = timed(lambda c=cfg, a=(x, W, h, B): triton_gemm(*a, c, True))
            except Exception as e:  # report, keep going
                row["configs"][str(cfg)] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:200]}")
                continue
            row["configs"][str(cfg)] = dict(rel_err=err, plain_ms=plain, lora_ms=fused)
            if err > 1e-2:
                print(f"  {cfg}: WRONG (rel {err:.2e})")
                continue
            if best is None or fused < best[2]:
                best = (cfg, plain, fused)
        if best is not None:
            cfg, plain, fused = best
            row.update(best_config=list(cfg), tma_ms=plain, tma_lora_ms=fused)
            print(f"{f'{M} x {K} -> {N}':<22}{row['cublas_ms']:8.3f}"
                  f"{row['cublas_expand_ms']:9.3f}{plain:10.3f}{fused:10.3f}"
                  f"{plain / row['cublas_ms']:12.3f}{fused / row['cublas_expand_ms']:26.3f}  "
                  f"{cfg}")
        result["rows"].append(row)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for folder in filter(None, [os.environ.get("OUT"), "bench/results"]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"tma_probe-{stamp}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
