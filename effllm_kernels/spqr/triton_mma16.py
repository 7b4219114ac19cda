"""The fp16 tensor-core kernel for ``spqr`` layers with 2/3/4-bit codes and groups of 16 (small batches).

Same contract as ``_spqr_mma_kernel`` (:mod:`.triton_kernels`: "swap AB", ``acc[BN, BM] = W_s[rows] @
xp^T`` with x permuted and transposed once per call by the launcher, [K, M] in stored column order),
different dequantization: the codes go straight to **fp16 pairs** in registers by the PTX block of
:func:`.pair_asm.decode_asm` (per two weights one LOP3 with the exponent of 1024, one fp16x2 add/FMA
for the exact centring ``q - 2**(bits-1)``, one fp16x2 FMA ``w = s * q_c - s * z_c``), with the
scale and the centred zero decoded once per (row, group) in fp32 (:func:`.triton_gemv16._decode_stats`,
the second-level statistics loaded once per thread and group) and converted to fp16x2 once per
(row, group).

Offline counts (sm_90 build of Triton 3.6, 3-bit codes and statistics, outliers, split K; SASS
instructions of the K loop x threads / weights of a step): ``_spqr_mma_kernel`` at the heuristic's
tile (128 rows x 2 units, 4 warps, 3 stages) 10.2 at BM = 16 and 11.3 at BM = 64 (an fp32 FMA, a LOP3,
shifts and moves, half a bf16 pack per weight; the words and statistics staged through shared memory
by cp.async, two layout conversions of the coefficients, 6 barriers per step); this kernel at the same
tile 5.7 (BM = 16) / 5.5 (BM = 64) with ``host_cast``, 6.3 / 8.0 without, 4.2 with 4 units per step,
4.1 with 256 rows x 4 units on 8 warps (the decode itself 1.5; no spills; the dot is wgmma
``HGMMA.64xBMx16.F32`` with the weights stored once to shared memory and read back by LDSM).

Tile: a program owns BN = T * R output rows and BM activation rows, and walks its share of K in steps
of C units (BK = 32 C). The [C, T, R] tiles of :mod:`.triton_gemv16` give each thread R neighbouring
rows of one unit (one vector load per word plane); the 32 decoded weights of each (unit, row) are
joined (a fixed tree, no data movement) into [C, T, R, 32] in *pair order* (position 2p + h holds
half h of pair p), permuted to the [BN, BK] operand and handed to ``tl.dot`` (wgmma on Hopper: one
deliberate pass through shared memory into the operand layout). The pair order is a permutation of
K inside each unit (identity for the paired 3-bit layout; 2-/4-bit pairs are codes (a, a + 16 / bits)),
so the activation tile [BK, BM] is loaded at the matching stored columns (:func:`_code_of_position`).

Precision: the dot is fp16 x fp16 with fp32 accumulation. The weights are scaled by WS = 2**8 before
rounding to fp16 (scales down to ~2e-7 stay normal; |W| < 256), the activations by XS (bf16: 2**-8, so
|x| up to ~1.6e7 stays finite in fp16; fp16: 1); the result is rescaled by 1 / (XS * WS) in fp32.
Rounding W to fp16 (11 bits) is finer than the old kernel's rounding to bf16 (8 bits).

With ``XH`` (config ``host_cast``) the launcher hands over x already scaled, rounded to fp16 and padded
to whole BM tiles (one more small launch per call), so no program converts its [BK, BM] activation
tile and its loads are vectors along M (at BM = 64 the masked, converted per-element loads cost ~1.5
instructions per weight); the outliers then read the fp16 copy too (exact for bf16
activations of magnitude 2**-6 .. 1.6e7; smaller ones keep an absolute error below 2**-17).

Outliers and the K split as in ``_spqr_mma_kernel``. Under ``TRITON_INTERPRET`` the PTX block is
replaced by the same math in fp32 Triton ops (same pair order, same join tree), so the CPU tests check
the indexing, the statistics and the activation permutation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from effllm_kernels.splitk import finish
from effllm_kernels.spqr.triton_decode import mma_outliers, mma_tile
from effllm_kernels.spqr.triton_gemv16 import _decode_stats, _step_loads, pair_codes

_VARYING = ["M", "units_per_split", "split"]

#: Weight scale before rounding to fp16 (a power of two: exact; undone in fp32 at the end).
WS = tl.constexpr(256.0)


@triton.jit
def _code_of_position(f, BITS: tl.constexpr):
    """The code (0..31 inside a unit) at position ``f`` of the pair order (pair f // 2, half f % 2)."""
    if BITS == 3:
        return f
    else:
        PW: tl.constexpr = 16 // BITS  # pairs per word; a pair is codes (a, a + PW)
        p = f // 2
        return (p // PW) * (2 * PW) + p % PW + (f % 2) * PW


@triton.jit
def _j(a, b):
    """join(a, b) [..., n] x 2 -> [..., 2 n], b's elements at the odd positions."""
    r = tl.join(a, b)
    return tl.reshape(r, r.shape[:-2] + [r.shape[-2] * 2])


@triton.jit
def _tree32(v):
    """The 32 tensors of tuple v ([C, T, R] each) as one [C, T, R, 32], v[i] at position i."""
    a0 = tl.join(v[0], v[16])
    a1 = tl.join(v[1], v[17])
    a2 = tl.join(v[2], v[18])
    a3 = tl.join(v[3], v[19])
    a4 = tl.join(v[4], v[20])
    a5 = tl.join(v[5], v[21])
    a6 = tl.join(v[6], v[22])
    a7 = tl.join(v[7], v[23])
    a8 = tl.join(v[8], v[24])
    a9 = tl.join(v[9], v[25])
    a10 = tl.join(v[10], v[26])
    a11 = tl.join(v[11], v[27])
    a12 = tl.join(v[12], v[28])
    a13 = tl.join(v[13], v[29])
    a14 = tl.join(v[14], v[30])
    a15 = tl.join(v[15], v[31])
    b0 = _j(a0, a8)
    b1 = _j(a1, a9)
    b2 = _j(a2, a10)
    b3 = _j(a3, a11)
    b4 = _j(a4, a12)
    b5 = _j(a5, a13)
    b6 = _j(a6, a14)
    b7 = _j(a7, a15)
    c0 = _j(b0, b4)
    c1 = _j(b1, b5)
    c2 = _j(b2, b6)
    c3 = _j(b3, b7)
    d0 = _j(c0, c2)
    d1 = _j(c1, c3)
    return _j(d0, d1)


@triton.jit
def _emulated_weights(w0, w1, w2, w3, sw0, nb0, sw1, nb1, BITS: tl.constexpr):
    """The 32 weights of the PTX block in fp32 Triton ops (the interpreter), pair order: a tuple."""
    OFF: tl.constexpr = 1 << (BITS - 1)
    out = ()
    for p in tl.static_range(16):
        qa, qb = pair_codes(w0, w1, w2, w3, p, BITS)
        if p < 8:
            out = out + ((qa.to(tl.float32) - OFF) * sw0 + nb0, (qb.to(tl.float32) - OFF) * sw0 + nb0)
        else:
            out = out + ((qa.to(tl.float32) - OFF) * sw1 + nb1, (qb.to(tl.float32) - OFF) * sw1 + nb1)
    return out


@triton.jit
def _asm_weights(w0, w1, w2, w3, sw0, nb0, sw1, nb1, DEC_ASM: tl.constexpr, DEC_CONS: tl.constexpr):
    """The 32 fp16 weights [C, T, R] of each (unit, row) by the PTX block of pair_asm.decode_asm."""
    return tl.inline_asm_elementwise(
        DEC_ASM, DEC_CONS,
        [w0, w1, w2, w3, sw0.to(tl.uint32, bitcast=True), nb0.to(tl.uint32, bitcast=True),
         sw1.to(tl.uint32, bitcast=True), nb1.to(tl.uint32, bitcast=True)],
        dtype=(tl.float16,) * 32, is_pure=True, pack=1)


@triton.jit(do_not_specialize=_VARYING)
def _spqr_mma16_kernel(
    x_ptr, perm_ptr, qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, stride_xk, G, NBLK, units_per_split, n_units, split, one, NSW,
    BITS: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, R: tl.constexpr, C: tl.constexpr, RO: tl.constexpr, XS: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr, PREFETCH: tl.constexpr,
    INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr, DEC_ASM: tl.constexpr, DEC_CONS: tl.constexpr,
    XH: tl.constexpr,
):
    """One program: acc[BN, BM] = W_s[rows] @ xp[acts]^T over units [units_per_split] of K.

    ``x_ptr``: x transposed, stored column order, [K, M] (``x_ptr[k * stride_xk + m] = x[m, perm[k]]``);
    with XH already scaled by XS and rounded to fp16 by the launcher (no conversion per program and step)
    and padded to a multiple of BM columns (stride_xk >= M; the padding holds anything: column m of x
    only reaches column m of the output, which is not stored for m >= M).
    """
    T: tl.constexpr = BN // R
    BK: tl.constexpr = 32 * C
    pid_n, pid_k, pid_m, rn, rm, n_mask, m_mask, u_begin, u_end = mma_tile(N, M, units_per_split, n_units, BN, BM)
    first = pid_n * BN + tl.arange(0, T) * R
    rows = first[:, None] + tl.arange(0, R)[None, :]  # [T, R]
    rmask = rows < N
    blk = first // STAT_GROUP  # R divides STAT_GROUP: a thread's rows share one block
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    kin = (rk // 32) * 32 + _code_of_position(rk % 32, BITS)  # stored column of each operand position
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    if PREFETCH >= 1:
        units = u_begin + rc
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _step_loads(
            qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, units < u_end, rows, rmask, blk, N, G, NBLK, NSW,
            BITS, STAT_BITS)
    for u0 in tl.range(u_begin, u_end, C, num_stages=NUM_STAGES):
        units = u0 + rc
        umask = units < u_end
        if PREFETCH >= 1:
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15
            nu = units + C
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _step_loads(
                qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, nu, nu < u_end, rows, rmask, blk, N, G, NBLK, NSW,
                BITS, STAT_BITS)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = _step_loads(
                qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rows, rmask, blk, N, G, NBLK, NSW,
                BITS, STAT_BITS)
        s0, zc0, s1, zc1 = _decode_stats(c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, units, one,
                                         BITS, STAT_BITS)
        sw0 = s0 * WS
        sw1 = s1 * WS
        nb0 = -(sw0 * zc0)
        nb1 = -(sw1 * zc1)
        k = u0 * 32 + kin
        if XH:  # padded to whole BM tiles: masked along K only, so the loads along M are vectors
            xm = ((k < K) & (k < u_end * 32))[:, None]
        else:
            xm = ((k < K) & (k < u_end * 32))[:, None] & m_mask[None, :]
        xt = tl.load(x_ptr + k[:, None] * stride_xk + rm[None, :], mask=xm, other=0.0)  # [BK, BM]
        if x_ptr.dtype.element_ty != tl.float16:
            xt = (xt.to(tl.float32) * XS).to(tl.float16)
        if INTERPRET:
            v = _emulated_weights(c0, c1, c2, c3, sw0, nb0, sw1, nb1, BITS)
            w = tl.reshape(tl.permute(_tree32(v), (1, 2, 0, 3)), [BN, BK])
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            v = _asm_weights(c0, c1, c2, c3, sw0, nb0, sw1, nb1, DEC_ASM, DEC_CONS)
            w = tl.reshape(tl.permute(_tree32(v), (1, 2, 0, 3)), [BN, BK])
            acc = tl.dot(w, xt, acc)
    acc = acc * (1.0 / (XS * WS))
    if HAS_OUTLIERS:  # x is in stored order: outlier columns index it directly
        oacc = mma_outliers(x_ptr, stride_xk, perm_ptr, rp_ptr, oc_ptr, ov_ptr, rn, rm, m_mask, N, pid_k, split,
                            RO, BN, BM)
        if XH:
            oacc = oacc * (1.0 / XS)
        acc += oacc
    mask = n_mask[:, None] & m_mask[None, :]
    offs = rm[None, :] * N + rn[:, None]
    finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, offs, offs, M * N, pid_k, split,
           pid_m * tl.num_programs(0) + pid_n, rn[:, None], mask, USE_WS, True, HAS_BIAS, INTERPRET)
