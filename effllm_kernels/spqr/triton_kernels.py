"""Triton kernels for the ``spqr`` linear layer on the repacked layout: y = x[..., perm] @ W_s^T (+ b).

Both kernels read the kernel layout of :mod:`.repack` (codes and statistics transposed so that
neighbouring output rows are contiguous) and fuse, in one launch: the act-order gather of x, the
decoding of the codes, the second-level dequantization of scales and zeros (SpQR §4.1), the matmul
and the outliers (§4.2). A program owns BN output rows and walks its share of K in steps of C
units of 32 codes, as [C, BN] tiles (:mod:`.triton_tiles`): a thread holds a few neighbouring rows
of one unit, so each activation it loads serves all of its rows, and no tile crosses threads.

* ``_spqr_gemv_kernel`` (decode, a few activation rows): per code one shift, one LOP3 and one FMA
  (a chain of FMAs, :func:`group_dot`) into per-group partial sums ``P = sum_k f_k x_k``; per
  (row, group) ``cs * P - zcs * sum_k x_k`` (the group identity of the first-level grid), the
  statistics decoded once per (row, group) and shared by its 16 codes. The activations of a step
  are gathered through ``perm`` once per program ([C, 32], one pass through shared memory) and
  serve all BN rows.
* ``_spqr_mma_kernel`` (small batches): the tile is dequantized (one FMA per weight), rounded to
  the activation dtype, laid out as a [BN, 32 C] operand and fed to ``tl.dot`` (wgmma on Hopper)
  with the [32 C, BM] activation tile ("swap AB": weight rows fill the 64-row side); x is permuted
  and transposed once per call by the launcher, so a column of x is contiguous.

Outliers: each row's CSR entries, R at a time as a [BN, R] tile, split over the K-split programs,
added to the row sums. A K split stays one launch (:func:`effllm_kernels.splitk.finish`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from effllm_kernels.splitk import finish
from effllm_kernels.spqr.triton_decode import code_tree, mma_outliers, mma_tile, outlier_slots, outlier_span
from effllm_kernels.spqr.triton_tiles import tile_coeffs, tile_words, x_at

#: Arguments that vary between calls of one configuration: no recompilation per M or K split.
_VARYING = ["M", "units_per_split", "split"]


@triton.jit
def _outlier_rows(x_row, perm_ptr, rp_ptr, oc_ptr, ov_ptr, rn, N, pid_k, split, R: tl.constexpr,
                  HAS_PERM: tl.constexpr):
    """sum_j val[n, j] * x[perm[col[n, j]]] over this split's share of each row's outliers -> [BN]."""
    start, end, most = outlier_span(rp_ptr, rn, N)
    total = tl.zeros([rn.shape[0]], dtype=tl.float32)
    for j0 in range(pid_k * R, most, R * split):
        col, val, om = outlier_slots(oc_ptr, ov_ptr, perm_ptr, start, end, j0, R, HAS_PERM)
        total += tl.sum(val * tl.load(x_row + col, mask=om, other=0.0).to(tl.float32), axis=1)
    return total


@triton.jit
def _fma_tree(f, x, acc, D: tl.constexpr):
    """acc + sum_j f[..., j] * x[..., j] over D trailing axes of size 2, as one chain of FMAs in
    index order (halves first to last; D is a compile-time depth, the recursion unrolls)."""
    fa, fb = tl.split(f)
    xa, xb = tl.split(x)
    if D == 1:
        return tl.fma(fb, xb, tl.fma(fa, xa, acc))
    else:
        return _fma_tree(fb, xb, _fma_tree(fa, xa, acc, D - 1), D - 1)


@triton.jit
def group_dot(f, x, GL: tl.constexpr):
    """sum_j f[..., j] * x[..., j] over the last axis (GL in 8, 16, 32) as one chain of FMAs.

    (``tl.sum(f * x)`` reduces as a tree: a multiply and an add for most elements.)
    """
    D: tl.constexpr = 3 if GL == 8 else (4 if GL == 16 else 5)
    f = tl.reshape(f, f.shape[:-1] + [2] * D)
    x = tl.reshape(x, x.shape[:-1] + [2] * D)
    return _fma_tree(f, x, tl.zeros(f.shape[:-D], dtype=tl.float32), D)


@triton.jit(do_not_specialize=_VARYING)
def _spqr_gemv_kernel(
    x_ptr, perm_ptr, qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, stride_xm, G, NBLK, units_per_split, n_units, split, one,
    BITS: tl.constexpr, GROUP: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
    BN: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
    EVEN: tl.constexpr, INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program: rows [BN] for activation row ``m`` over units [units_per_split] of K."""
    NG: tl.constexpr = 32 // GROUP if GROUP < 32 else 1  # groups per unit
    GL: tl.constexpr = 32 // NG  # codes of one group in a unit
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    rc = tl.arange(0, C)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([C, BN, NG], dtype=tl.float32)
    u_begin = pid_k * units_per_split
    u_end = tl.minimum(u_begin + units_per_split, n_units)
    for u0 in tl.range(u_begin, u_end, C, num_stages=NUM_STAGES):
        units = u0 + rc
        umask = units < u_end
        w0, w1, w2, w3, w4, w5, w6, w7 = tile_words(qw_ptr, units, rn, umask[:, None] & n_mask[None, :], N, BITS)
        f = code_tree(w0, w1, w2, w3, w4, w5, w6, w7, one, 0, BITS, 5)
        f = tl.reshape(f, [C, BN, NG, GL])  # [c, n, p, j]: code p * GL + j of unit c, row n
        k = units[:, None] * 32 + tl.arange(0, 32)[None, :]
        xk = tl.reshape(x_at(x_row, perm_ptr, k, umask[:, None] & (k < K), HAS_PERM, EVEN), [C, NG, GL])
        part = group_dot(f, xk[:, None, :, :], GL)  # [C, BN, NG]
        cs, zcs = _coeffs3(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                           BITS, GROUP, STAT_BITS, STAT_GROUP, NG)
        acc += cs * part - zcs * tl.sum(xk, axis=2)[:, None, :]
    out = tl.sum(tl.sum(acc, axis=2), axis=0)  # [BN]
    if HAS_OUTLIERS:
        out += _outlier_rows(x_row, perm_ptr, rp_ptr, oc_ptr, ov_ptr, rn, N, pid_k, split, R, HAS_PERM)
    finish(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, m * N + rn, m * N + rn, M * N, pid_k, split,
           m * tl.num_programs(1) + pid_n, rn, n_mask, USE_WS, True, HAS_BIAS, INTERPRET)


