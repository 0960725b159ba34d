"""Where issue 11's unmet GPU targets lose their time: kernel tables and phase timings.

    PYTHONPATH=src python bench/profile_gaps.py [SECTION ...]   # CUDA only; JSON to
                                                  # bench/results/ and $OUT; default: all

Sections, each against its reference in the same run (also `fold`, `shrink` and
`tma_host`, probes described in their docstrings):
- layer: one adapted 4096 -> 14336 linear at 16384 rows, forward + backward, frozen and
  fast, the kernels of each;
- prefill: the 1B shape at 32 x 512 tokens: base, unmerged, merged, and the same two with
  the adapters' B zeroed (a zero delta: the activations equal the base model's, so what
  is left is the LoRA path's own cost, not the data's);
- generate: one 16-token `GraphDecoder.generate` at batch 32, split into its phases
  (layout refresh on the host, the prompt's graph, the steps, the rest).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback

import torch
from gpu_lora import (  # the bench helpers: models, timing, results
    RESULTS,
    attach_dt,
    build,
    env_vars,
    environment,
    layer_bench,
    log,
    lora_params,
    profile_replay,
    randomize,
    rel,
    save_results,
    sync,
    time_step,
    timeit,
)


def record(section: str, name: str, seconds: float, **extra) -> None:
    RESULTS["rows"].append(dict(section=section, name=name, seconds=seconds, **extra))
    log(f"  {section:<8} {name:<40} {seconds * 1e3:9.3f} ms "
        f"{' '.join(f'{k}={v}' for k, v in extra.items())}")


def layer_kernels() -> None:
    """The kernels of one adapted layer's forward + backward, frozen and fast."""
    from torch import nn

    from deltatune.kernels.lora_linear import lora_linear

    layer_bench(16384, 10)
    torch.manual_seed(0)
    d, dtype = torch.device("cuda"), torch.bfloat16
    lin = nn.Linear(4096, 14336, bias=False, device=d, dtype=dtype).requires_grad_(False)
    x = torch.randn(16384, 4096, device=d, dtype=dtype, requires_grad=True)
    gy = torch.randn(16384, 14336, device=d, dtype=dtype)
    a = (torch.randn(16, 4096, device=d, dtype=dtype) * 0.02).requires_grad_()
    b = (torch.randn(14336, 16, device=d, dtype=dtype) * 0.02).requires_grad_()

    def step(f):
        def run():
            f().backward(gy)
            x.grad = a.grad = b.grad = None
        return run
    profile_replay(step(lambda: lin(x)), "layer frozen", top=8)
    fast = step(lambda: lora_linear(x, lin.weight, None, a, b, 2.0))
    profile_replay(fast, "layer fast", top=14)
    os.environ["DELTATUNE_FUSED_LORA_GRAD"] = "1"  # g B and s g^T h from one pass over g
    profile_replay(fast, "layer fast, fused gB/dB backward", top=14)
    os.environ.pop("DELTATUNE_FUSED_LORA_GRAD")
    timeline(step(lambda: lin(x)), "layer frozen")
    timeline(fast, "layer fast")
    # the host's time to issue the forward and the backward (the GPU idles until the
    # first kernel of a step arrives: CUDA events count that)
    for label, f in (("frozen", lambda: lin(x)),
                     ("fast", lambda: lora_linear(x, lin.weight, None, a, b, 2.0))):
        fwd, bwd = [], []
        for _ in range(12):
            sync()
            t0 = time.perf_counter()
            out = f()
            t1 = time.perf_counter()
            out.backward(gy)
            t2 = time.perf_counter()
            sync()
            x.grad = a.grad = b.grad = None
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        record("layer", f"host {label}", statistics.median(fwd) + statistics.median(bwd),
               forward_host_us=round(statistics.median(fwd) * 1e6, 1),
               backward_host_us=round(statistics.median(bwd) * 1e6, 1))


