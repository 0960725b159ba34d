"""Triton kernels: the LoRA term computed inside the base matmul, in one launch.

Decoding one token runs every adapted linear at batch 1-32, where a matmul is bound by
latency, not arithmetic: the cuBLAS path (:mod:`.lora_linear`) launches three kernels per
layer (``x W^T``, ``h = x A^T``, ``y += s h B^T``) and the two small ones cost about as
much as the base GEMV (docs/performance.md). Here one program per output tile streams
its tile of ``W`` and, beside it, the (tiny, L2-resident) ``A``, so ``h`` is formed in the
same K loop, and the expand ``s h B_tile^T`` is added to the accumulator before the single
store:

- :func:`lora_matmul` (one adapter): ``y = x W^T + b + s (x A^T) B^T``; optionally also
  writes ``h`` (what a backward pass needs). ``h`` may instead be given (computed once
  beforehand, for large M where recomputing it per output tile would cost r / BLOCK_N
  extra arithmetic).
- :func:`bgmv_matmul` (one adapter per row, Punica's BGMV): a shrink kernel forms each
  row's ``h = x_m A[idx_m]^T`` once (split over K, partial sums kept apart), then the
  matmul kernel adds ``h_m B[idx_m]^T`` per row in its epilogue. Two launches whatever
  the number of adapters, instead of a gather, a mask and three matmuls.

Everything here is inference-side arithmetic with no host synchronisation and no
allocation that depends on data, so it can be captured in a CUDA graph
(:mod:`.graph_decode`); Triton compiles on the first call of each configuration, which
the decoder's eager warm-up steps take before capture. Triton is imported lazily:
:func:`available` is False without it (CPU-only installs), and callers keep the
cuBLAS/plain path. ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator, Sequence

import torch

SMALL_M = 64  # up to this many rows (tokens) the fused kernels replace the cuBLAS path
MAX_RANK = 64  # larger ranks keep the cuBLAS path (register and shared-memory budget)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _triton():
    """Return (triton, kernel module, kernels) or None when triton cannot be imported."""
    try:
        import triton

        if interpreted():
            _patch_interpreter()
        from deltatune.kernels import _triton_lora_kernels as k
    except Exception:  # no triton, or a broken install: the cuBLAS path stays
        return None
    return triton, k, {"lora_mm": k.lora_mm_kernel, "bgmv_shrink": k.bgmv_shrink_kernel,
                       "bgmv_add_group": k.bgmv_add_group_kernel,
                       "tma_lora_gemm": k.tma_lora_gemm_kernel,
                       "lora_grad": k.lora_grad_kernel}


def _patch_interpreter() -> None:
    """Let Triton's CPU interpreter read scalar arguments under numpy >= 2.3.

    The interpreter keeps every scalar as a 1-element array and converts it with
    ``int(array)``, which recent numpy refuses for arrays of one dimension (a loop bound
    taken from an argument then fails); read the single element instead.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "deltatune", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.deltatune = True
    interpreter._patch_lang_tensor = patched


def interpreted() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_GRAPH_SCOPES = 0  # open for_graphs() contexts


@contextlib.contextmanager
def for_graphs() -> Iterator[None]:
    """Take the Triton kernels inside this context (CUDA-graph decoding: GraphDecoder).

    By default (``DELTATUNE_TRITON=graphs``) the kernels run only here: replayed from a
    graph they save the extra launches, but in eager mode Triton's Python launcher costs
    more per call than the launches it saves (decoding eagerly is bound by dispatch).
    ``DELTATUNE_TRITON=always`` takes them everywhere, ``0`` never.
    """
    global _GRAPH_SCOPES
    _GRAPH_SCOPES += 1
    try:
        yield
    finally:
        _GRAPH_SCOPES -= 1


_BGMV_LAYOUTS = {"1": "gather", "gather": "gather", "concat": "concat", "add": "add-gather",
                 "add-gather": "add-gather", "add-concat": "add-concat"}
BGMV_ADD_MAX_K = 4096  # "auto": the add-gather kernel up to this input width


