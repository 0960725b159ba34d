"""Mixed-adapter decode layouts on the GPU: per-layer time of each way to add 32 adapters.

One decode step of a 1B Llama shape (hidden 2048, MLP 8192, 16 layers) at 32 rows, only
its seven adapted linears per layer (q, k, v, o, gate, up, down), replayed from one CUDA
graph. Every row has its own rank-16 adapter. The variants differ in how the LoRA term is
laid out and how many launches it takes; the merged model and one shared adapter are the
references the issue's targets name (mixed-32 >= 0.85x one adapter).

    PYTHONPATH=src python bench/mixed_layouts.py [--layers 16] [--rows 32]

Correctness first (each variant against float64), then a table; JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F
from gpu_lora import _graph_time, save_results  # bench/ is the script's directory

from deltatune.kernels import multi_lora, triton_lora

HIDDEN, MLP, RANK = 2048, 8192, 16
LINEARS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, 512), "v": (HIDDEN, 512),
           "o": (HIDDEN, HIDDEN), "gate": (HIDDEN, MLP), "up": (HIDDEN, MLP),
           "down": (MLP, HIDDEN)}
# linears that read the same input tensor in a Llama layer
SIBLINGS = [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]


def make_layer(rows: int, adapters: int, dev: torch.device, dtype: torch.dtype) -> dict:
    """Weights, one adapter set per linear, and every layout the variants read."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    layer = {}
    row_adapter = [i % adapters for i in range(rows)]
    index = torch.tensor(row_adapter, device=dev)
    for name, (k, n) in LINEARS.items():
        W = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dev, dtype)
        As = [(torch.randn(RANK, k, generator=gen) * k ** -0.5).to(dev, dtype)
              for _ in range(adapters)]
        Bs = [(torch.randn(n, RANK, generator=gen) * 0.1).to(dev, dtype)
              for _ in range(adapters)]
        scales = [2.0] * adapters
        a_cat, b_cat, offsets = multi_lora.stack_concat(As, Bs, scales, dtype)
        mask = multi_lora.concat_mask(row_adapter, offsets, dtype, dev)
        a_stack, b_stack = multi_lora.stack_padded(As, Bs, scales, dtype)
        layer[name] = dict(W=W, As=As, Bs=Bs, a_cat=a_cat, b_cat=b_cat, mask=mask,
                           a_rows=a_stack[index].transpose(1, 2).contiguous(),  # (rows,k,r)
                           b_rows=b_stack[index].transpose(1, 2).contiguous(),  # (rows,r,n)
                           # every row's own A, in row order: one mm gives (rows, rows*r),
                           # row i's own h is the diagonal block (a strided view)
                           a_row_cat=a_stack[index].reshape(rows * RANK, k).contiguous(),
                           row_adapter=row_adapter)
    for group in SIBLINGS:
        if len(group) > 1:
            layer[group] = dict(
                a_rows=torch.cat([layer[g]["a_rows"] for g in group], 2).contiguous(),
                a_cat=torch.cat([layer[g]["a_cat"] for g in group], 0).contiguous(),
                a_row_cat=torch.cat([layer[g]["a_row_cat"] for g in group], 0).contiguous(),
                mask=torch.cat([layer[g]["mask"] for g in group], 1).contiguous(),
                W=torch.cat([layer[g]["W"] for g in group], 0).contiguous(),
                widths=[layer[g]["a_cat"].shape[0] for g in group])
    return layer


