"""Triton device functions that read the repacked ``spqr`` layout (:mod:`.repack`) as [C, BN] tiles.

A tile is C units (32 codes each) of K by BN neighbouring output rows. Words, statistics codes and
second-level statistics of neighbouring rows are contiguous in the repacked layout, so every load
of a tile is a row-contiguous (vectorisable) load, and everything that depends on the unit alone
(the bit position of a code, the group, the shift of a statistics code) is the same for all rows.

Codes decode as in :mod:`.triton_decode` (``_code``: the field goes under the exponent of 1.0, so
``f = 1 + q * 2**-BITS``) and ``W = cs * f - zcs`` with the coefficients of :func:`tile_coeffs`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _word(qw_ptr, offs, mask, WI: tl.constexpr, BITS: tl.constexpr, N, fill):
    """Word plane ``WI`` of the tile as uint32 (``fill`` for planes a unit does not have)."""
    if WI >= BITS:
        return fill
    w = tl.load(qw_ptr + offs + WI * N, mask=mask, other=0, eviction_policy="evict_first")
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def tile_words(qw_ptr, units, rn, mask, N, BITS: tl.constexpr):
    """The BITS words of each (unit, row) of the tile, each uint32 [C, BN] (unused planes repeat w0)."""
    offs = (units * BITS)[:, None] * N + rn[None, :]
    w0 = _word(qw_ptr, offs, mask, 0, BITS, N, 0)
    w1 = _word(qw_ptr, offs, mask, 1, BITS, N, w0)
    w2 = _word(qw_ptr, offs, mask, 2, BITS, N, w0)
    w3 = _word(qw_ptr, offs, mask, 3, BITS, N, w0)
    w4 = _word(qw_ptr, offs, mask, 4, BITS, N, w0)
    w5 = _word(qw_ptr, offs, mask, 5, BITS, N, w0)
    w6 = _word(qw_ptr, offs, mask, 6, BITS, N, w0)
    w7 = _word(qw_ptr, offs, mask, 7, BITS, N, w0)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _stat_code(q_ptr, g, mask, rn, N, STAT_BITS: tl.constexpr):
    """The STAT_BITS-bit statistics codes of groups ``g`` [C] for rows ``rn`` [BN] -> fp32 [C, BN].

    The bit position depends on the group only: one shift per unit for all rows; a code straddling
    two words (3-bit statistics) reads the second word where it must.
    """
    bit = g * STAT_BITS
    wi = bit >> 5
    sh = (bit & 31).to(tl.uint32)[:, None]
    p = q_ptr + wi[:, None] * N + rn[None, :]
    code = tl.load(p, mask=mask, other=0).to(tl.uint32, bitcast=True) >> sh
    if 32 % STAT_BITS != 0:
        hi = tl.load(p + N, mask=mask & (sh > 32 - STAT_BITS), other=0).to(tl.uint32, bitcast=True)
        code = code | ((hi << 1) << (31 - sh))
    return (code & ((1 << STAT_BITS) - 1)).to(tl.float32)


@triton.jit
def tile_coeffs(sq_ptr, zq_ptr, sst_ptr, zst_ptr, g, gmask, rn, n_mask, N, NBLK,
                BITS: tl.constexpr, STAT_BITS: tl.constexpr, STAT_GROUP: tl.constexpr):
    """fp32 (cs, zcs) [C, BN] of groups ``g`` [C] for rows ``rn`` [BN]; 0 where masked.

    Second-level dequantization (SpQR §4.1, "bilevel quantization"), per block b = n // STAT_GROUP:
    ``s = step_s[g, b] * (code_s[n, g] - zp_s[g, b])``, ``z = step_z * (code_z - zp_z)``; then
    ``W = s * (q - z) = cs * f - zcs`` with ``cs = s * 2**BITS``, ``zcs = s * (z + 2**BITS)``.
    """
    mask = gmask[:, None] & n_mask[None, :]
    if STAT_BITS == 16:
        off = g[:, None] * N + rn[None, :]
        s = tl.load(sq_ptr + off, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zq_ptr + off, mask=mask, other=0.0).to(tl.float32)
    else:
        off = (g * 2)[:, None] * NBLK + (rn // STAT_GROUP)[None, :]
        s_step = tl.load(sst_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s_zp = tl.load(sst_ptr + off + NBLK, mask=mask, other=0.0).to(tl.float32)
        z_step = tl.load(zst_ptr + off, mask=mask, other=0.0).to(tl.float32)
        z_zp = tl.load(zst_ptr + off + NBLK, mask=mask, other=0.0).to(tl.float32)
        s = s_step * (_stat_code(sq_ptr, g, mask, rn, N, STAT_BITS) - s_zp)
        z = z_step * (_stat_code(zq_ptr, g, mask, rn, N, STAT_BITS) - z_zp)
    TWO_B: tl.constexpr = 1 << BITS
    return s * TWO_B, s * (z + TWO_B)


@triton.jit
def x_at(x_row, perm_ptr, k, kmask, HAS_PERM: tl.constexpr, EVEN: tl.constexpr):
    """Activations at stored columns ``k`` (any shape): x[perm[k]] (act order), 0 where masked, fp32."""
    if EVEN:
        if HAS_PERM:
            k = tl.load(perm_ptr + k)
        return tl.load(x_row + k).to(tl.float32)
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=kmask, other=0)
    return tl.load(x_row + k, mask=kmask, other=0.0).to(tl.float32)