def bgmv_layout(d_in: int) -> str | None:
    """The Triton layout for a mixed-adapter decode linear of input width ``d_in``, or None
    for the cuBLAS concatenated path of :mod:`deltatune.kernels.multi_lora`.

    ``DELTATUNE_TRITON_BGMV``: ``auto`` (default) takes ``add-gather`` up to
    :data:`BGMV_ADD_MAX_K` inputs, where it measured faster than cuBLAS on an H200
    (12.7 vs 16.2 us at 2048 -> 2048, 22.4 vs 23.6 at 2048 -> 8192, 32 rows and 32
    adapters), and cuBLAS above (28.8 vs 26.1 us at 8192 -> 2048); ``0`` never; a layout
    name always: ``gather`` (also ``1``: base and LoRA in one kernel, each row's B gathered
    in the epilogue), ``concat`` (the expand through every adapter side by side),
    ``add-gather`` (also ``add``) and ``add-concat`` (the base by cuBLAS, then one kernel
    adds the LoRA term into its output).
    """
    mode = os.environ.get("DELTATUNE_TRITON_BGMV", "auto")
    if mode == "auto":
        return "add-gather" if d_in <= BGMV_ADD_MAX_K else None
    return _BGMV_LAYOUTS.get(mode)


def prompt_rows() -> int:
    """Up to how many rows (tokens) a mixed-adapter prompt takes the Triton add layouts
    (cuBLAS base, Triton shrink and add) instead of cuBLAS's concatenated layout:
    ``DELTATUNE_TRITON_PROMPT_ROWS``, 0 by default (off: at 512 it measured slower than
    the concatenated layout, mixed-32 generation 0.793x against 0.810x one adapter's
    throughput, run 20261201-202720)."""
    value = os.environ.get("DELTATUNE_TRITON_PROMPT_ROWS", "0")
    try:
        return max(0, int(value))
    except ValueError:
        warn_once(f"DELTATUNE_TRITON_PROMPT_ROWS={value!r} is not a number of rows: "
                   f"using 0 (off)")
        return 0


@functools.lru_cache(maxsize=8)
def warn_once(message: str) -> None:
    """Warn with ``message`` the first time only (a bad environment variable, read per call)."""
    warnings.warn(message, stacklevel=3)


_AUTO_OFF_ALWAYS = {"auto": "auto", "0": "off", "off": "off", "false": "off", "1": "always",
                    "always": "always", "true": "always"}