def reference(layer: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + each row's own s (x A^T) B^T, in float64."""
    p = layer[name]
    y = x.double() @ p["W"].double().t()
    for i, k in enumerate(p["row_adapter"]):
        A, B = p["As"][k].double(), p["Bs"][k].double()
        y[i] += 2.0 * (x[i].double() @ A.t()) @ B.t()
    return y


# ---------------------------------------------------------------- one layer, per variant
def run_merged(layer, xs):
    return {n: F.linear(xs[n], layer[n]["W"]) for n in LINEARS}


def run_single_triton(layer, xs):
    out = {}
    for n in LINEARS:
        p = layer[n]
        out[n] = triton_lora.lora_matmul(xs[n], p["W"], None, p["As"][0], p["Bs"][0], 2.0)[0]
    return out


def run_concat(layer, xs):
    out = {}
    for n in xs:
        p = layer[n]
        y = F.linear(xs[n], p["W"])
        out[n] = multi_lora.multi_lora_concat(xs[n], y, p["mask"], p["a_cat"], p["b_cat"])
    return out


def run_concat_shared(layer, xs):
    out = {}
    for group in SIBLINGS:
        x = xs[group[0]]
        if len(group) == 1:
            out.update(run_concat({group[0]: layer[group[0]]}, {group[0]: x}))
            continue
        g = layer[group]
        h = (x @ g["a_cat"].t()).mul_(g["mask"])
        start = 0
        for name, width in zip(group, g["widths"]):
            y = F.linear(x, layer[name]["W"])
            out[name] = y.addmm_(h[:, start:start + width], layer[name]["b_cat"].t())
            start += width
    return out


def _gathered(x, y, a_rows, b_rows):
    h = torch.bmm(x.unsqueeze(1), a_rows)
    return y.unsqueeze(1).baddbmm_(h, b_rows).squeeze(1)


def run_gathered(layer, xs):
    out = {}
    for n in LINEARS:
        p = layer[n]
        out[n] = _gathered(xs[n], F.linear(xs[n], p["W"]), p["a_rows"], p["b_rows"])
    return out


def run_gathered_shared(layer, xs):
    out = {}
    for group in SIBLINGS:
        x = xs[group[0]]
        a_rows = layer[group]["a_rows"] if len(group) > 1 else layer[group[0]]["a_rows"]
        h = torch.bmm(x.unsqueeze(1), a_rows)  # (rows, 1, r * len(group))
        for j, name in enumerate(group):
            y = F.linear(x, layer[name]["W"]).unsqueeze(1)
            out[name] = y.baddbmm_(h[:, :, j * RANK:(j + 1) * RANK],
                                   layer[name]["b_rows"]).squeeze(1)
    return out


def _diagonal(h: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Row i's own (1, r) block of h (rows, width) at column start + i r, as a view."""
    return h.as_strided((rows, 1, RANK), (h.stride(0) + RANK, RANK, 1),
                        h.storage_offset() + start)


def run_diagonal(layer, xs):
    out = {}
    for n in xs:
        p, x = layer[n], xs[n]
        h = x @ p["a_row_cat"].t()
        y = F.linear(x, p["W"]).unsqueeze(1)
        out[n] = y.baddbmm_(_diagonal(h, 0, x.shape[0]), p["b_rows"]).squeeze(1)
    return out


def run_diagonal_shared(layer, xs):
    out = {}
    for group in SIBLINGS:
        x = xs[group[0]]
        if len(group) == 1:
            out.update(run_diagonal({group[0]: layer[group[0]]}, {group[0]: x}))
            continue
        h = x @ layer[group]["a_row_cat"].t()
        for j, name in enumerate(group):
            y = F.linear(x, layer[name]["W"]).unsqueeze(1)
            block = _diagonal(h, j * x.shape[0] * RANK, x.shape[0])
            out[name] = y.baddbmm_(block, layer[name]["b_rows"]).squeeze(1)
    return out


def _parts(layer, xs, part: str):
    """One kind of launch alone, for every linear (where the time goes)."""
    for n in LINEARS:
        p, x = layer[n], xs[n]
        if part == "shrink mm (concat)":
            x @ p["a_cat"].t()
        elif part == "shrink bmm":
            torch.bmm(x.unsqueeze(1), p["a_rows"])
        elif part == "mask mul":
            torch.mul(p["mask"], p["mask"])
        elif part == "expand addmm (concat)":
            torch.addmm(p["_y"], p["mask"], p["b_cat"].t())
        elif part == "expand baddbmm":
            torch.baddbmm(p["_y"].unsqueeze(1), p["_h"], p["b_rows"])
        elif part == "base GEMV per linear":
            F.linear(x, p["W"])
    if part == "base GEMV per sibling group":  # q/k/v and gate/up rows in one weight
        for group in SIBLINGS:
            W = layer[group]["W"] if len(group) > 1 else layer[group[0]]["W"]
            F.linear(xs[group[0]], W)


PARTS = ["shrink mm (concat)", "shrink bmm", "mask mul", "expand addmm (concat)",
         "expand baddbmm", "base GEMV per linear", "base GEMV per sibling group"]


VARIANTS = {"merged": run_merged, "one adapter (Triton)": run_single_triton,
            "mixed concat (now)": run_concat, "mixed concat, shared shrink": run_concat_shared,
            "mixed gathered bmm": run_gathered, "mixed gathered, shared shrink":
            run_gathered_shared, "mixed diagonal": run_diagonal,
            "mixed diagonal, shared shrink": run_diagonal_shared}
MIXED = [v for v in VARIANTS if v.startswith("mixed")]


def graph_ms(fn) -> float:
    """Milliseconds of one replay of the captured ``fn``, median of 20."""
    return _graph_time([fn]) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mixed_layouts: no CUDA device; nothing to measure")
        return
    dev, dtype = torch.device("cuda"), torch.bfloat16
    layers = [make_layer(args.rows, args.adapters, dev, dtype) for _ in range(args.layers)]
    gen = torch.Generator(device="cpu").manual_seed(1)
    xs = {n: torch.randn(args.rows, k, generator=gen).to(dev, dtype)
          for n, (k, _) in LINEARS.items()}
    for group in SIBLINGS:  # siblings read the same tensor, as in the model
        for name in group[1:]:
            xs[name] = xs[group[0]]
    result = dict(environment=dict(
        command="PYTHONPATH=src python bench/mixed_layouts.py " + " ".join(argv or sys.argv[1:]),
        torch=torch.__version__, gpu=torch.cuda.get_device_name(), host=platform.node(),
        python=platform.python_version(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime())),
        checks=[], rows=[])
    ok = True
    for name in MIXED:
        got = VARIANTS[name](layers[0], xs)
        for lin in LINEARS:
            ref = reference(layers[0], lin, xs[lin])
            err = ((got[lin].double() - ref).norm() / ref.norm()).item()
            ok &= err < 1e-2
            result["checks"].append(dict(variant=name, linear=lin, rel=err))
        worst = max(c["rel"] for c in result["checks"] if c["variant"] == name)
        print(f"check {name:<32} worst rel {worst:.2e}")
    print("all checks passed" if ok else "CHECK FAILED")
    times = {}
    for name, fn in VARIANTS.items():
        times[name] = graph_ms(lambda fn=fn: [fn(layer, xs) for layer in layers])
    for layer in layers:
        for n in LINEARS:
            layer[n]["_y"] = torch.zeros(args.rows, LINEARS[n][1], device=dev, dtype=dtype)
            layer[n]["_h"] = torch.zeros(args.rows, 1, RANK, device=dev, dtype=dtype)
    parts = {part: graph_ms(lambda part=part: [_parts(layer, xs, part) for layer in layers])
             for part in PARTS}
    print("\none kind of launch alone, every linear of every layer (ms):")
    for part, ms in parts.items():
        print(f"  {part:<26}{ms:8.3f}  ({ms * 1e3 / (7 * args.layers):.2f} us each)")
    result["parts_ms"] = parts
    one = times["one adapter (Triton)"]
    print(f"\n{'variant':<34}{'ms/step':>9}{'vs merged':>11}{'one/this':>10}")
    for name, ms in times.items():
        print(f"{name:<34}{ms:9.3f}{ms / times['merged']:11.3f}{one / ms:10.3f}")
        result["rows"].append(dict(variant=name, ms=ms, vs_merged=ms / times["merged"],
                                   one_adapter_over_this=one / ms))
    save_results("mixed_layouts", result)


if __name__ == "__main__":
    main()
