"""The PTX of the fp16x2 GEMV's inner loop (:mod:`.triton_gemv16`): one 32-code unit of one row.

A unit of ``bits``-bit codes (2, 3 or 4) is ``bits`` words; in the kernel layout (:mod:`.repack`)
every word holds *pairs*: code ``a`` at bits ``[s, s + bits)`` and its partner ``b`` (same group of
16) at ``[16 + s, 16 + s + bits)``. One LOP3 with the fp16 exponent of 1024 (0x6400) turns a pair
into the fp16x2 ``(1024 + q_a * 2**s, 1024 + q_b * 2**s)`` (exact while ``s + bits <= 10``; fields
higher up are first shifted down once per word), one ``fma.rn.f16x2`` by ``(2**-s, -(1024 / 2**s
+ 2**(bits-1)))`` makes it the exact centred pair ``q - 2**(bits-1)`` and a second one accumulates
``(q - 2**(bits-1)) * x``. Each group of 16 codes is two chains of 8 fp16 FMAs (the two halves),
added in fp32 at the end: 3 instructions per two weights instead of 3 per weight in fp32.

Precision: the codes are centred (|q - 2**(bits-1)| <= 2**(bits-1)) and the activations come in
as fp16, scaled by a power of two (bf16 activations: 2**-8, so sums cannot overflow); a chain of 8
fp16 FMAs adds ~0.2x the error of rounding W to bf16 (``scripts``-free numpy model in the test).

:func:`pair_layout` is the pair table both the PTX and the Triton emulation (interpreter) follow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

MAGIC = 0x6400  # fp16 1024.0: a field in mantissa bits [0, 10) reads 1024 + field
#: The scale that takes bf16 activations into fp16 for this arithmetic (a power of two, exact; bf16 values
#: up to ~2e5 keep the fp16 group sums finite; the kernels undo it once per row in fp32).
BF16_SCALE = 2.0**-8
LUT_AND_OR = 0xEA  # lop3: (a & b) | c


def _pairs_per_word(bits: int) -> int:
    return 5 if bits == 3 else 16 // bits


def _direct_slots(bits: int) -> int:
    """Pair slots of a word usable without a shift (field inside the fp16 mantissa: s + bits <= 10)."""
    return (10 - bits) // bits + 1


def pair_layout(bits: int) -> list[tuple[int, int, int, int]]:
    """For pairs p = 0..15: (code a, code b, word, field offset s in the low half); b = a's partner.

    Pairs 0..7 hold codes of the unit's first group of 16, pairs 8..15 of the second. 3-bit pair 15
    (codes 30, 31) is the exception: one bit per word at bit 15 / 31; its word and offset are -1.
    """
    out = []
    pw = _pairs_per_word(bits)
    for p in range(16):
        if bits == 3:
            out.append((2 * p, 2 * p + 1, p // 5, 3 * (p % 5)) if p < 15 else (30, 31, -1, -1))
        else:
            a = (p // pw) * 2 * pw + p % pw
            out.append((a, a + pw, p // pw, bits * (p % pw)))
    return out


def _f16x2(value: float) -> int:
    h = int(np.float16(value).view(np.uint16))
    return h | (h << 16)


def _centred_pair(bits: int, slot: tuple, words: list[str], shift: int) -> list[str]:
    """PTX putting pair ``slot`` of :func:`pair_layout` into ``q`` as the fp16x2 ``(a, b) - 2**(bits-1)``
    (exact): one LOP3 into the mantissa of 1024 (two for bits past 10, via ``h<w>``, the word shifted
    by ``shift``), then one fp16x2 add or FMA that removes the exponent's 1024 and centres."""
    off = 1 << (bits - 1)
    _, _, w, s = slot
    if w < 0:  # 3-bit pair 15: bit b of each code from word b, bit 15 / 31
        lines = [f"shr.u32 t, {words[0]}, 15;", "mov.b32 m, 0x00010001;", "lop3.b32 q, t, m, mg, 0xEA;",
                 f"shr.u32 t, {words[1]}, 14;", "mov.b32 m, 0x00020002;", "lop3.b32 q, t, m, q, 0xEA;",
                 f"shr.u32 t, {words[2]}, 13;", "mov.b32 m, 0x00040004;", "lop3.b32 q, t, m, q, 0xEA;"]
        s = 0
    else:
        src = words[w]
        if s + bits > 10:
            src, s = f"h{w}", s - shift
        field = ((1 << bits) - 1) << s
        lines = [f"mov.b32 m, {field | field << 16:#x};", f"lop3.b32 q, {src}, m, mg, {LUT_AND_OR:#x};"]
    lines.append(f"mov.b32 bi, {_f16x2(-(1024 / 2**s + off)):#x};")
    if s == 0:
        lines.append("add.rn.f16x2 q, q, bi;")
    else:
        lines += [f"mov.b32 sc, {_f16x2(2.0**-s):#x};", "fma.rn.f16x2 q, q, sc, bi;"]
    return lines