@triton.jit
def _coeffs_part(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                 BITS: tl.constexpr, GROUP: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
                 P: tl.constexpr, GL: tl.constexpr):
    """(cs, zcs) [C, BN] of the group holding code ``P * GL`` of each unit."""
    g = (units * 32 + P * GL) // GROUP
    return tile_coeffs(sq_ptr, zq_ptr, sst_ptr, zst_ptr, g, umask & (g < G), rn, n_mask, N, NBLK,
                       BITS, STAT_BITS, STAT_GROUP)


@triton.jit
def _coeffs3(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
             BITS: tl.constexpr, GROUP: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
             NG: tl.constexpr):
    """(cs, zcs) [C, BN, NG] of the NG groups of each unit (NG in 1, 2, 4)."""
    GL: tl.constexpr = 32 // NG
    c0, z0 = _coeffs_part(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                          BITS, GROUP, STAT_BITS, STAT_GROUP, 0, GL)
    if NG == 1:
        cs = c0[:, :, None]
        zcs = z0[:, :, None]
    elif NG == 2:
        c1, z1 = _coeffs_part(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                              BITS, GROUP, STAT_BITS, STAT_GROUP, 1, GL)
        cs = tl.join(c0, c1)
        zcs = tl.join(z0, z1)
    else:
        c1, z1 = _coeffs_part(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                              BITS, GROUP, STAT_BITS, STAT_GROUP, 1, GL)
        c2, z2 = _coeffs_part(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                              BITS, GROUP, STAT_BITS, STAT_GROUP, 2, GL)
        c3, z3 = _coeffs_part(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                              BITS, GROUP, STAT_BITS, STAT_GROUP, 3, GL)
        C: tl.constexpr = units.shape[0]
        BN: tl.constexpr = rn.shape[0]
        cs = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [C, BN, 4])
        zcs = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [C, BN, 4])
    return cs, zcs


@triton.jit(do_not_specialize=_VARYING)
def _spqr_mma_kernel(
    x_ptr, perm_ptr, qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, stride_xk, G, NBLK, units_per_split, n_units, split, one,
    BITS: tl.constexpr, GROUP: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
    EVEN: tl.constexpr, INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program: acc[BN, BM] = W_s[rows] @ xp[acts]^T over units [units_per_split] of K ("swap AB").

    ``x_ptr`` holds x transposed and in stored column order, [K, M] with ``x_ptr[k * stride_xk + m] =
    x[m, perm[k]]``: a column of x (an outlier's activations, a row of the [BK, BM] tile) is contiguous.
    """
    NG: tl.constexpr = 32 // GROUP if GROUP < 32 else 1
    GL: tl.constexpr = 32 // NG
    BK: tl.constexpr = 32 * C
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_n, pid_k, pid_m, rn, rm, n_mask, m_mask, u_begin, u_end = mma_tile(N, M, units_per_split, n_units, BN, BM)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for u0 in tl.range(u_begin, u_end, C, num_stages=NUM_STAGES):
        units = u0 + rc
        umask = units < u_end
        w0, w1, w2, w3, w4, w5, w6, w7 = tile_words(qw_ptr, units, rn, umask[:, None] & n_mask[None, :], N, BITS)
        f = code_tree(w0, w1, w2, w3, w4, w5, w6, w7, one, 0, BITS, 5)
        f = tl.reshape(f, [C, BN, NG, GL])  # [c, n, j] = code j of unit c, row n
        cs, zcs = _coeffs3(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                           BITS, GROUP, STAT_BITS, STAT_GROUP, NG)
        w = tl.reshape(f * cs[:, :, :, None] - zcs[:, :, :, None], [C, BN, 32])
        w = tl.reshape(tl.permute(w, (1, 0, 2)), [BN, BK])  # column c*32 + j: stored column (u0 + c)*32 + j
        k = u0 * 32 + rk
        xm = ((k < K) & (k < u_end * 32))[:, None] & m_mask[None, :]
        xt = tl.load(x_ptr + k[:, None] * stride_xk + rm[None, :], mask=xm, other=0.0)  # [BK, BM]
        if INTERPRET or DT == tl.float32:  # the interpreter cannot round to bf16; fp32 stays exact
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(DT), xt, acc)
    if HAS_OUTLIERS:  # x is in stored order: outlier columns index it directly
        acc += mma_outliers(x_ptr, stride_xk, perm_ptr, rp_ptr, oc_ptr, ov_ptr, rn, rm, m_mask, N, pid_k, split,
                            R, BN, BM)
    mask = n_mask[:, None] & m_mask[None, :]
    offs = rm[None, :] * N + rn[:, None]
    finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, offs, offs, M * N, pid_k, split,
           pid_m * tl.num_programs(0) + pid_n, rn[:, None], mask, USE_WS, True, HAS_BIAS, INTERPRET)
