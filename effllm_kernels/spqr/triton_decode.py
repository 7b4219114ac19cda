"""Triton device functions shared by the ``spqr`` kernels: decoding a unit of 32 codes, outliers.

Codes: every row of the stored format is a dense LSB-first bit stream (:mod:`effllm_kernels.packing`),
so 32 codes of ``BITS`` bits fill exactly ``BITS`` int32 words, word-aligned: the kernels walk K in
*units* of 32 codes, and the repacked layout (:mod:`.repack`) keeps the ``BITS`` words of a unit as
they are. Code ``J`` of a unit sits at the compile-time bit position ``J*BITS``, so it is decoded
with one shift and one AND-OR (two shifts more for codes straddling two words) (:func:`_code`;
3-bit units are stored *paired*, :func:`_code_paired`);
the ``_t*`` helpers join the 32 decoded tiles (``tl.join``, in registers) into a tile whose last
axis is the natural K order of the unit.

A code ``q`` is never converted int -> float: its bits go to the top of an fp32 mantissa under the
exponent of 1.0, which reads ``f = 1 + q * 2**-BITS`` exactly. With ``W = s * (q - z)`` (paper
§4.1, the first-level grid) this is ``W = cs * f - zcs`` with ``cs = s * 2**BITS`` and
``zcs = s * (2**BITS + z)`` (``triton_tiles.tile_coeffs``).
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
def _code(w0, w1, w2, w3, w4, w5, w6, w7, one, J: tl.constexpr, BITS: tl.constexpr):
    """Code ``J`` of every (row, unit) as fp32 ``1 + q * 2**-BITS`` (words are uint32).

    ``one`` is 0x3F800000 (the bits of 1.0) passed as a kernel argument, so that ptxas keeps it in
    a register and the AND-OR is one LOP3 with the field mask as its immediate (a literal would be
    re-materialised before every LOP3).
    """
    LOW: tl.constexpr = 23 - BITS  # the field goes to mantissa bits [LOW, 23)
    FIELD: tl.constexpr = ((1 << BITS) - 1) << LOW
    if BITS == 3:  # paired units (repack.paired_position)
        f = _code_paired(w0, w1, w2, one, J, LOW)
    else:
        FIRST: tl.constexpr = J * BITS
        WI: tl.constexpr = FIRST // 32
        START: tl.constexpr = FIRST % 32
        w = _word(w0, w1, w2, w3, w4, w5, w6, w7, WI)
        D: tl.constexpr = START - LOW
        if D >= 0:
            v = w >> D
        else:
            v = w << (-D)
        if START + BITS > 32:  # straddles: the top bits come from the next word's bottom
            v = v | (_word(w0, w1, w2, w3, w4, w5, w6, w7, WI + 1) << (32 - START + LOW))
        v = (v & FIELD) | one
        f = v.to(tl.float32, bitcast=True)
    return f


@triton.jit
def _shift_to(w, FROM: tl.constexpr, TO: tl.constexpr):
    """``w`` shifted so that bit FROM lands at bit TO (compile-time)."""
    if FROM >= TO:
        v = w >> (FROM - TO)
    else:
        v = w << (TO - FROM)
    return v


@triton.jit
def _code_paired(w0, w1, w2, one, J: tl.constexpr, LOW: tl.constexpr):
    """Code ``J`` of a paired 3-bit unit (:func:`effllm_kernels.spqr.repack.paired_position`) as fp32
    ``1 + q / 8``: pairs 0..14 are one field of one word, pair 15 gathers one bit from each word."""
    P: tl.constexpr = J // 2
    HALF: tl.constexpr = J % 2
    if P < 15:
        WI: tl.constexpr = P // 5
        START: tl.constexpr = 16 * HALF + 3 * (P % 5)
        w = _word(w0, w1, w2, w0, w0, w0, w0, w0, WI)
        v = _shift_to(w, START, LOW) & (7 << LOW)
    else:
        SPARE: tl.constexpr = 15 + 16 * HALF
        v = ((_shift_to(w0, SPARE, LOW) & (1 << LOW)) | (_shift_to(w1, SPARE, LOW + 1) & (2 << LOW))
             | (_shift_to(w2, SPARE, LOW + 2) & (4 << LOW)))
    return (v | one).to(tl.float32, bitcast=True)


@triton.jit
def code_tree(w0, w1, w2, w3, w4, w5, w6, w7, one, J: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr):
    """Codes ``J + sum_d b_d * (32 >> d)`` (b_d in {0, 1}) of a unit as fp32 ``1 + q / 2**BITS``,
    joined into D trailing axes of size 2 (the last axis steps by ``32 >> D``): with J = 0 and D = 5,
    the unit's 32 codes with code j at bits (j % 2, (j // 2) % 2, ...) read last axis first. The
    recursion unrolls at compile time."""
    if D == 0:
        return _code(w0, w1, w2, w3, w4, w5, w6, w7, one, J, BITS)
    else:
        STEP: tl.constexpr = 32 >> D
        return tl.join(code_tree(w0, w1, w2, w3, w4, w5, w6, w7, one, J, BITS, D - 1),
                       code_tree(w0, w1, w2, w3, w4, w5, w6, w7, one, J + STEP, BITS, D - 1))


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


@triton.jit
def mma_tile(N, M, units_per_split, n_units, BN: tl.constexpr, BM: tl.constexpr):
    """The tensor-core kernels' program tile on grid (row blocks, K splits, activation blocks):
    (pid_n, pid_k, pid_m, rows rn [BN], activation rows rm [BM], n_mask, m_mask, and the units
    [u_begin, u_end) of K this split walks)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    u_begin = pid_k * units_per_split
    u_end = tl.minimum(u_begin + units_per_split, n_units)
    return pid_n, pid_k, pid_m, rn, rm, rn < N, rm < M, u_begin, u_end


@triton.jit
def mma_outliers(x_ptr, stride_xk, perm_ptr, rp_ptr, oc_ptr, ov_ptr, rn, rm, m_mask, N, pid_k, split,
                 R: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """The tensor-core kernels' outlier products [BN, BM] (fp32): this K split's share of each row's
    CSR entries, R at a time, against x in stored column order ([K, M], column ``rm``)."""
    start, end, most = outlier_span(rp_ptr, rn, N)
    oacc = tl.zeros([BN, BM], dtype=tl.float32)
    for j0 in range(pid_k * R, most, R * split):
        col, val, om = outlier_slots(oc_ptr, ov_ptr, perm_ptr, start, end, j0, R, False)
        xo = tl.load(x_ptr + col[:, :, None] * stride_xk + rm[None, None, :],
                     mask=om[:, :, None] & m_mask[None, None, :], other=0.0).to(tl.float32)  # [BN, R, BM]
        oacc += tl.sum(val[:, :, None] * xo, axis=1)
    return oacc
