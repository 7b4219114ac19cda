"""Triton device functions that read the stored ``spqr`` layout directly (no repacking).

Codes: every row is a dense LSB-first bit stream (:mod:`effllm_kernels.packing`), so 32 codes of
``BITS`` bits fill exactly ``BITS`` int32 words, word-aligned: the kernels walk K in *units* of 32
codes. A program loads the ``BITS`` words of each (row, unit) of its [BN, C] tile once
(:func:`unit_codes`); code ``J`` of a unit sits at the compile-time bit position ``J*BITS``, so it
is decoded with one shift, one AND and one OR (two shifts more for codes straddling two words), and
the 32 decoded [BN, C] slices are joined (``tl.join``, in registers) into a [BN, C, 32] tile whose
last axis is the natural K order of the unit: the tile then meets activations loaded as [C, 32]
(GEMV) or is reshaped to a [BN, 32*C] ``tl.dot`` operand (tensor cores).

A code ``q`` is never converted int -> float: its bits go to the top of an fp32 mantissa under the
exponent of 1.0, which reads ``f = 1 + q * 2**-BITS`` exactly. With ``W = s * (q - z)`` (paper
§4.1, the first-level grid) this is ``W = cs * f - zcs`` with ``cs = s * 2**BITS`` and
``zcs = s * (2**BITS + z)`` (:func:`group_coeffs`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _word(w0, w1, w2, w3, w4, w5, w6, w7, WI: tl.constexpr):
    """Word ``WI`` (compile-time) of a unit."""
    if WI == 0:
        return w0
    elif WI == 1:
        return w1
    elif WI == 2:
        return w2
    elif WI == 3:
        return w3
    elif WI == 4:
        return w4
    elif WI == 5:
        return w5
    elif WI == 6:
        return w6
    else:
        return w7


@triton.jit
def _code(w0, w1, w2, w3, w4, w5, w6, w7, J: tl.constexpr, BITS: tl.constexpr):
    """Code ``J`` of every (row, unit) as fp32 ``1 + q * 2**-BITS`` (words are uint32)."""
    FIRST: tl.constexpr = J * BITS
    WI: tl.constexpr = FIRST // 32
    START: tl.constexpr = FIRST % 32
    LOW: tl.constexpr = 23 - BITS  # the field goes to mantissa bits [LOW, 23)
    FIELD: tl.constexpr = ((1 << BITS) - 1) << LOW
    w = _word(w0, w1, w2, w3, w4, w5, w6, w7, WI)
    D: tl.constexpr = START - LOW
    if D >= 0:
        v = w >> D
    else:
        v = w << (-D)
    if START + BITS > 32:  # straddles: the top bits come from the next word's bottom
        v = v | (_word(w0, w1, w2, w3, w4, w5, w6, w7, WI + 1) << (32 - START + LOW))
    v = (v & FIELD) | 0x3F800000
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _t1(w0, w1, w2, w3, w4, w5, w6, w7, J: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_code(w0, w1, w2, w3, w4, w5, w6, w7, J, BITS),
                   _code(w0, w1, w2, w3, w4, w5, w6, w7, J + 16, BITS))


@triton.jit
def _t2(w0, w1, w2, w3, w4, w5, w6, w7, J: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_t1(w0, w1, w2, w3, w4, w5, w6, w7, J, BITS), _t1(w0, w1, w2, w3, w4, w5, w6, w7, J + 8, BITS))


@triton.jit
def _t3(w0, w1, w2, w3, w4, w5, w6, w7, J: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_t2(w0, w1, w2, w3, w4, w5, w6, w7, J, BITS), _t2(w0, w1, w2, w3, w4, w5, w6, w7, J + 4, BITS))


@triton.jit
def _t4(w0, w1, w2, w3, w4, w5, w6, w7, J: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_t3(w0, w1, w2, w3, w4, w5, w6, w7, J, BITS), _t3(w0, w1, w2, w3, w4, w5, w6, w7, J + 2, BITS))


@triton.jit
def _load_word(p, base, W_ROW, WI: tl.constexpr, BITS: tl.constexpr, EVEN: tl.constexpr, fill):
    """Word ``WI`` of each (row, unit) as uint32; ``fill`` for the words a unit does not have."""
    if WI >= BITS:
        return fill
    if EVEN:
        w = tl.load(p + WI, eviction_policy="evict_first")
    else:
        w = tl.load(p + WI, mask=base + WI < W_ROW, other=0, eviction_policy="evict_first")
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def unit_codes(qw_ptr, rows, units, W_ROW, BITS: tl.constexpr, EVEN: tl.constexpr):
    """Codes of units ``units`` [C] of rows ``rows`` [BN] (valid rows) -> fp32 [BN, C, 32] ``1 + q/2**BITS``.

    Element [n, u, j] is code ``units[u] * 32 + j`` of row ``rows[n]``. Without EVEN, words past the
    row's end read as zero (their codes meet zero activations and zero statistics).
    """
    base = (units * BITS)[None, :]
    p = qw_ptr + rows[:, None] * W_ROW + base
    w0 = _load_word(p, base, W_ROW, 0, BITS, EVEN, 0)
    w1 = _load_word(p, base, W_ROW, 1, BITS, EVEN, w0)
    w2 = _load_word(p, base, W_ROW, 2, BITS, EVEN, w0)
    w3 = _load_word(p, base, W_ROW, 3, BITS, EVEN, w0)
    w4 = _load_word(p, base, W_ROW, 4, BITS, EVEN, w0)
    w5 = _load_word(p, base, W_ROW, 5, BITS, EVEN, w0)
    w6 = _load_word(p, base, W_ROW, 6, BITS, EVEN, w0)
    w7 = _load_word(p, base, W_ROW, 7, BITS, EVEN, w0)
    t = tl.join(_t4(w0, w1, w2, w3, w4, w5, w6, w7, 0, BITS), _t4(w0, w1, w2, w3, w4, w5, w6, w7, 1, BITS))
    C: tl.constexpr = units.shape[0]
    BN: tl.constexpr = rows.shape[0]
    return tl.reshape(t, [BN, C, 32])


@triton.jit
def _stat_codes(q_ptr, rows, g, gmask, S_ROW, STAT_BITS: tl.constexpr):
    """The ``STAT_BITS``-bit codes of groups ``g`` [1, C, NG] for ``rows`` [BN, 1, 1] -> fp32 [BN, C, NG].

    A code may straddle two words (3-bit statistics): the second word is read only where it must be.
    """
    bit = g * STAT_BITS
    wi = bit >> 5
    sh = (bit & 31).to(tl.uint32)
    p = q_ptr + rows * S_ROW + wi
    lo = tl.load(p, mask=gmask, other=0).to(tl.uint32, bitcast=True)
    code = lo >> sh
    if 32 % STAT_BITS != 0:
        hi = tl.load(p + 1, mask=gmask & (sh > 32 - STAT_BITS), other=0).to(tl.uint32, bitcast=True)
        code = code | ((hi << 1) << (31 - sh))
    return (code & ((1 << STAT_BITS) - 1)).to(tl.float32)


@triton.jit
def _second_level(st_ptr, rows, n0, g, gmask, G, STAT_GROUP: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """(step, zero-point) fp32 of the second-level blocks of ``rows`` and groups ``g`` (paper §4.1).

    ONE_BLOCK: the tile's rows (from ``n0``) lie in one block, so one [1, C, NG] read serves all rows.
    """
    if ONE_BLOCK:
        off = ((n0 // STAT_GROUP) * G + g) * 2
    else:
        off = ((rows // STAT_GROUP) * G + g) * 2
    step = tl.load(st_ptr + off, mask=gmask, other=0.0).to(tl.float32)
    zp = tl.load(st_ptr + off + 1, mask=gmask, other=0.0).to(tl.float32)
    return step, zp


@triton.jit
def group_coeffs(sq_ptr, zq_ptr, sst_ptr, zst_ptr, rows, n0, g, gmask, S_ROW, G,
                 BITS: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr,
                 ONE_BLOCK: tl.constexpr):
    """fp32 (cs, zcs) [BN, C, NG] of groups ``g`` [1, C, NG] for ``rows`` [BN, 1, 1]; 0 where ``gmask`` is off.

    Second-level dequantization (paper §4.1 "bilevel quantization"):
    ``s = step_s * (code_s - zp_s)``, ``z = step_z * (code_z - zp_z)`` per block of STAT_GROUP rows;
    with STAT_BITS == 16 the first-level statistics are stored as fp16 [N, G].
    """
    if STAT_BITS == 16:
        off = rows * G + g
        s = tl.load(sq_ptr + off, mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(zq_ptr + off, mask=gmask, other=0.0).to(tl.float32)
    else:
        s_step, s_zp = _second_level(sst_ptr, rows, n0, g, gmask, G, STAT_GROUP, ONE_BLOCK)
        z_step, z_zp = _second_level(zst_ptr, rows, n0, g, gmask, G, STAT_GROUP, ONE_BLOCK)
        s = s_step * (_stat_codes(sq_ptr, rows, g, gmask, S_ROW, STAT_BITS) - s_zp)
        z = z_step * (_stat_codes(zq_ptr, rows, g, gmask, S_ROW, STAT_BITS) - z_zp)
    TWO_B: tl.constexpr = 1 << BITS
    return s * TWO_B, s * (z + TWO_B)


@triton.jit
def gather_x(x_ptr, perm_ptr, row_off, k, K, HAS_PERM: tl.constexpr, EVEN: tl.constexpr):
    """Activations at stored columns ``k`` (any shape): x[perm[k]] (act order), 0 past K, as fp32."""
    if EVEN:
        if HAS_PERM:
            k = tl.load(perm_ptr + k)
        return tl.load(x_ptr + row_off + k).to(tl.float32)
    kmask = k < K
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=kmask, other=0)
    return tl.load(x_ptr + row_off + k, mask=kmask, other=0.0).to(tl.float32)


@triton.jit
def outlier_span(rp_ptr, rn, N):
    """CSR start [BN], end [BN] of rows ``rn`` (empty past N) and the largest row count (scalar)."""
    valid = rn < N
    start = tl.load(rp_ptr + rn, mask=valid, other=0)
    end = tl.load(rp_ptr + rn + 1, mask=valid, other=0)
    return start, end, tl.max(end - start, axis=0)


@triton.jit
def outlier_slots(oc_ptr, ov_ptr, perm_ptr, start, end, j0, R: tl.constexpr, HAS_PERM: tl.constexpr):
    """Outliers ``j0 .. j0+R`` of each row: (x column [BN, R], value fp32 [BN, R], mask [BN, R])."""
    idx = start[:, None] + j0 + tl.arange(0, R)[None, :]
    om = idx < end[:, None]
    col = tl.load(oc_ptr + idx, mask=om, other=0).to(tl.int32) & 0xFFFF  # int16 read as unsigned
    val = tl.load(ov_ptr + idx, mask=om, other=0.0).to(tl.float32)
    if HAS_PERM:
        col = tl.load(perm_ptr + col, mask=om, other=0)
    return col, val, om
