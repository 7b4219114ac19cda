"""Triton kernels for the ``spqr`` linear layer: y = x[..., perm] @ W_s^T (+ bias), one launch each.

Both kernels read the stored format of :mod:`effllm_kernels.spqr.layout` as it is (dense
bit-stream codes, packed second-level statistics, CSR outliers) and fuse, in one pass over the
weight: the act-order gather of x, the decoding of the codes (``triton_decode.unit_codes``), the
second-level dequantization of scales and zeros (paper §4.1), the matmul and the outliers (§4.2).

A program owns BN weight rows and walks its share of K in steps of C units of 32 codes
(BK = 32*C codes per step); the codes of a step form a [BN, C, 32] fp32 tile ``f = 1 + q/2**BITS``.

* ``_spqr_gemv_kernel`` (decode, M = 1): the group identity
  ``y_n = sum_g cs_ng * sum_{k in g} f_nk x_k - zcs_ng * sum_{k in g} x_k``: per code one FMA into
  per-group partial sums ([BN, C, NG], NG groups per unit), the statistics decoded once per
  (row, group) and the activation group sums once per step (shared by all BN rows).
* ``_spqr_mma_kernel`` (small batches): the tile is dequantized (one FMA per weight, statistics
  broadcast over each group), rounded to the activation dtype and fed as one [BN, BK] operand to
  ``tl.dot`` against the [BK, BM] activation tile gathered through ``perm`` ("swap AB": weight rows
  fill the tensor core's 64-row side).

Outliers: each row's CSR entries are read R at a time as a [BN, R] tile (rows in parallel, no
one-hot), split over the K-split programs, and their products with the gathered activations are
added to the row sums. A K split stays one launch: ``effllm_kernels.rtn.triton_matmul._finish``
(the last program of a tile adds the fp32 partials in a fixed order).
"""

from __future__ import annotations

import triton
import triton.language as tl

from effllm_kernels.rtn.triton_matmul import _finish
from effllm_kernels.spqr.triton_decode import gather_x, group_coeffs, outlier_slots, outlier_span, unit_codes


