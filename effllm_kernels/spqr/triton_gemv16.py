"""The fp16x2 GEMV for ``spqr`` layers with 2/3/4-bit codes and groups of 16 (decode, bf16 activations).

Same contract as ``_spqr_gemv_kernel`` (:mod:`.triton_kernels`), different arithmetic: per
(row, unit of 32 codes) one inline-PTX block (:mod:`.pair_asm`) decodes the codes two at a time
into fp16x2 and runs the two group dots ``P_g = sum_j (q_j - 2**(bits-1)) * x_j`` as chains of
fp16x2 FMAs (3 instructions per two weights), returned in fp32. Per (row, group), in fp32:
``y += s * (P - (z - 2**(bits-1)) * sum_j x_j)`` (the group identity of the first-level grid,
SpQR §4.1, with the codes centred), the statistics decoded once per (row, group).

Tile: a program owns BN = T * R rows; the [C, T, R] tiles give each thread R neighbouring rows of
one unit (R words in one vector load; the second-level statistics, shared by a block of
``stat_group`` >= R rows, are loaded once per thread and group) and C units are walked per step.
The activations of the program's share of K (gathered through ``perm``, scaled by XS, rounded to
fp16, packed in pairs, with their group sums) are written once per program to a small global
scratch ([M, n_units, 16] words, programs of one K split write the same bytes) in a prologue and
read back from L1 by every thread in the layout it needs (a layout conversion in the loop cost a
dozen barriers per step). With PREFETCH = d the loads of step i + d (codes and statistics) are
issued before the math of step i (register buffering), so the HBM latency hides behind the decoding.

Under ``TRITON_INTERPRET`` the PTX block is replaced by the same math in Triton ops (fp32, on the
fp16-rounded activations), so the CPU tests check the indexing and the statistics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from effllm_kernels.splitk import store_y
from effllm_kernels.spqr.triton_kernels import _outlier_rows

_VARYING = ["M", "units_per_split", "split"]


@triton.jit
def _x_step(x_row, perm_ptr, units, umask, K, XS: tl.constexpr, BITS: tl.constexpr, HAS_PERM: tl.constexpr):
    """The activations of units [C] in pair order (pair_asm.pair_layout): fp16 (xa, xb) [C, 16]."""
    pp = tl.arange(0, 16)
    D: tl.constexpr = 1 if BITS == 3 else 16 // BITS  # partner offset
    if BITS == 3:
        ca = 2 * pp
    else:
        ca = (pp // D) * (2 * D) + pp % D
    ka = units[:, None] * 32 + ca[None, :]
    kb = ka + D
    ma = umask[:, None] & (ka < K)
    mb = umask[:, None] & (kb < K)
    if HAS_PERM:
        ka = tl.load(perm_ptr + ka, mask=ma, other=0)
        kb = tl.load(perm_ptr + kb, mask=mb, other=0)
    xa = tl.load(x_row + ka, mask=ma, other=0.0)
    xb = tl.load(x_row + kb, mask=mb, other=0.0)
    return (xa.to(tl.float32) * XS).to(tl.float16), (xb.to(tl.float32) * XS).to(tl.float16)


@triton.jit
def _x_to_scratch(x_row, perm_ptr, xs_ptr, sx_ptr, row0, u_begin, u_end, K, XS: tl.constexpr, BITS: tl.constexpr,
                  HAS_PERM: tl.constexpr, CP: tl.constexpr):
    """Write the program's activations, as fp16x2 pairs [unit, 16] and group sums [unit, 2], to the scratch.

    Programs sharing (m, K split) write the same bytes; the barrier after it makes them visible to the
    whole program, which then reads each unit's pairs from L1 in the layout it needs.
    """
    pp = tl.arange(0, 16)
    for u in range(u_begin, u_end, CP):
        units = u + tl.arange(0, CP)
        umask = units < u_end
        xa, xb = _x_step(x_row, perm_ptr, units, umask, K, XS, BITS, HAS_PERM)
        xp, sx0, sx1 = _x_prepare(xa, xb)
        tl.store(xs_ptr + (row0 + units)[:, None] * 16 + pp[None, :], xp.to(tl.int32, bitcast=True),
                 mask=umask[:, None])
        tl.store(sx_ptr + (row0 + units) * 2, sx0, mask=umask)
        tl.store(sx_ptr + (row0 + units) * 2 + 1, sx1, mask=umask)
    tl.debug_barrier()


@triton.jit
def _x_pairs(xs_ptr, sx_ptr, row0, units, umask):
    """The 16 fp16x2 pairs (uint32 [C] each) and the two group sums (fp32 [C]) of units [C]."""
    p = xs_ptr + (row0 + units) * 16
    x = (tl.load(p, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 1, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 2, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 3, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 4, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 5, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 6, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 7, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 8, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 9, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 10, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 11, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 12, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 13, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 14, mask=umask, other=0).to(tl.uint32, bitcast=True),
         tl.load(p + 15, mask=umask, other=0).to(tl.uint32, bitcast=True))
    sx0 = tl.load(sx_ptr + (row0 + units) * 2, mask=umask, other=0.0)
    sx1 = tl.load(sx_ptr + (row0 + units) * 2 + 1, mask=umask, other=0.0)
    return x, sx0, sx1


@triton.jit
def _x_prepare(xa, xb):
    """fp16 pairs [C, 16] -> (fp16x2 words [C, 16] uint32, group sums sx0, sx1 [C] fp32)."""
    C: tl.constexpr = xa.shape[0]
    s = tl.sum(tl.reshape(xa.to(tl.float32) + xb.to(tl.float32), [C, 2, 8]), axis=2)
    sx0, sx1 = tl.split(s)
    xp = xa.to(tl.uint16, bitcast=True).to(tl.uint32) | (xb.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
    return xp, sx0, sx1


@triton.jit
def _half(v, HI: tl.constexpr):
    """fp32 value of the low (HI=0) or high half of fp16x2 words."""
    h = (v >> 16) if HI else (v & 0xFFFF)
    return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def pair_codes(w0, w1, w2, w3, P: tl.constexpr, BITS: tl.constexpr):
    """Codes 2P and 2P + 1 of a unit in the paired kernel layout (``repack.paired_position``), int32:
    the same bits of the two halves of one word (3-bit pair 15: one bit from each of three words)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    PW: tl.constexpr = 5 if BITS == 3 else 16 // BITS  # pairs per word
    WI: tl.constexpr = P // PW
    S: tl.constexpr = BITS * (P % PW)
    if BITS == 3 and P == 15:
        qa = ((w0 >> 15) & 1) | (((w1 >> 15) & 1) << 1) | (((w2 >> 15) & 1) << 2)
        qb = ((w0 >> 31) & 1) | (((w1 >> 31) & 1) << 1) | (((w2 >> 31) & 1) << 2)
    else:
        if WI == 0:
            w = w0
        elif WI == 1:
            w = w1
        elif WI == 2:
            w = w2
        else:
            w = w3
        qa = (w >> S) & MASK
        qb = (w >> (S + 16)) & MASK
    return qa, qb