@functools.cache
def dot_asm(bits: int) -> tuple[str, str]:
    """(PTX, constraints) of ``inline_asm_elementwise`` for one (row, unit).

    Operands: $0, $1 the fp32 bits of the group sums (pairs 0..7, 8..15); $2..$5 the unit's words
    (unused ones repeat $2); $6..$21 the activation pairs (fp16x2, in pair order).
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"the fp16x2 GEMV takes 2-, 3- or 4-bit codes, not {bits}")
    shift = bits * _direct_slots(bits)  # the first field that needs a shift
    lines = ["{", ".reg .b32 q, t, a0, a1, mg, m, sc, bi, h0, h1, h2, h3;", ".reg .b16 lo, hi;",
             ".reg .f32 f0, f1;", f"mov.b32 mg, {MAGIC | MAGIC << 16:#x};"]
    words = [f"${2 + w}" for w in range(4)]
    for w in range(bits):
        lines.append(f"shr.u32 h{w}, {words[w]}, {shift};")
    for p, slot in enumerate(pair_layout(bits)):
        acc = f"a{p // 8}"
        lines += _centred_pair(bits, slot, words, shift)
        if p % 8 == 0:  # a group's first pair starts its chains
            lines.append(f"mul.rn.f16x2 {acc}, q, ${6 + p};")
        else:
            lines.append(f"fma.rn.f16x2 {acc}, q, ${6 + p}, {acc};")
    for g in range(2):
        lines += [f"mov.b32 {{lo, hi}}, a{g};", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;", "add.f32 f0, f0, f1;",
                  f"mov.b32 ${g}, f0;"]
    lines.append("}")
    return "\n".join(lines), ",".join(["=r", "=r"] + ["r"] * 20)


#: Operand numbers of :func:`decode_asm`: 32 fp16 outputs, then the words, then the statistics.
DECODE_WORDS = 32
DECODE_STATS = 36


@functools.cache
def decode_asm(bits: int) -> tuple[str, str]:
    """(PTX, constraints) of ``inline_asm_elementwise`` decoding one (row, unit) to 32 fp16 weights.

    For the fp16 tensor-core kernel (:mod:`.triton_mma16`). Operands: $0..$31 the fp16 weights in
    pair order (``$2p`` / ``$2p + 1``: codes a / b of pair p of :func:`pair_layout`); $32..$35 the
    unit's words (unused ones repeat $32); $36..$39 the fp32 bits of (s0, nb0, s1, nb1), the scale
    and ``-s * (z - 2**(bits-1))`` of the unit's two groups. Per pair: the LOP3 of :func:`dot_asm`, the
    exact centring ``q - 2**(bits-1)`` (one fp16x2 add or FMA) and ``w = s * q_c + nb`` (one fp16x2
    FMA): 3 instructions per two weights; per group one ``cvt.rn.f16x2.f32`` for each of s, nb.
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"the fp16 pair decode takes 2-, 3- or 4-bit codes, not {bits}")
    shift = bits * _direct_slots(bits)
    w_ops = [f"${DECODE_WORDS + w}" for w in range(4)]
    st = [f"${DECODE_STATS + i}" for i in range(4)]
    lines = ["{", ".reg .b32 q, t, mg, m, sc, bi, h0, h1, h2, h3, s0, n0, s1, n1;",
             f"mov.b32 mg, {MAGIC | MAGIC << 16:#x};",
             f"cvt.rn.f16x2.f32 s0, {st[0]}, {st[0]};", f"cvt.rn.f16x2.f32 n0, {st[1]}, {st[1]};",
             f"cvt.rn.f16x2.f32 s1, {st[2]}, {st[2]};", f"cvt.rn.f16x2.f32 n1, {st[3]}, {st[3]};"]
    for w in range(bits):
        lines.append(f"shr.u32 h{w}, {w_ops[w]}, {shift};")
    for p, slot in enumerate(pair_layout(bits)):
        lines += _centred_pair(bits, slot, w_ops, shift)
        g = p // 8
        lines += [f"fma.rn.f16x2 q, q, s{g}, n{g};", f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, q;"]
    lines.append("}")
    return "\n".join(lines), ",".join(["=h"] * 32 + ["r"] * 8)


def _halves(v: int) -> tuple[float, float]:
    return float(np.uint16(v & 0xFFFF).view(np.float16)), float(np.uint16(v >> 16).view(np.float16))


def _pack(lo: float, hi: float) -> int:
    return int(np.float16(lo).view(np.uint16)) | int(np.float16(hi).view(np.uint16)) << 16


def _run_ptx(asm: str, regs: dict[str, int], special: Callable[[str, str], bool]) -> dict[str, int]:
    """Execute the generators' PTX subset on ``regs`` (32-bit ints by register name) with numpy, for
    the tests; ``special(op, operands)`` takes the lines it knows (returns True). fp16x2 math rounds
    like the hardware: the fused multiply-add is exact in float64, then rounded once to fp16."""

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if special(op, rest):
            continue
        args = [a.strip() for a in rest.split(",")]
        d = args[0]
        if op == "mov.b32":
            regs[d] = val(args[1])
        elif op == "cvt.rn.f16x2.f32":
            f = float(np.uint32(val(args[1])).view(np.float32))
            regs[d] = _pack(f, f)
        elif op == "shr.u32":
            regs[d] = val(args[1]) >> val(args[2])
        elif op == "lop3.b32":
            regs[d] = (val(args[1]) & val(args[2])) | val(args[3])
        elif op in ("add.rn.f16x2", "mul.rn.f16x2", "fma.rn.f16x2"):
            a, b = _halves(val(args[1])), _halves(val(args[2]))
            if op == "add.rn.f16x2":
                regs[d] = _pack(a[0] + b[0], a[1] + b[1])
            elif op == "mul.rn.f16x2":
                regs[d] = _pack(a[0] * b[0], a[1] * b[1])
            else:
                c = _halves(val(args[3]))
                regs[d] = _pack(a[0] * b[0] + c[0], a[1] * b[1] + c[1])
        else:
            raise ValueError(f"PTX emulation: unknown instruction {op}")
    return regs


def emulate_decode(asm: str, operands: list[int]) -> list[float]:
    """Run the PTX of :func:`decode_asm` with numpy (tests): operands $32..$39 as int bit patterns
    (words, then the fp32 bits of s0, nb0, s1, nb1) -> the 32 fp16 outputs as floats."""
    regs: dict[str, int] = {f"${DECODE_WORDS + i}": v & 0xFFFFFFFF for i, v in enumerate(operands)}
    outs: dict[int, float] = {}

    def outputs(op: str, rest: str) -> bool:  # mov.b32 {$a, $b}, q: the pair's two fp16 outputs
        if op != "mov.b32" or not rest.startswith("{"):
            return False
        lo_hi, src = rest.split("},")
        a, b = (int(t.strip().lstrip("{$")) for t in lo_hi.split(","))
        outs[a], outs[b] = _halves(regs[src.strip()])
        return True

    _run_ptx(asm, regs, outputs)
    return [outs[i] for i in range(32)]


def emulate(asm: str, operands: list[int]) -> list[float]:
    """Run the PTX of :func:`dot_asm` on scalar operands with numpy (tests): -> [$0, $1] as floats
    (the fp32 sums of the two fp16x2 accumulators, as the epilogue's cvt / add compute them)."""
    regs: dict[str, int] = {f"${i}": v & 0xFFFFFFFF for i, v in enumerate(operands)}

    def epilogue(op: str, rest: str) -> bool:  # the fp32 conversion and sums: computed below
        return (op == "mov.b32" and (rest.startswith("{") or rest.split(",")[1].strip().startswith("f"))) or op in (
            "cvt.f32.f16", "add.f32")

    _run_ptx(asm, regs, epilogue)
    out = []
    for g in range(2):
        lo, hi = _halves(regs[f"a{g}"])
        out.append(float(np.float32(lo) + np.float32(hi)))
    return out


__all__ = ["BF16_SCALE", "decode_asm", "dot_asm", "emulate", "emulate_decode", "pair_layout"]
