"""Triton device functions that decode the prepared ``rtn`` layout (see ``prepare.py``).

A code ``q`` is never converted int -> float (that runs at a quarter of the FMA rate): its bits are
placed under the mantissa of a float with a fixed exponent, which reads ``F0 + q * FS`` exactly
(``prepare.field_float``); the group coefficients absorb F0 and FS.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def group_coeffs(c_ptr, k0, N, n_groups, rn, n_mask, GROUP: tl.constexpr):
    """fp32 (cs, zcs) [BN] of the group holding code ``k0``, for rows ``rn``; 0 past the last group."""
    g = k0 // GROUP
    mask = n_mask & ((rn * 0 + g) < n_groups)  # chunks past K (padding) read nothing and weigh zero
    cs = tl.load(c_ptr + g * N + rn, mask=mask, other=0.0)
    zcs = tl.load(c_ptr + (n_groups + g) * N + rn, mask=mask, other=0.0)
    return cs, zcs


@triton.jit
def _prmt_byte(t, magic, BYTE: tl.constexpr):
    """One PRMT: byte ``BYTE`` of ``t`` into bits 16..23 under ``magic``'s top byte, zeros below.

    With ``magic`` (0x3F000000) opaque, ptxas encodes the selector as the immediate instead of
    re-materialising it in a register for every PRMT.
    """
    if BYTE == 0:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7054;"
    elif BYTE == 1:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7154;"
    elif BYTE == 2:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7254;"
    else:
        asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7354;"
    return tl.inline_asm_elementwise(asm, "=r,r,r", [t, tl.zeros_like(t) + magic], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def nibbles(words, BITS: tl.constexpr, FAST: tl.constexpr):
    """For the FAST 4-bit decode: even and odd nibbles of each word, one per byte (else unused)."""
    nib_even = words
    nib_odd = words
    if FAST and BITS == 4:
        nib_even = words & 0x0F0F0F0F
        nib_odd = (words >> 4) & 0x0F0F0F0F
    return nib_even, nib_odd


@triton.jit
def field_f32(words, nib_even, nib_odd, magic, J: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
    """Bit field ``J`` of ``words`` [BN, KC] as fp32 ``F0 + q / 256``.

    4-bit: bits 16..19 under ``magic`` = 0x3F000000 (F0 = 0.5); with FAST one PRMT from the nibble
    words (GPU only: inline PTX). 8-bit: bits 15..22 under ``magic`` = 0x3F800000 (F0 = 1). The
    exponent comes as a kernel argument so that ptxas keeps it in a register.
    """
    if FAST and BITS == 4:
        if J % 2 == 0:
            v = _prmt_byte(nib_even, magic, J // 2)
        else:
            v = _prmt_byte(nib_odd, magic, J // 2)
    else:
        LOW: tl.constexpr = 16 if BITS == 4 else 15
        SHIFT: tl.constexpr = LOW - J * BITS
        if SHIFT >= 0:
            v = words << SHIFT
        else:
            v = words >> (-SHIFT)
        v = (v & (((1 << BITS) - 1) << LOW)) | magic
    return v.to(tl.float32, bitcast=True)


@triton.jit
def unit_f32(words, nib_even, nib_odd, magic, U: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
    """Unit ``U`` of ``words`` [BN, KC] as fp32 ``F0 + q / 256``, [BN, USPAN] in code order."""
    if BITS == 4:  # nibbles U and U + 4 are the even and odd codes: interleave them
        lo = field_f32(words, nib_even, nib_odd, magic, U, BITS, FAST)
        hi = field_f32(words, nib_even, nib_odd, magic, U + 4, BITS, FAST)
        out = tl.reshape(tl.join(lo, hi), (words.shape[0], 2 * words.shape[1]))
    else:
        out = field_f32(words, nib_even, nib_odd, magic, U, BITS, FAST)
    return out


@triton.jit
def unit_pair16(words, magic, U: tl.constexpr, DT: tl.constexpr):
    """4-bit unit ``U`` of ``words`` [BN, KC] as [BN, 2KC] ``DT`` (bf16 or fp16) ``0.5 + q / 256``.

    One shift and one LOP3 give two values: nibbles U (bits 4U..) and U + 4 (bits 16 + 4U..) land
    in the mantissas of the two 16-bit halves, under bf16 0x3F00 (low mantissa bits) or fp16
    0x3800 (mantissa bits 3..6). ``magic`` is the 0x3F003F00 / 0x38003800 pair, a kernel argument
    so that the LOP3 takes it from a register instead of a re-materialised constant.
    """
    if DT == tl.bfloat16:
        v = ((words >> (4 * U)) & 0x000F000F) | magic
    else:
        SHIFT: tl.constexpr = 3 - 4 * U
        if SHIFT >= 0:
            v = words << SHIFT
        else:
            v = words >> (-SHIFT)
        v = (v & 0x00780078) | magic
    lo = v.to(tl.int16).to(DT, bitcast=True)
    hi = (v >> 16).to(tl.int16).to(DT, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (words.shape[0], 2 * words.shape[1]))
