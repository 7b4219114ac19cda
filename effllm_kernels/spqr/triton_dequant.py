"""Dequantize a repacked ``spqr`` layer into a dense matrix, for large batches (then one cuBLAS matmul).

The fused kernels decode every weight once per tile of activation rows (16-64 rows), so their cost
grows with M, while a dense bf16 matmul stays near its memory floor up to M ~ 190 on the H200
(research/performance.md §1). Above ``launch.DEQUANT_MIN_M`` rows the launcher therefore writes the
dense ``W_s`` once per call and hands it to cuBLAS (prefill, eval-ppl windows): the decode costs one
pass over the packed bytes plus one write of N x K elements, whatever M is.

``_spqr_dequant_kernel`` writes ``W_s`` [N, K] (stored column order; codes and statistics) in the
output dtype: a program decodes BN rows x C units with the tile functions of the older tensor-core
kernel (:mod:`.triton_tiles`, :mod:`.triton_decode`: any bit width, group size and statistics format),
in fp32 (``W = cs * f - zcs``), rounded once. ``_spqr_outlier_kernel`` then adds each row's CSR outliers
in place; a row's columns are distinct, so no two threads touch one element (the outlier positions
are rounded twice: the dense value, then the sum).
"""

from __future__ import annotations

import triton
import triton.language as tl

from effllm_kernels.splitk import to_out_dtype
from effllm_kernels.spqr.triton_decode import code_tree, outlier_slots, outlier_span
from effllm_kernels.spqr.triton_kernels import _coeffs3
from effllm_kernels.spqr.triton_tiles import tile_words


@triton.jit
def _spqr_dequant_kernel(
    qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, w_ptr, N, K, G, NBLK, n_units, one,
    BITS: tl.constexpr, GROUP: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
    BN: tl.constexpr, C: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program: ``w[rows, units]`` = the decoded weights of BN rows x C units (32 columns each)."""
    NG: tl.constexpr = 32 // GROUP if GROUP < 32 else 1  # groups per unit
    GL: tl.constexpr = 32 // NG
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    units = tl.program_id(1) * C + tl.arange(0, C)
    n_mask = rn < N
    umask = units < n_units
    w0, w1, w2, w3, w4, w5, w6, w7 = tile_words(qw_ptr, units, rn, umask[:, None] & n_mask[None, :], N, BITS)
    f = tl.reshape(code_tree(w0, w1, w2, w3, w4, w5, w6, w7, one, 0, BITS, 5), [C, BN, NG, GL])
    cs, zcs = _coeffs3(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rn, n_mask, N, G, NBLK,
                       BITS, GROUP, STAT_BITS, STAT_GROUP, NG)
    w = tl.reshape(f * cs[:, :, :, None] - zcs[:, :, :, None], [C, BN, 32])  # [c, n, j]: column 32 u_c + j
    k = (units * 32)[:, None, None] + tl.arange(0, 32)[None, None, :]
    offs = rn.to(tl.int64)[None, :, None] * K + k
    tl.store(w_ptr + offs, to_out_dtype(w, w_ptr, INTERPRET), mask=n_mask[None, :, None] & (k < K))


@triton.jit
def _spqr_outlier_kernel(rp_ptr, oc_ptr, ov_ptr, w_ptr, N, K, BN: tl.constexpr, R: tl.constexpr,
                         INTERPRET: tl.constexpr):
    """One program: ``w[n, col] += val`` for every CSR outlier of rows [BN], R slots per row at a time."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    start, end, most = outlier_span(rp_ptr, rn, N)
    for j0 in range(0, most, R):
        col, val, om = outlier_slots(oc_ptr, ov_ptr, rp_ptr, start, end, j0, R, False)
        p = w_ptr + rn.to(tl.int64)[:, None] * K + col
        w = tl.load(p, mask=om, other=0.0).to(tl.float32)
        tl.store(p, to_out_dtype(w + val, w_ptr, INTERPRET), mask=om)