def auto_off_always(variable: str) -> str:
    """Read a kernel policy from environment ``variable``: ``"auto"`` (unset), ``"off"``
    (0/off/false) or ``"always"`` (1/always/true); anything else warns once and is auto."""
    value = os.environ.get(variable, "auto").strip().lower()
    mode = _AUTO_OFF_ALWAYS.get(value)
    if mode is None:
        warn_once(f"{variable}={value!r} is not one of auto, 0, always: using auto")
        mode = "auto"
    return mode


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph (memory taken now belongs
    to that graph's pool; nothing may be read back to the host)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def available(x: torch.Tensor | None = None) -> bool:
    """True when the Triton kernels can run now (on ``x``'s device, when given)."""
    mode = os.environ.get("DELTATUNE_TRITON", "graphs")
    if mode in ("0", "off", "never") or (mode != "always" and not _GRAPH_SCOPES):
        return False
    if x is not None and not (x.is_cuda or interpreted()):
        return False
    return _triton() is not None


def pays(rows: int, d_out: int) -> bool:
    """True where :func:`lora_matmul` measured faster than the three cuBLAS launches.

    On an H200 (bench/results/gpu_lora-20261201-130823.json) the fused kernel beat them
    at every 1B shape up to 64 rows and at 8B's down projection (14336 -> 4096), but not
    at 8B's 4096 -> 14336 gate/up projections (52 vs 41 us at one row): above 8192
    outputs cuBLAS's GEMV streams W faster than these tiles.
    """
    return rows <= SMALL_M and d_out <= 8192


def supports(x: torch.Tensor, weight: torch.Tensor, rank: int) -> bool:
    """True when :func:`lora_matmul` handles this input (dtype, rank, device)."""
    # the CPU interpreter mis-reads bfloat16 (numpy has no such type): fp32/fp16 only there
    dtypes = _DTYPES[::2] if interpreted() and not x.is_cuda else _DTYPES
    return (x.dtype in dtypes and weight.dtype == x.dtype and 0 < rank <= MAX_RANK
            and available(x))


def _precision(x: torch.Tensor) -> str | None:
    """tl.dot input precision: exact float32 products for float32 (no TF32), else default."""
    return "ieee" if x.dtype == torch.float32 else None


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


PROGRAMS = 512  # aim for about this many programs in a small-M launch (132 SMs, ~4 each)
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_COUNTER_SLOTS = 1 << 16


def _pow2_at_most(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def _config(M: int, N: int, K: int) -> dict:
    """Tile sizes for an (M x K) @ (K x N) problem: enough programs to cover the SMs.

    Small M (decode) is bound by streaming W with enough bytes in flight: narrow N tiles,
    and K split over SPLIT_K programs per tile until about :data:`PROGRAMS` programs
    stream their slices; large M uses the usual compute-bound tiles.
    """
    if interpreted():  # the CPU interpreter: small tiles keep it quick
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=2, num_warps=4,
                    num_stages=1)
    if M <= SMALL_M:
        # Measured on an H200 (bench/gpu_lora.py --kernels --sweep, 1B and 8B shapes):
        # 64-wide N tiles (fewer re-reads of A per output column) with K split until
        # there are at least 256 programs and no slice is longer than 4096 were within
        # ~10% of the best of 24 configurations at every wide shape.
        # A second sweep (warps 4/8, stages 2-5; run 2026-12-01 15:31) moved two choices:
        # square 2048 x 2048 projections were fastest with ~128 programs (8.2 vs 8.5 us at
        # one row, 9.2 vs 10.4 at 32), and the wide 2048 -> 8192 ones with 4 stages.
        block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
        stages = 3
        if N <= 1024:  # narrow outputs (k/v projections): narrow tiles, K in 4
            block_n, block_k, split = 16, 256, 4
        else:
            block_n, block_k = 64, 128
            tiles = -(-M // block_m) * -(-N // block_n)
            target = 128 if N <= 4096 and K <= 4096 else 256
            split = 1
            while split * tiles < target:
                split *= 2
            if K // split > 4096:
                split *= 2
            if N > 4096:
                stages = 4
        split = max(1, min(split, _pow2_at_most(max(K // block_k, 1))))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1,
                    SPLIT_K=split, num_warps=4, num_stages=stages)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=8,
                num_stages=3)


_OVERRIDE: dict | None = None  # set by the bench's config sweep


def set_config_override(cfg: dict | None) -> None:
    """Force the tile configuration of the kernels (the bench's sweep); None resets."""
    global _OVERRIDE
    _OVERRIDE = cfg


def _counters(device: torch.device) -> torch.Tensor | None:
    """The device's zeroed int32 semaphores (each launch leaves them zero), or None.

    Allocated on first use outside graph capture (memory taken inside a capture belongs
    to that graph's pool); None while capturing before any exists.
    """
    cnt = _COUNTERS.get(device)
    if cnt is None:
        if device.type == "cuda" and capturing():
            return None
        cnt = _COUNTERS[device] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32,
                                              device=device)
    return cnt


_DUMMIES: dict[torch.device, torch.Tensor] = {}


def _index_dummy(device: torch.device) -> torch.Tensor:
    """An int32 tensor standing for the row index where there is none (never read: the
    kernel's BGMV branches only run in mode 2, but every branch must type-check)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = torch.zeros(1, dtype=torch.int32, device=device)
        if not (device.type == "cuda" and capturing()):
            _DUMMIES[device] = t
    return t


def _launch(x, weight, bias, a, b, h, idx, y, M, N, K, r, scale, a_strides, b_strides,
            h_strides, mode: int, store_h: bool, h_split: int = 1, n_shrink: int = 0,
            k_shrink: int = 0, fused_shrink: bool = False, rt: int = 0,
            base: bool = True) -> None:
    """Launch the matmul kernel with this problem's configuration (split-K when it pays).

    ``rt``: mode 3's concatenated rank (adapters x r). ``base`` False (modes 2 and 3):
    only the LoRA term, added to what ``y`` holds (``weight`` is then not read)."""
    triton, _, kernels = _triton()
    cfg = dict(_OVERRIDE or _config(M, N, K))
    if not base:
        cfg["SPLIT_K"] = 1  # nothing to split: the K loop is the base's
    cfg["CHUNK_R"] = 16 if interpreted() else 64
    if mode == 2 and not _OVERRIDE and not interpreted():
        # each program holds its rows' B tiles (16 x r x 64) in registers: 8 warps
        cfg["BLOCK_M"], cfg["num_warps"] = 16, 8
    cfg["BLOCK_R"] = max(16, _next_pow2(r))
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    cnt = None
    if cfg["SPLIT_K"] > 1 or fused_shrink:
        cnt = _counters(x.device)
        if cnt is None or tiles + 3 > _COUNTER_SLOTS or store_h:
            cfg["SPLIT_K"], cnt = 1, None
    if fused_shrink and cnt is None:
        raise RuntimeError("fused shrink needs the semaphores (first call inside a capture)")
    split = cfg["SPLIT_K"]
    k_split = triton.cdiv(triton.cdiv(K, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    ws = torch.empty((split, M, N), device=x.device, dtype=torch.float32) if split > 1 else y
    grid = (tiles * split + (n_shrink if fused_shrink else 0),)
    kernels["lora_mm"][grid](
        x, weight, bias if bias is not None else x, a, b, h if h is not None else x,
        idx if idx is not None else _index_dummy(x.device), y, ws,
        cnt if cnt is not None else x,
        M, N, K, r, rt or r, float(scale), k_split, n_shrink if fused_shrink else 0, k_shrink,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *a_strides, *b_strides,
        *h_strides, y.stride(0), y.stride(1),
        MODE=mode, STORE_H=store_h, HAS_BIAS=bias is not None, PREC=_precision(x),
        H_SPLIT=h_split, FUSED_SHRINK=fused_shrink, BASE=base, ACCUMULATE=not base, **cfg)


def lora_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, scale: float, *,
                h: torch.Tensor | None = None, store_h: bool = False,
                out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (x W^T + b + s (x A^T) B^T, h) for 2-D ``x`` (M, K), in one kernel launch.

    ``weight`` (N, K), ``A`` (r, K) and ``B`` (N, r) may be any strided views (a
    transposed weight serves the input gradient). With ``h`` given (M, r), it is used
    instead of ``x A^T`` (A is then not read). With ``store_h`` the returned h is
    ``x A^T`` in float32 (M, r); otherwise the second item is None. Float32 inputs use
    exact float32 products (no TF32).
    """
    assert _triton() is not None, "triton is not available"
    M, K = x.shape
    N, r = weight.shape[0], A.shape[0]
    if A.dtype != x.dtype:
        A = A.to(x.dtype)
    if B.dtype != x.dtype:
        B = B.to(x.dtype)
    y = out if out is not None else torch.empty((M, N), device=x.device, dtype=x.dtype)
    h_out = None
    if store_h and h is None:
        h_out = torch.empty((M, r), device=x.device, dtype=torch.float32)
    h_arg = h if h is not None else h_out
    hs = h_arg.stride() if h_arg is not None else (0, 0)
    _launch(x, weight, bias, A, B, h_arg, None, y, M, N, K, r, scale,
            (0, A.stride(0), A.stride(1)), (0, B.stride(0), B.stride(1)), (0, hs[0], hs[1]),
            mode=1 if h is not None else 0, store_h=h_out is not None)
    return y, h_out


# The BGMV shrink aims at about this many programs (rows x K slices). On an H200 at 32
# rows, 512 made the 8192-wide shrink faster (cuBLAS base + add 22.1 vs 24.0 us at 256),
# and changed nothing at 2048 (bench/results/gpu_lora-20261201-171848).
SHRINK_PROGRAMS = 512


def _shrink_split(M: int, K: int, block_k: int) -> int:
    """How many K slices the BGMV shrink uses: about :data:`SHRINK_PROGRAMS` in all."""
    if interpreted():
        return 2
    return _pow2_at_most(max(1, min(SHRINK_PROGRAMS // max(M, 1), K // (block_k * 2))))


def expand_layout(b_stack: torch.Tensor) -> torch.Tensor:
    """Return ``b_stack`` (E, N, r) as a view of an (E, r, N)-contiguous copy.

    The BGMV epilogue reads, for each rank index, one B row per batch row: contiguous
    along N in this layout, 2r bytes apart in the stacked one.
    """
    return b_stack.transpose(1, 2).contiguous().transpose(1, 2)


def concat_layout(b_stack: torch.Tensor) -> torch.Tensor:
    """Return the adapters of ``b_stack`` (E + 1, N, r) side by side as (E r, N).

    The last entry (all zeros: the base model's rows) is left out; row ``e r + k`` holds
    adapter e's B column k. :func:`bgmv_matmul` with ``b_concat`` expands through it.
    """
    return b_stack[:-1].permute(0, 2, 1).reshape(-1, b_stack.shape[1]).contiguous()


def bgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, index: torch.Tensor,
                n_out: int) -> torch.Tensor:
    """Return each row's shrink through its own adapter, ``x_m A_e^T`` with e = index[m],
    as float32 partial sums over slices of K: (S, M, r), summed by :func:`bgmv_matmul`'s
    epilogue when passed as its ``h``. One launch. ``n_out`` is the output width of the
    matmul it feeds (it sets the K slicing, as :func:`bgmv_matmul` would)."""
    kern = _triton()
    assert kern is not None, "triton is not available"
    triton, _, kernels = kern
    M, K = x.shape
    r = a_stack.shape[1]
    block_k = int((_OVERRIDE or _config(M, n_out, K))["BLOCK_K"])
    split = _shrink_split(M, K, block_k)
    per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    h = torch.empty((split, M, r), device=x.device, dtype=torch.float32)
    kernels["bgmv_shrink"][(M, split)](
        x, a_stack, index, h, K, r, per,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        h.stride(0), h.stride(1), BLOCK_K=block_k, BLOCK_R=max(16, _next_pow2(r)),
        num_warps=4)
    return h


def bgmv_matmul(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                a_stack: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor, *,
                fused: bool | None = None, b_concat: torch.Tensor | None = None,
                out: torch.Tensor | None = None, h: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Return x W^T + b plus row m's s_e (x_m A_e^T) B_e^T with e = ``index[m]``.

    ``a_stack`` (E, r, K) and ``b_stack`` (E, N, r) hold every adapter (any strides; a
    view of an (E, r, N)-contiguous tensor, :func:`expand_layout`, reads B coalesced and
    is much faster), the scale already folded into B
    (:func:`deltatune.kernels.multi_lora.stack_padded`; its last entry is all zeros, the
    base model's rows); ``index`` is int32 (M,). ``x`` is (M, K). One
    launch (``fused``: the shrink runs in the same grid, ahead of the matmul's epilogue)
    or two (a separate shrink kernel first, :func:`bgmv_shrink`); by default fused for
    K >= 8192, where it measured faster on an H200 (two launches were faster at K =
    2048-4096). With ``h`` given (:func:`bgmv_shrink`'s partial sums, or a slice of them
    along r: several layers reading the same input share one shrink launch) there is no
    shrink here and ``a_stack`` only sets the rank.
    With ``b_concat`` (:func:`concat_layout` of ``b_stack``) the epilogue expands by a
    dense product over every adapter's columns, each row's h placed in its own
    adapter's slice, instead of gathering each row's B (``b_stack`` is then not read).
    With ``weight`` None the kernel computes only the LoRA term and adds it in place to
    ``out`` (M, N), which holds the base output already (a cuBLAS GEMV streams W faster
    than these tiles); ``out`` is returned.
    """
    kern = _triton()
    assert kern is not None, "triton is not available"
    triton = kern[0]
    M, K = x.shape
    if weight is None:
        if out is None or bias is not None:
            raise ValueError("bgmv_matmul without a weight adds to `out` (the base output, "
                             "bias included); pass out= and no bias")
        N = out.shape[1]
    else:
        N = weight.shape[0]
    r = a_stack.shape[1]
    block_k = int((_OVERRIDE or _config(M, N, K))["BLOCK_K"])
    split = _shrink_split(M, K, block_k)
    per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    if fused is None:
        fused = (K >= 8192 or interpreted()) and h is None
    if fused and (_counters(x.device) is None or h is not None):
        fused = False
    if h is None:
        h = (bgmv_shrink(x, a_stack, index, N) if not fused else
             torch.empty((split, M, r), device=x.device, dtype=torch.float32))
    elif h.shape[1:] != (M, r) or h.stride(2) != 1:
        raise ValueError(f"h must be (slices, {M}, {r}) with unit stride along r; "
                         f"got {tuple(h.shape)} strides {h.stride()}")
    split = h.shape[0]
    y = out if weight is None else torch.empty((M, N), device=x.device, dtype=x.dtype)
    if b_concat is not None:
        b_arg, b_strides = b_concat, (0, b_concat.stride(1), b_concat.stride(0))
    else:
        b_arg, b_strides = b_stack, b_stack.stride()
    _launch(x, weight if weight is not None else y.t(), bias, a_stack, b_arg, h, index, y,
            M, N, K, r, 1.0, a_stack.stride(), b_strides, h.stride(),
            mode=3 if b_concat is not None else 2, store_h=False, h_split=split,
            n_shrink=M * split, k_shrink=per, fused_shrink=fused,
            rt=b_concat.shape[0] if b_concat is not None else 0, base=weight is not None)
    return y


def group_block_n(rows: int, width: int) -> int:
    """Output columns per program of :func:`bgmv_add_group` for ``rows`` rows and
    ``width`` joined columns: 64, or 32 where 64 leaves fewer than about 256 programs."""
    if interpreted():
        return 16
    return 64 if -(-rows // 16) * (width // 64) >= 256 else 32


def group_tiles(widths: Sequence[int], ranks: Sequence[int], block_n: int,
                device: torch.device) -> torch.Tensor:
    """Return the tile table of :func:`bgmv_add_group`: one (first column, member's first
    column, member's width, member's first h column) int32 row per ``block_n`` columns of
    each member, members one after another (``widths`` output columns, ``ranks`` h
    columns each). Build it outside graph capture; it does not depend on the rows."""
    table, first, h_first = [], 0, 0
    for width, rank in zip(widths, ranks):
        table += [(c, first, width, h_first) for c in range(first, first + width, block_n)]
        first += width
        h_first += rank
    return torch.tensor(table, dtype=torch.int32, device=device)


def bgmv_add_group(y: torch.Tensor, b_joined: torch.Tensor, h: torch.Tensor,
                   index: torch.Tensor, tiles: torch.Tensor, rows: int, block_n: int,
                   row_stride: int | None = None) -> None:
    """Add several layers' per-row LoRA terms into their outputs, in one launch.

    ``y`` is one flat buffer holding each member's (rows, N_j) output one after another,
    or with ``row_stride`` one (rows, sum N) matrix of that row stride, the members'
    outputs side by side;
    ``b_joined`` (E, r, sum N) their B's side by side along the columns, scale folded in
    (entry e: adapter e; the last all zeros), any strides; ``h`` the shared shrink's
    float32 partial sums (S, rows, members x r) (:func:`bgmv_shrink` through the members'
    A stacks side by side); ``index`` int32 (rows,) each row's entry; ``tiles`` from
    :func:`group_tiles` with the same ``block_n``. In place on ``y``.
    """
    kern = _triton()
    assert kern is not None, "triton is not available"
    _, _, kernels = kern
    r = b_joined.shape[1]
    block_m = 16
    kernels["bgmv_add_group"][(tiles.shape[0], -(-rows // block_m))](
        y, b_joined, h, index, tiles, rows, r, row_stride or 0,
        b_joined.stride(0), b_joined.stride(1), b_joined.stride(2), h.stride(0), h.stride(1),
        SIDE_BY_SIDE=row_stride is not None, H_SPLIT=h.shape[0], BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=max(16, _next_pow2(r)), num_warps=4 if interpreted() else 8)


__all__ = ["BGMV_ADD_MAX_K", "MAX_RANK", "SMALL_M", "available", "bgmv_layout", "bgmv_matmul",
           "bgmv_add_group", "bgmv_shrink", "capturing", "prompt_rows",
           "concat_layout", "group_block_n", "group_tiles", "expand_layout",
           "for_graphs", "interpreted", "pays",
           "lora_matmul",
           "set_config_override", "supports", "warn_once"]