@triton.jit
def _emulated_sums(w0, w1, w2, w3, x, BITS: tl.constexpr):
    """The group sums of the PTX block in Triton ops (the interpreter): fp32 (P0, P1) [C, T, R]."""
    OFF: tl.constexpr = 1 << (BITS - 1)
    p0 = tl.zeros(w0.shape, dtype=tl.float32)
    p1 = tl.zeros(w0.shape, dtype=tl.float32)
    for p in tl.static_range(16):
        qa, qb = pair_codes(w0, w1, w2, w3, p, BITS)
        part = ((qa.to(tl.float32) - OFF) * _half(x[p], 0)[:, None, None]
                + (qb.to(tl.float32) - OFF) * _half(x[p], 1)[:, None, None])
        if p < 8:
            p0 += part
        else:
            p1 += part
    return p0, p1


@triton.jit
def _bc(v, like):
    """[C] -> ``like``'s shape [C, T, R] (the same register for every row of a unit)."""
    return tl.broadcast_to(v[:, None, None], like.shape)


@triton.jit
def _asm_sums(w0, w1, w2, w3, x, DOT_ASM: tl.constexpr, DOT_CONS: tl.constexpr):
    """The group sums (P0, P1) [C, T, R] fp32 by the PTX block of pair_asm.dot_asm."""
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = x
    p0, p1 = tl.inline_asm_elementwise(
        DOT_ASM, DOT_CONS,
        [w0, w1, w2, w3, _bc(x0, w0), _bc(x1, w0), _bc(x2, w0), _bc(x3, w0), _bc(x4, w0), _bc(x5, w0),
         _bc(x6, w0), _bc(x7, w0), _bc(x8, w0), _bc(x9, w0), _bc(x10, w0), _bc(x11, w0), _bc(x12, w0),
         _bc(x13, w0), _bc(x14, w0), _bc(x15, w0)],
        dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    return p0.to(tl.float32, bitcast=True), p1.to(tl.float32, bitcast=True)


@triton.jit
def _load_words(qw_ptr, units, umask, rows, rmask, N, BITS: tl.constexpr):
    """The BITS words [C, T, R] uint32 of each (unit, row); absent planes repeat w0."""
    offs = (units * BITS)[:, None, None] * N + rows[None, :, :]
    mask = umask[:, None, None] & rmask[None, :, :]
    # masked-off words are left undefined: any code times the zero activations of such a unit adds 0
    w0 = tl.load(qw_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    w1 = tl.load(qw_ptr + offs + N, mask=mask, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    w2 = w0
    w3 = w0
    if BITS >= 3:
        w2 = tl.load(qw_ptr + offs + 2 * N, mask=mask, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    if BITS >= 4:
        w3 = tl.load(qw_ptr + offs + 3 * N, mask=mask, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
    return w0, w1, w2, w3


@triton.jit
def _load_stats(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rows, rmask, blk, N, G, NBLK, NSW,
                STAT_BITS: tl.constexpr):
    """The raw statistics of groups 2u, 2u + 1 of units [C] (12 tensors, :func:`_decode_stats`).

    Quantized statistics: the words holding the two scale codes and the two zero codes ([C, T, R]
    each: the word and, when the codes straddle, the next one) and the second-level (step, zp) of
    the two groups for the thread's block of rows ([C, T] each). fp16 statistics: s0, s1, z0, z1.
    """
    g0 = units * 2
    m0 = umask & (g0 < G)
    m1 = umask & (g0 + 1 < G)
    if STAT_BITS == 16:
        off = g0[:, None, None] * N + rows[None, :, :]
        mk0 = m0[:, None, None] & rmask[None, :, :]
        mk1 = m1[:, None, None] & rmask[None, :, :]
        s0 = tl.load(sq_ptr + off, mask=mk0, other=0.0)
        s1 = tl.load(sq_ptr + off + N, mask=mk1, other=0.0)
        z0 = tl.load(zq_ptr + off, mask=mk0, other=0.0)
        z1 = tl.load(zq_ptr + off + N, mask=mk1, other=0.0)
        raw = (s0, s1, z0, z1, s0, s0, s0, s0, s0, s0, s0, s0)
    else:
        raw = _load_quantized_stats(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, m0, m1, umask, rows, rmask, blk, N,
                                    NBLK, NSW, STAT_BITS)
    return raw


@triton.jit
def _load_quantized_stats(sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, m0, m1, umask, rows, rmask, blk, N, NBLK, NSW,
                          STAT_BITS: tl.constexpr):
    g0 = units * 2
    bit = units * (2 * STAT_BITS)
    wi = bit >> 5
    mask = umask[:, None, None] & rmask[None, :, :]
    need = mask & (((bit & 31) > 32 - 2 * STAT_BITS) & (wi + 1 < NSW))[:, None, None]
    ps = sq_ptr + wi[:, None, None] * N + rows[None, :, :]
    pz = zq_ptr + wi[:, None, None] * N + rows[None, :, :]
    s_lo = tl.load(ps, mask=mask)  # undefined where masked: finite codes, times a zero step (below)
    s_hi = tl.load(ps + N, mask=need)
    z_lo = tl.load(pz, mask=mask)
    z_hi = tl.load(pz + N, mask=need)
    off = (g0 * 2)[:, None] * NBLK + blk[None, :]  # [C, T]: (step, zp) of group g0, block of the rows
    bm0 = m0[:, None] & (blk < NBLK)[None, :]
    bm1 = m1[:, None] & (blk < NBLK)[None, :]
    ss0 = tl.load(sst_ptr + off, mask=bm0, other=0.0)
    sz0 = tl.load(sst_ptr + off + NBLK, mask=bm0, other=0.0)
    ss1 = tl.load(sst_ptr + off + 2 * NBLK, mask=bm1, other=0.0)
    sz1 = tl.load(sst_ptr + off + 3 * NBLK, mask=bm1, other=0.0)
    zs0 = tl.load(zst_ptr + off, mask=bm0, other=0.0)
    zz0 = tl.load(zst_ptr + off + NBLK, mask=bm0, other=0.0)
    zs1 = tl.load(zst_ptr + off + 2 * NBLK, mask=bm1, other=0.0)
    zz1 = tl.load(zst_ptr + off + 3 * NBLK, mask=bm1, other=0.0)
    return s_lo, s_hi, z_lo, z_hi, ss0, sz0, ss1, sz1, zs0, zz0, zs1, zz1


@triton.jit
def _step_loads(qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rows, rmask, blk, N, G, NBLK, NSW,
                BITS: tl.constexpr, STAT_BITS: tl.constexpr):
    """Everything a step loads from HBM: the words (4) and the raw statistics (12) of units [C]."""
    w0, w1, w2, w3 = _load_words(qw_ptr, units, umask, rows, rmask, N, BITS)
    r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11 = _load_stats(
        sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rows, rmask, blk, N, G, NBLK, NSW, STAT_BITS)
    return w0, w1, w2, w3, r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11


@triton.jit
def _window(lo, hi, units, STAT_BITS: tl.constexpr):
    """The two codes of a unit at bits [0, 2 SB) of a uint32 (a funnel shift of the word pair)."""
    sh = ((units * (2 * STAT_BITS)) & 31).to(tl.uint32)[:, None, None]
    lo = lo.to(tl.uint32, bitcast=True)
    hi = hi.to(tl.uint32, bitcast=True)
    return (lo >> sh) | ((hi << 1) << (31 - sh))


@triton.jit
def _scaled(step, zp, v, J: tl.constexpr, SB: tl.constexpr, one, SHIFT: tl.constexpr):
    """step * (code J of v - zp), [C, T, R] fp32, as one FMA: the code's field goes under the exponent
    of 1.0 (f = 1 + code * 2**-SB), and step * (code - zp) = A * f - (A + step * zp), A = step * 2**SB."""
    LOW: tl.constexpr = 23 - SB
    FROM: tl.constexpr = J * SB
    if FROM >= LOW:
        t = v >> (FROM - LOW)
    else:
        t = v << (LOW - FROM)
    f = ((t & (((1 << SB) - 1) << LOW)) | one).to(tl.float32, bitcast=True)
    step = step.to(tl.float32)
    a = step * (1 << SB)
    b = -(a + step * zp.to(tl.float32)) - SHIFT
    return a[:, :, None] * f + b[:, :, None]


@triton.jit
def _decode_stats(s_lo, s_hi, z_lo, z_hi, ss0, sz0, ss1, sz1, zs0, zz0, zs1, zz1, units, one,
                  BITS: tl.constexpr, STAT_BITS: tl.constexpr):
    """(s0, zc0, s1, zc1) [C, T, R] fp32: scale and centred zero (z - 2**(BITS-1)) of groups 2u, 2u + 1
    (SpQR §4.1: s = step_s * (code_s - zp_s), z = step_z * (code_z - zp_z) per 16-row block)."""
    OFF: tl.constexpr = 1 << (BITS - 1)
    if STAT_BITS == 16:  # (s0, s1, z0, z1) in the first four
        s0 = s_lo.to(tl.float32)
        zc0 = z_lo.to(tl.float32) - OFF
        s1 = s_hi.to(tl.float32)
        zc1 = z_hi.to(tl.float32) - OFF
    else:
        vs = _window(s_lo, s_hi, units, STAT_BITS)
        vz = _window(z_lo, z_hi, units, STAT_BITS)
        s0 = _scaled(ss0, sz0, vs, 0, STAT_BITS, one, 0)
        s1 = _scaled(ss1, sz1, vs, 1, STAT_BITS, one, 0)
        zc0 = _scaled(zs0, zz0, vz, 0, STAT_BITS, one, OFF)
        zc1 = _scaled(zs1, zz1, vz, 1, STAT_BITS, one, OFF)
    return s0, zc0, s1, zc1


@triton.jit
def _finish_wide(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, offs, ws_stride, pid_k, split, tile, rn, mask,
                 USE_WS: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, SPLIT_P2: tl.constexpr):
    """:func:`effllm_kernels.splitk.finish` (split K in one launch: partials, an arrival counter, the
    last program reduces), with the reduction as one [SPLIT_P2, BN] load: all partials in flight at
    once instead of a loop of dependent L2 round trips at the tail of the launch. The sum is a fixed
    tree over the split index, so the result does not depend on the arrival order."""
    if USE_WS:
        tl.store(ws_ptr + offs + pid_k * ws_stride, out, mask=mask)
        tl.debug_barrier()  # every thread's partial is issued before the (release) arrival
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == split - 1:
            ss = tl.arange(0, SPLIT_P2)
            parts = tl.load(ws_ptr + offs[None, :] + ss[:, None] * ws_stride, mask=(ss < split)[:, None] & mask[None, :],
                            other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
            store_y(tl.sum(parts, axis=0), y_ptr, b_ptr, offs, rn, mask, HAS_BIAS, INTERPRET)
    else:
        store_y(out, y_ptr, b_ptr, offs, rn, mask, HAS_BIAS, INTERPRET)


@triton.jit(do_not_specialize=_VARYING)
def _spqr_gemv16_kernel(
    x_ptr, perm_ptr, qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, stride_xm, G, NBLK, units_per_split, n_units, split, one, NSW, xs_ptr, sx_ptr,
    BITS: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
    BN: tl.constexpr, R: tl.constexpr, C: tl.constexpr, RO: tl.constexpr, XS: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
    PREFETCH: tl.constexpr, INTERPRET: tl.constexpr, DOT_ASM: tl.constexpr, DOT_CONS: tl.constexpr,
    CP: tl.constexpr, SPLIT_P2: tl.constexpr, OUT_FIRST: tl.constexpr, UNROLL: tl.constexpr,
):
    """One program: rows [BN] for activation row ``m`` over units [units_per_split] of K."""
    T: tl.constexpr = BN // R
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    first = pid_n * BN + tl.arange(0, T) * R  # [T]: the first row of each thread's R rows
    rows = first[:, None] + tl.arange(0, R)[None, :]  # [T, R]
    rmask = rows < N
    blk = first // STAT_GROUP  # R divides STAT_GROUP: a thread's rows share one block
    rc = tl.arange(0, C)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([C, T, R], dtype=tl.float32)
    u_begin = pid_k * units_per_split
    u_end = tl.minimum(u_begin + units_per_split, n_units)
    row0 = m * n_units
    units = u_begin + rc
    umask = units < u_end
    # PREFETCH = d: the loads of step i + d (codes and statistics) go out before the math of step i
    # (register buffers a: step i + 1, b: step i + 2); the first ones before the activation prologue
    if PREFETCH >= 1:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _step_loads(
            qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rows, rmask, blk, N, G, NBLK, NSW, BITS, STAT_BITS)
    if PREFETCH >= 2:
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = _step_loads(
            qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, units + C, units + C < u_end, rows, rmask, blk, N, G, NBLK, NSW, BITS, STAT_BITS)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    if HAS_OUTLIERS and OUT_FIRST:  # their dependent loads overlap the first steps' loads in flight
        outl = _outlier_rows(x_row, perm_ptr, rp_ptr, oc_ptr, ov_ptr, rn, N, pid_k, split, RO, HAS_PERM)
    _x_to_scratch(x_row, perm_ptr, xs_ptr, sx_ptr, row0, u_begin, u_end, K, XS, BITS, HAS_PERM, CP)
    for u0 in tl.range(u_begin, u_end, C, loop_unroll_factor=UNROLL):
        units = u0 + rc
        umask = units < u_end
        if PREFETCH >= 1:
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15
        if PREFETCH == 1:
            nu = units + C
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _step_loads(
                qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, nu, nu < u_end, rows, rmask, blk, N, G, NBLK, NSW, BITS, STAT_BITS)
        elif PREFETCH == 2:
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15
            nu = units + 2 * C
            b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = _step_loads(
                qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, nu, nu < u_end, rows, rmask, blk, N, G, NBLK, NSW, BITS, STAT_BITS)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = _step_loads(
                qw_ptr, sq_ptr, zq_ptr, sst_ptr, zst_ptr, units, umask, rows, rmask, blk, N, G, NBLK, NSW, BITS, STAT_BITS)
        x, sx0, sx1 = _x_pairs(xs_ptr, sx_ptr, row0, units, umask)
        s0, zc0, s1, zc1 = _decode_stats(c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, units, one,
                                         BITS, STAT_BITS)
        if INTERPRET:
            p0, p1 = _emulated_sums(c0, c1, c2, c3, x, BITS)
        else:
            p0, p1 = _asm_sums(c0, c1, c2, c3, x, DOT_ASM, DOT_CONS)
        acc += s0 * (p0 - zc0 * sx0[:, None, None])  # two FMA chains, no separate add
        acc += s1 * (p1 - zc1 * sx1[:, None, None])
    out = tl.reshape(tl.sum(acc, axis=0), [BN]) * (1.0 / XS)
    if HAS_OUTLIERS and OUT_FIRST:
        out += outl
    elif HAS_OUTLIERS:
        out += _outlier_rows(x_row, perm_ptr, rp_ptr, oc_ptr, ov_ptr, rn, N, pid_k, split, RO, HAS_PERM)
    _finish_wide(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, m * N + rn, M * N, pid_k, split,
                 m * tl.num_programs(1) + pid_n, rn, n_mask, USE_WS, HAS_BIAS, INTERPRET, SPLIT_P2)