def timeline(fn, label: str) -> None:
    """Log every kernel of one ``fn()`` with its start after the first and the idle gap
    before it (what CUDA-event timing counts beyond the kernels' own time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                     key=lambda e: e.time_range.start)
    t0 = kernels[0].time_range.start
    end, rows = t0, []
    for e in kernels:
        rows.append([round(e.time_range.start - t0, 1), round(e.device_time, 1),
                     round(e.time_range.start - end, 1), e.name[:70]])
        end = max(end, e.time_range.end)
    log(f"  timeline {label}: {len(rows)} kernels over {end - t0:.0f} us")
    for r in rows:
        log(f"    start {r[0]:9.1f}  dur {r[1]:8.1f}  gap {r[2]:7.1f}  {r[3]}")
    RESULTS["rows"].append(dict(section="timeline", name=label, kernels=rows))


def prefill_gaps(reps: int) -> None:
    """Prefill with a zero delta beside the real one: the LoRA path's cost apart from the
    data's (merged weights and adapted activations change the GEMMs' power draw)."""
    model = build("1b").eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(3, 128256, (32, 512), generator=g).cuda()

    def prefill(net):
        with torch.no_grad():
            return net(input_ids=prompt, logits_to_keep=1, use_cache=False).logits
    prefill(model)
    record("prefill", "base", timeit(lambda: prefill(model), reps))
    net = attach_dt(model, name="a0").eval()
    randomize(lora_params(net), seed=2)
    for label in ("", ", zero delta"):
        if label:
            with torch.no_grad():
                for n, p in net.named_parameters():
                    if "lora_B" in n:
                        p.zero_()
        record("prefill", f"unmerged{label}", timeit(lambda: prefill(net), reps))
        with env_vars(DELTATUNE_FOLD_LORA="0"):
            record("prefill", f"unmerged{label}, LoRA kernels (no fold)",
                   timeit(lambda: prefill(net), reps))
        if not label:
            profile_replay(lambda: prefill(net), "prefill unmerged", top=16)
        net.merge()
        record("prefill", f"merged{label}", timeit(lambda: prefill(net), reps))
        if not label:
            profile_replay(lambda: prefill(net), "prefill merged", top=10)
        net.unmerge()
    # the base model again, last: the GPU's clocks after the others (drift check)
    with net.disabled():
        record("prefill", "adapters disabled (base weights, last)",
               timeit(lambda: prefill(net), reps))


def generate_phases(reps: int) -> None:
    """One 16-token generation at batch 32 split into its phases, per variant."""
    from deltatune.kernels import multi_lora
    from deltatune.kernels.graph_decode import GraphDecoder

    model = build("1b").eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    short = torch.randint(3, 128256, (32, 16), generator=g).cuda()
    net = attach_dt(model, name="a0").eval()
    randomize(lora_params(net), seed=2)
    names = [f"a{i}" for i in range(32)]

    def phases(what: str, rows=None) -> None:
        kw = None if rows is None else {"delta_names": rows}
        dec = GraphDecoder(net, 32, 32, forward_kwargs=kw)
        total = timeit(lambda: dec.generate(short, 16), reps, 2)
        host = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            dec.generate(short, 16)
            host.append(time.perf_counter() - t0)  # includes the final .item()-free stack
        banks = dec._banks or multi_lora.banks_of(net)
        refresh = []
        for _ in range(20):
            t0 = time.perf_counter()
            multi_lora.refresh_layouts(banks)
            refresh.append(time.perf_counter() - t0)
        sync()
        prompt = timeit(lambda: (dec.cache.reset(), dec._prefill(short)), reps, 2)
        step = time_step(dec, 4 * reps)
        record("generate", what, total, host_ms=round(statistics.median(host) * 1e3, 3),
               refresh_ms=round(statistics.median(refresh) * 1e3, 3),
               prompt_graph_ms=round(prompt * 1e3, 3), step_ms=round(step * 1e3, 4),
               rest_ms=round((total - prompt - 15 * step - statistics.median(refresh)) * 1e3,
                             3))
        if rows is not None:
            profile_replay(lambda: (dec.cache.reset(), dec._prefill(short)),
                           f"prompt graph {what}", top=12)

    with net.disabled():
        phases("base (adapters disabled)")
    phases("unmerged")
    net.merge()
    phases("merged")
    net.unmerge()
    for name in names[1:]:
        attach_dt(net, name=name)
    randomize(lora_params(net), seed=3)
    phases("mixed-32", names)


def shrink_probe() -> None:
    """The many-row shrink ``h = x A^T`` (rank 16 to 48 columns): cuBLAS against a Triton
    kernel that reads x once for all columns (cuBLAS tiles 16 columns at a time, and a
    joined q/k/v shrink then reads x three times)."""
    import triton
    import triton.language as tl
    from triton.testing import do_bench

    @triton.jit
    def shrink(x_ptr, a_ptr, h_ptr, M, K, R, s_xm, s_ak, s_ar, s_hm,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :],
                         mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
            at = tl.load(a_ptr + rk[:, None] * s_ak + rr[None, :] * s_ar,
                         mask=(rk < K)[:, None] & (rr < R)[None, :], other=0.0)
            acc = tl.dot(xt, at, acc)
        tl.store(h_ptr + rm[:, None] * s_hm + rr[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rr < R)[None, :])

    for m, k, r in ((16384, 2048, 48), (16384, 2048, 32), (16384, 2048, 16),
                    (16384, 8192, 16), (16384, 4096, 16)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ref = x.float() @ a.float().t()
        cublas = do_bench(lambda x=x, a=a: x @ a.t(), warmup=25, rep=100)
        best = None
        for bm, bk, stages, warps in ((64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 3, 8),
                                      (64, 256, 3, 4), (32, 256, 4, 4)):
            h = torch.empty(m, r, device="cuda", dtype=torch.bfloat16)

            def run(x=x, a=a, h=h, cfg=(bm, bk, stages, warps), mkr=(m, k, r)):
                block_r = max(16, triton.next_power_of_2(mkr[2]))
                shrink[(triton.cdiv(mkr[0], cfg[0]),)](
                    x, a, h, *mkr, x.stride(0), a.stride(1), a.stride(0), h.stride(0),
                    BLOCK_M=cfg[0], BLOCK_K=cfg[1], BLOCK_R=block_r, num_stages=cfg[2],
                    num_warps=cfg[3])
            run()
            err = float((h.float() - ref).abs().max() / ref.abs().max())
            ms = do_bench(run, warmup=25, rep=100)
            if best is None or ms < best[0]:
                best = (ms, (bm, bk, stages, warps), err)
        gbs = m * k * 2 / (best[0] * 1e-3) / 1e9
        record("shrink", f"{m}x{k} r{r} cuBLAS", cublas * 1e-3)
        record("shrink", f"{m}x{k} r{r} Triton", best[0] * 1e-3, config=best[1],
               max_rel_err=f"{best[2]:.1e}", ratio=round(best[0] / cublas, 3),
               x_read_gbs=round(gbs))


def fold_probe() -> None:
    """One adapter on many rows, per linear shape of the 1B and 8B models: the merged GEMM,
    the LoRA kernels (the default before folding) and the folded scratch weight
    (kernels/fold_lora.py), at 1024 to 16384 rows; the crossover sets the fold policy."""
    from triton.testing import do_bench

    from deltatune.kernels import fold_lora
    from deltatune.kernels.lora_linear import lora_linear

    d, dtype = torch.device("cuda"), torch.bfloat16
    shapes = ((2048, 2048), (2048, 512), (2048, 8192), (8192, 2048),
              (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        w = torch.randn(d_out, d_in, device=d, dtype=dtype) * 0.02
        a = torch.randn(16, d_in, device=d, dtype=dtype) * 0.02
        b = torch.randn(d_out, 16, device=d, dtype=dtype) * 0.02
        merged = torch.addmm(w, b, a, alpha=2.0)
        for rows in (1024, 2048, 4096, 8192, 16384):
            x = torch.randn(rows, d_in, device=d, dtype=dtype)

            def call(x=x, w=w, a=a, b=b):
                return lora_linear(x, w, None, a, b, 2.0)

            def gemm(x=x, merged=merged):
                return torch.nn.functional.linear(x, merged)
            with torch.no_grad():
                ref = gemm()
                with env_vars(DELTATUNE_FOLD_LORA="always"):
                    err = rel(call(), ref)
                    fold = do_bench(call, warmup=10, rep=50)
                with env_vars(DELTATUNE_FOLD_LORA="0"):
                    kernels = do_bench(call, warmup=10, rep=50)
                base = do_bench(gemm, warmup=10, rep=50)
            record("fold", f"{d_in}->{d_out} rows {rows}", fold * 1e-3,
                   merged_ms=round(base, 4), kernels_ms=round(kernels, 4),
                   fold_over_merged=round(fold / base, 3),
                   kernels_over_merged=round(kernels / base, 3),
                   fold_over_kernels=round(fold / kernels, 3),
                   policy=fold_lora.pays(rows, d_in, d_out), rel_err=f"{err:.1e}")


def tma_host() -> None:
    """Where the host's time goes in one TMA LoRA GEMM call (cProfile of 50 calls, and
    its parts timed alone): the GPU idles while the host prepares a step's first launch."""
    import cProfile
    import pstats

    from triton.tools.tensor_descriptor import TensorDescriptor

    from deltatune.kernels import tma_lora

    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(16384, 16, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(14336, 16, device="cuda", dtype=torch.bfloat16)

    def host_us(fn, n: int = 50) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out = (time.perf_counter() - t0) / n * 1e6
        sync()
        return out
    parts = {
        "applies": lambda: tma_lora.applies(x, w, 16),
        "5 descriptors": lambda: [TensorDescriptor.from_tensor(t, [128, 64])
                                  for t in (x, w, x, h, b)],
        "lora_gemm": lambda: tma_lora.lora_gemm(x, w, None, h, b, 2.0),
        "torch.mm (cuBLAS)": lambda: torch.mm(x, w.t()),
        "get_device_properties": lambda: torch.cuda.get_device_properties(x.device),
        "get_device_capability": lambda: torch.cuda.get_device_capability(x.device),
    }
    for name, fn in parts.items():
        record("tma_host", name, host_us(fn) * 1e-6)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        tma_lora.lora_gemm(x, w, None, h, b, 2.0)
    prof.disable()
    sync()
    import io
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    log(text.getvalue()[-4000:])


def main() -> None:
    if not torch.cuda.is_available():
        print("profile_gaps: needs a CUDA GPU; nothing to do here")
        return
    RESULTS["environment"] = environment(sys.argv[1:])
    RESULTS["environment"]["command"] = " ".join(["PYTHONPATH=src python bench/profile_gaps.py",
                                                  *sys.argv[1:]])
    try:
        sections = {"fold": fold_probe, "tma_host": tma_host, "shrink": shrink_probe,
                    "layer": layer_kernels,
                    "prefill": lambda: prefill_gaps(5), "generate": lambda: generate_phases(5)}
        chosen = sys.argv[1:] or list(sections)
        for section in (sections[name] for name in chosen):
            try:
                section()
            except Exception:  # report, keep going: the other sections still measure
                log(traceback.format_exc(limit=-4))
    finally:
        save_results("profile_gaps", RESULTS)


if __name__ == "__main__":
    main()
