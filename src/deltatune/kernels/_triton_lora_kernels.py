"""The Triton kernels behind :mod:`deltatune.kernels.triton_lora` (imported lazily by it).

This module imports triton at the top: import it only through ``triton_lora._triton()``.
"""

import triton
import triton.language as tl


@triton.jit
def shrink_row(x_ptr, a_ptr, idx_ptr, hws_ptr, m, s, K, R, k_per,
               s_xm, s_xk, s_ae, s_ar, s_ak, s_hs, s_hm,
               BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # row m's partial h over the s-th slice of K through its own adapter, in float32
    entry = tl.load(idx_ptr + m)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    mask_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    k_lo = s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < k_hi
        xk = tl.load(x_ptr + m * s_xm + kk * s_xk, mask=mask_k, other=0.0)
        at = tl.load(a_ptr + entry * s_ae + rr[:, None] * s_ar + kk[None, :] * s_ak,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += at.to(tl.float32) * xk.to(tl.float32)[None, :]
    tl.store(hws_ptr + s * s_hs + m * s_hm + rr, tl.sum(acc, axis=1), mask=mask_r)


@triton.jit
def bgmv_shrink_kernel(x_ptr, a_ptr, idx_ptr, hws_ptr, K, R, k_per,
                       s_xm, s_xk, s_ae, s_ar, s_ak, s_hs, s_hm,
                       BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    shrink_row(x_ptr, a_ptr, idx_ptr, hws_ptr, tl.program_id(0), tl.program_id(1), K, R,
               k_per, s_xm, s_xk, s_ae, s_ar, s_ak, s_hs, s_hm, BLOCK_K, BLOCK_R)


@triton.jit
def lora_mm_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, h_ptr, idx_ptr, y_ptr,
                   ws_ptr, cnt_ptr,
                   M, N, K, R, RT, scale, k_split, n_shrink, k_shrink,
                   s_xm, s_xk, s_wn, s_wk, s_ae, s_ar, s_ak, s_be, s_bn, s_br,
                   s_hs, s_hm, s_hr, s_ym, s_yn,
                   MODE: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
                   PREC: tl.constexpr, H_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
                   FUSED_SHRINK: tl.constexpr, BASE: tl.constexpr, ACCUMULATE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, CHUNK_R: tl.constexpr):
    # MODE 0: h = x A^T in the K loop; 1: h given (M, R); 2: one adapter per row, h as
    # H_SPLIT partial sums (H_SPLIT, M, R) float32 and B gathered by idx (scale folded
    # into B); 3: as 2, but B is every adapter's (RT = adapters x R, N) side by side and
    # the expand is a dense product over RT in CHUNK_R slices, each row's h placed in its
    # own adapter's columns (zeros elsewhere). SPLIT_K > 1: each output tile's K range is
    # split over SPLIT_K programs,
    # which leave float32 partials in ws; the last to finish (counted in cnt) sums them.
    # FUSED_SHRINK (MODE 2): the first n_shrink programs to start compute the partial h
    # (rows x H_SPLIT), the others wait for them before their epilogue. Roles go by an
    # arrival ticket, so producers are always running before anyone waits on them.
    # cnt: [0] tickets, [1] finished producers, [2] finished h readers, [3:] per tile.
    # Every counter is back at 0 when the launch ends (CUDA-graph replays reuse it).
    # BASE False (modes 2 and 3): no x W^T, only the LoRA term; ACCUMULATE: the result is
    # added to what y holds (the base output computed by cuBLAS before this launch).
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    work = pid
    if FUSED_SHRINK:
        work = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if work == tl.num_programs(0) - 1:
            tl.atomic_xchg(cnt_ptr, 0)
        work = work - n_shrink
    if work < 0:
        role = work + n_shrink
        shrink_row(x_ptr, a_ptr, idx_ptr, h_ptr, role // H_SPLIT, role % H_SPLIT, K, R,
                   k_shrink, s_xm, s_xk, s_ae, s_ar, s_ak, s_hs, s_hm, BLOCK_K, BLOCK_R)
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr + 1, 1, sem="release")
    else:
        tile = work // SPLIT_K
        pid_k = work % SPLIT_K
        # grouped order: GROUP_M row tiles share each W tile while it is in L2
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = (tile % per_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        mask_m = rm < M
        mask_n = rn < N
        mask_r = rr < R
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        x_ptrs = x_ptr + rm[:, None] * s_xm + (k_lo + rk)[None, :] * s_xk
        w_ptrs = w_ptr + (k_lo + rk)[:, None] * s_wk + rn[None, :] * s_wn
        a_ptrs = a_ptr + (k_lo + rk)[:, None] * s_ak + rr[None, :] * s_ar
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if MODE == 2:
            # Each row's own B tile (rows x rank x columns), requested before the K loop so
            # the gathers are in flight while W streams (only the programs that expand).
            entry = tl.load(idx_ptr + rm, mask=mask_m, other=0)
            b3 = tl.load(b_ptr + entry[:, None, None] * s_be + rr[None, :, None] * s_br
                         + rn[None, None, :] * s_bn,
                         mask=(mask_m[:, None, None] & mask_r[None, :, None])
                         & (mask_n[None, None, :] & (pid_k == 0)), other=0.0)
        if BASE:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                mask_k = rk < k_hi - k0
                xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(xt, wt, acc, input_precision=PREC)
                if MODE == 0:
                    at = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                    h = tl.dot(xt, at, h, input_precision=PREC)
                    a_ptrs += BLOCK_K * s_ak
                x_ptrs += BLOCK_K * s_xk
                w_ptrs += BLOCK_K * s_wk
        in_ty = x_ptr.dtype.element_ty
        if MODE == 0:
            # each K slice adds its own partial h's expand (linear in h)
            if STORE_H:
                # one column of programs writes h; the others computed the same values
                tl.store(h_ptr + rm[:, None] * s_hm + rr[None, :] * s_hr,
                         h.to(h_ptr.dtype.element_ty),
                         mask=mask_m[:, None] & mask_r[None, :] & (pid_n == 0))
            bt = tl.load(b_ptr + rr[:, None] * s_br + rn[None, :] * s_bn,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot((h * scale).to(in_ty), bt, acc, input_precision=PREC)
        elif pid_k == 0:
            if MODE == 1:
                hg = tl.load(h_ptr + rm[:, None] * s_hm + rr[None, :] * s_hr,
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                bt = tl.load(b_ptr + rr[:, None] * s_br + rn[None, :] * s_bn,
                             mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot((hg.to(tl.float32) * scale).to(in_ty), bt, acc,
                             input_precision=PREC)
            else:
                if FUSED_SHRINK:
                    ready = tl.atomic_add(cnt_ptr + 1, 0, sem="acquire")
                    while ready < n_shrink:
                        ready = tl.atomic_add(cnt_ptr + 1, 0, sem="acquire")
                    tl.debug_barrier()
                if MODE == 2:
                    hg = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for s in range(H_SPLIT):
                        hg += tl.load(h_ptr + s * s_hs + rm[:, None] * s_hm + rr[None, :],
                                      mask=mask_m[:, None] & mask_r[None, :], other=0.0,
                                      cache_modifier=".cg")
                    acc += tl.sum(hg[:, :, None] * b3.to(tl.float32), axis=1)
                else:
                    own = tl.load(idx_ptr + rm, mask=mask_m, other=-1)
                    rc = tl.arange(0, CHUNK_R)
                    for c0 in range(0, RT, CHUNK_R):
                        cols = c0 + rc
                        mask_c = cols < RT
                        sel = ((own[:, None] == (cols // R)[None, :]) & mask_m[:, None]
                               & mask_c[None, :])
                        hc = tl.zeros((BLOCK_M, CHUNK_R), dtype=tl.float32)
                        for s in range(H_SPLIT):
                            hc += tl.load(h_ptr + s * s_hs + rm[:, None] * s_hm
                                          + (cols % R)[None, :], mask=sel, other=0.0,
                                          cache_modifier=".cg")
                        bt = tl.load(b_ptr + cols[:, None] * s_br + rn[None, :] * s_bn,
                                     mask=mask_c[:, None] & mask_n[None, :], other=0.0)
                        acc = tl.dot(hc.to(in_ty), bt, acc, input_precision=PREC)
                if FUSED_SHRINK:
                    tl.debug_barrier()
                    done = tl.atomic_add(cnt_ptr + 2, 1, sem="acq_rel")
                    if done == num_m * num_n - 1:  # every reader is past the wait
                        tl.atomic_xchg(cnt_ptr + 1, 0)
                        tl.atomic_xchg(cnt_ptr + 2, 0)
        out_mask = mask_m[:, None] & mask_n[None, :]
        y_ptrs = y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn
        if SPLIT_K == 1:
            if ACCUMULATE:
                acc += tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            ws_tile = ws_ptr + rm[:, None] * N + rn[None, :]
            tl.store(ws_tile + pid_k * M * N, acc, mask=out_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + 3 + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # the last slice of this tile: sum and store
                tl.debug_barrier()
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT_K):
                    total += tl.load(ws_tile + s * M * N, mask=out_mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rn, mask=mask_n,
                                     other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(cnt_ptr + 3 + tile, 0)


@triton.jit
def bgmv_add_group_kernel(y_ptr, b_ptr, h_ptr, idx_ptr, tiles_ptr, M, R, s_ym,
                          s_be, s_br, s_bn, s_hs, s_hm, SIDE_BY_SIDE: tl.constexpr,
                          H_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    # Several layers' LoRA terms (siblings reading one input) in one launch. Their B's sit
    # side by side along the output columns of one (E, R, sum N) tensor, their h's side by
    # side along the rank of the shared shrink's partial sums (H_SPLIT, M, members x R),
    # and their outputs one after another in y: member j's (M, N_j) block starts at
    # M * first_j (SIDE_BY_SIDE: one (M, sum N) matrix of row stride s_ym, the members'
    # columns side by side). Row t of the tile table (int32, 4 per tile): the tile's first
    # column, its member's first column and width, and the member's first h column.
    meta = tiles_ptr + tl.program_id(0) * 4
    c0 = tl.load(meta)
    first = tl.load(meta + 1)
    width = tl.load(meta + 2)
    h_off = tl.load(meta + 3)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = c0 + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_n = rn < first + width
    mask_r = rr < R
    entry = tl.load(idx_ptr + rm, mask=mask_m, other=0)
    b3 = tl.load(b_ptr + entry[:, None, None] * s_be + rr[None, :, None] * s_br
                 + rn[None, None, :] * s_bn,
                 mask=(mask_m[:, None, None] & mask_r[None, :, None]) & mask_n[None, None, :],
                 other=0.0)
    hg = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(H_SPLIT):
        hg += tl.load(h_ptr + s * s_hs + rm[:, None] * s_hm + h_off + rr[None, :],
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    acc = tl.sum(hg[:, :, None] * b3.to(tl.float32), axis=1)
    if SIDE_BY_SIDE:  # one (M, sum N) matrix of row stride s_ym
        y_ptrs = y_ptr + rm[:, None] * s_ym + rn[None, :]
    else:
        y_ptrs = y_ptr + M * first + rm[:, None] * width + (rn - first)[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    acc += tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def tma_lora_gemm_kernel(x_desc, w_desc, y_desc, h_desc, b_desc, bias_ptr, M, N, K, scale,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         R: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr):
    # y = x W^T + b + s h B^T for many rows, tiles loaded by TMA descriptors. Persistent:
    # each program walks the output tiles PROGRAMS apart (flattened, so the loads of its
    # next tile overlap this one's epilogue), grouped along M so that a band of W tiles
    # stays in L2. The rank-R expand is one more MMA in the epilogue: y is written once.
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
            acc = tl.dot(x_desc.load([off_m, ki * BK]), w_desc.load([off_n, ki * BK]).T, acc)
        # the scale goes on h (BM x R), not on a second BM x BN product: two accumulator
        # tiles of 128 x 256 float32 spill registers (measured 4.6x slower)
        if HAS_LORA:
            ht = h_desc.load([off_m, 0])
            ht = (ht.to(tl.float32) * scale).to(ht.dtype)
            acc = tl.dot(ht, b_desc.load([off_n, 0]).T, acc)
        if HAS_BIAS:
            rn = off_n + tl.arange(0, BN)
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


@triton.jit
def lora_grad_kernel(g_ptr, b_ptr, h_ptr, gb_ptr, db_ptr, T, N, R, n_per, scale,
                     s_gt, s_gn, s_bn, s_br, s_ht, s_hr,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                     ATOMIC_GB: tl.constexpr):
    # The two rank-r products of a LoRA linear's backward that read the output gradient g
    # (T x N), from one pass over it: gB = g B (T x r) and dB = s g^T h (N x r). Program
    # (i, j) takes rows [i BLOCK_T, +BLOCK_T) and the j-th slice of the columns; its gB
    # rows are complete over its slice (summed across slices by atomics when there are
    # several, ATOMIC_GB), its dB rows are partial over its rows (summed by atomics).
    # Both outputs are float32 and must start at zero.
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    mask_t = rt < T
    mask_r = rr < R
    hs = tl.load(h_ptr + rt[:, None] * s_ht + rr[None, :] * s_hr,
                 mask=mask_t[:, None] & mask_r[None, :], other=0.0)
    hs = (hs.to(tl.float32) * scale).to(hs.dtype)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    n_lo = tl.program_id(1) * n_per
    n_hi = tl.minimum(n_lo + n_per, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + rn
        mask_n = cols < n_hi
        gt = tl.load(g_ptr + rt[:, None] * s_gt + cols[None, :] * s_gn,
                     mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        bt = tl.load(b_ptr + cols[:, None] * s_bn + rr[None, :] * s_br,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(gt, bt, acc)
        part = tl.dot(tl.trans(gt), hs)
        tl.atomic_add(db_ptr + cols[:, None] * R + rr[None, :], part,
                      mask=mask_n[:, None] & mask_r[None, :])
    gb_ptrs = gb_ptr + rt[:, None] * R + rr[None, :]
    out_mask = mask_t[:, None] & mask_r[None, :]
    if ATOMIC_GB:
        tl.atomic_add(gb_ptrs, acc, mask=out_mask)
    else:
        tl.store(gb_ptrs, acc, mask=out_mask)