@triton.jit
def _step_groups(units, G, GROUP: tl.constexpr, NG: tl.constexpr, GL: tl.constexpr):
    """Group index [1, C, NG] of the NG group parts of each unit, and its validity mask."""
    g = ((units[:, None] * 32 + tl.arange(0, NG)[None, :] * GL) // GROUP)[None, :, :]
    return g, g < G


#: Arguments that vary between calls of one configuration: no recompilation per M or K split.
_VARYING = ["M", "units_per_split", "split"]


@triton.jit(do_not_specialize=_VARYING)
def _spqr_gemv_kernel(
    x_ptr, perm_ptr, qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, stride_xm, W_ROW, S_ROW, G, units_per_split, n_units, split,
    BITS: tl.constexpr, GROUP: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
    EVEN: tl.constexpr, INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program: rows [BN] for activation row ``m`` over units [units_per_split] of K."""
    NG: tl.constexpr = 32 // GROUP if GROUP < 32 else 1  # group parts per unit
    GL: tl.constexpr = 32 // NG  # codes per part
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    n0 = pid_n * BN
    rn = n0 + tl.arange(0, BN)
    n_mask = rn < N
    rows = tl.minimum(rn, N - 1)  # rows past N repeat the last one (never stored): no load masks
    x_row = m * stride_xm
    rc = tl.arange(0, C)
    acc = tl.zeros([BN, C, NG], dtype=tl.float32)
    u_begin = pid_k * units_per_split
    u_end = tl.minimum(u_begin + units_per_split, n_units)
    for u0 in tl.range(u_begin, u_end, C, num_stages=NUM_STAGES):
        units = u0 + rc
        xk = gather_x(x_ptr, perm_ptr, x_row, units[:, None] * 32 + tl.arange(0, 32)[None, :], K,
                      HAS_PERM, EVEN)  # [C, 32]
        f = unit_codes(qw_ptr, rows, units, W_ROW, BITS, EVEN)  # [BN, C, 32]
        part = tl.sum(tl.reshape(f * xk[None, :, :], [BN, C, NG, GL]), axis=3)
        xs = tl.sum(tl.reshape(xk, [C, NG, GL]), axis=2)
        g, gmask = _step_groups(units, G, GROUP, NG, GL)
        cs, zcs = group_coeffs(sq_ptr, zq_ptr, sst_ptr, zst_ptr, rows[:, None, None], n0, g, gmask, S_ROW, G,
                               BITS, STAT_BITS, STAT_GROUP, ONE_BLOCK)
        acc += cs * part - zcs * xs[None, :, :]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
    if HAS_OUTLIERS:
        start, end, most = outlier_span(rp_ptr, rn, N)
        for j0 in range(pid_k * R, most, R * split):
            col, val, om = outlier_slots(oc_ptr, ov_ptr, perm_ptr, start, end, j0, R, HAS_PERM)
            xv = tl.load(x_ptr + x_row + col, mask=om, other=0.0).to(tl.float32)
            out += tl.sum(val * xv, axis=1)
    _finish(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, m * N + rn, m * N + rn, M * N, pid_k, split,
            m * tl.num_programs(1) + pid_n, rn, n_mask, USE_WS, True, HAS_BIAS, INTERPRET)


@triton.jit(do_not_specialize=_VARYING)
def _spqr_mma_kernel(
    x_ptr, perm_ptr, qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, stride_xm, W_ROW, S_ROW, G, units_per_split, n_units, split,
    BITS: tl.constexpr, GROUP: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
    EVEN: tl.constexpr, INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program: acc[BN, BM] = W_s[rows] @ x[acts, perm]^T over units [units_per_split] of K."""
    NG: tl.constexpr = 32 // GROUP if GROUP < 32 else 1
    GL: tl.constexpr = 32 // NG
    BK: tl.constexpr = 32 * C
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n0 = pid_n * BN
    rn = n0 + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    n_mask = rn < N
    m_mask = rm < M
    rows = tl.minimum(rn, N - 1)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    x_rows = x_ptr + rm[None, :] * stride_xm  # [1, BM]
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    u_begin = pid_k * units_per_split
    u_end = tl.minimum(u_begin + units_per_split, n_units)
    for u0 in tl.range(u_begin, u_end, C, num_stages=NUM_STAGES):
        units = u0 + rc
        f = unit_codes(qw_ptr, rows, units, W_ROW, BITS, EVEN)  # [BN, C, 32]
        g, gmask = _step_groups(units, G, GROUP, NG, GL)
        cs, zcs = group_coeffs(sq_ptr, zq_ptr, sst_ptr, zst_ptr, rows[:, None, None], n0, g, gmask, S_ROW, G,
                               BITS, STAT_BITS, STAT_GROUP, ONE_BLOCK)
        w4 = tl.reshape(f, [BN, C, NG, GL]) * cs[:, :, :, None] - zcs[:, :, :, None]
        w = tl.reshape(w4, [BN, BK])  # dequantized, fp32, stored column order
        k = u0 * 32 + rk
        if EVEN:
            if HAS_PERM:
                k = tl.load(perm_ptr + k)
            xt = tl.load(x_rows + k[:, None], mask=m_mask[None, :], other=0.0)  # [BK, BM]
        else:
            kmask = k < K
            if HAS_PERM:
                k = tl.load(perm_ptr + k, mask=kmask, other=0)
            xt = tl.load(x_rows + k[:, None], mask=kmask[:, None] & m_mask[None, :], other=0.0)
        if INTERPRET or DT == tl.float32:  # the interpreter cannot round to bf16; fp32 stays exact
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(DT), xt, acc)
    if HAS_OUTLIERS:
        oacc = tl.zeros([BN, BM], dtype=tl.float32)
        start, end, most = outlier_span(rp_ptr, rn, N)
        for j0 in range(pid_k * R, most, R * split):
            col, val, om = outlier_slots(oc_ptr, ov_ptr, perm_ptr, start, end, j0, R, HAS_PERM)
            xo = tl.load(x_ptr + rm[None, None, :] * stride_xm + col[:, :, None],
                         mask=om[:, :, None] & m_mask[None, None, :], other=0.0).to(tl.float32)  # [BN, R, BM]
            oacc += tl.sum(val[:, :, None] * xo, axis=1)
        acc += oacc
    mask = n_mask[:, None] & m_mask[None, :]
    offs = rm[None, :] * N + rn[:, None]
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, offs, offs, M * N, pid_k, split,
            pid_m * tl.num_programs(0) + pid_n, rn[:, None], mask, USE_WS, True, HAS_BIAS, INTERPRET)
