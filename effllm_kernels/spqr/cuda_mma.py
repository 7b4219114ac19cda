"""A CUDA C++ tensor-core kernel for ``spqr`` layers at small batches (2-16 activation rows), by NVRTC.

The Triton tensor-core kernel (:mod:`.triton_mma16`) decodes the weights to fp16 in registers, stores
them to shared memory and reads them back into wgmma's operand layout, with barriers in every step;
here the decoded pairs *are* the operand: ``mma.sync.m16n8k16`` (fp16 in, fp32 accumulate) takes the
weights as its A operand straight from the decode, so a weight is decoded once and used for every
activation row with no data movement.

The trick is the K order. In an m16n8k16 A fragment thread (g, t) of a warp holds rows g and g + 8 and
the k-pairs t and t + 4; K is a sum, so any assignment of code pairs to k-pairs works as long as the B
operand (the activations) follows it. Here k-pairs t and t + 4 of the i-th mma of a step are pairs 2i and
2i + 1 of unit ``u0 + t``: each lane of a quad decodes a *whole unit* of its two rows (all 16 pairs, at the
compile-time bit offsets of :func:`.pair_asm.pair_layout`, 3 instructions per two weights: LOP3 into the
fp16 mantissa of 1024, the exact centring, ``w = s * q_c + nb`` in fp16x2) with that unit's statistics
(decoded once per (row, group), no lane repeats another's work), and a warp's 8 mmas per step cover 4
units x 16 rows. The activations are staged per block in shared memory as fp16 pairs in the same order,
(unit, activation row, 16 pairs), swizzled so that the quads' 16-byte reads never share a bank.

A block owns 128 rows (8 warps x 16) and a K range of whole 512-column buckets (``units`` units at
most, fewer where :func:`grid` spreads K over more blocks); warps load step j + 1 (code words and first-level statistics words of their rows) before the
math of step j. Per call a small kernel first writes x through ``perm`` as the scaled fp16 pairs the
blocks copy (cp.async) into shared memory. The weights are decoded scaled by WS = 2**8 and the
activations by 2**-8 (:data:`.pair_asm.BF16_SCALE`), so the fp32 products need no rescale and scales
down to ~2e-7 stay normal fp16 (|W| < 256, as in :mod:`.triton_mma16`). The outliers come from the
bucketed copy of :func:`.cuda_gemv.outlier_buckets` against the staged activations; partials add in a
fixed order (split K through the shared workspace of :mod:`effllm_kernels.splitk`): deterministic.

Two launch options, not defaults: blocks of up to 64 units (one wave of blocks on the 8B MLP shapes
instead of 1.7; dynamic shared memory where a variant exceeds 48 KB), and ``stages``: each thread
copies its steps' words with cp.async into its own slots of a shared ring, ``stages - 1`` steps ahead
of the math, instead of holding one step ahead in registers (more bytes in flight per SM at fewer
registers). Both were built in session 13 to test the ~28 us floor at 1-4 rows (BENCHMARKS.md); no GPU
could be had to run them in that session.

A group-column variant (the mma's N holding the weights' groups, the codes as raw A operands and the
statistics applied per group in fp32) was built and measured in session 12: 1.3-2.4x slower than this
layout at 1-8 rows (BENCHMARKS.md), so it was removed.

Needs what the CUDA GEMV needs (:func:`.cuda_gemv.unsupported_reason`) and at most 16 activation rows.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace

import torch

from effllm_kernels.spqr import cuda_gemv
from effllm_kernels.spqr.cuda_gemv import _PAIR_MACROS, BIAS_CODES, BUCKET, COMMON_C, ROWS
from effllm_kernels.spqr.layout import STAT_FP16
from effllm_kernels.spqr.pair_asm import BF16_SCALE, MAGIC, _direct_slots, _f16x2, pair_layout

#: Most activation rows a call takes (two n-tiles of 8).
MAX_M = 16
#: Static shared memory a block may declare; variants above it take dynamic shared memory, an opt-in per
#: kernel, up to MAX_SHARED (compute capability 9.0's limit; 8.0 allows 163 KB, 8.6 / 8.9 99 KB: there the
#: opt-in of a larger variant fails when it is built).
STATIC_SHARED = 48 * 1024
MAX_SHARED = 227 * 1024
#: Weight scale before rounding to fp16 (undone by the activations' 2**-8: the product is unscaled).
WS = 256.0


@dataclass(frozen=True)
class CudaMmaConfig:
    """Units per block at most (whole 16-unit outlier buckets; 64 units take 48 KB of activations and
    statistics at 1-8 rows, 80 KB at 9-16: dynamic shared memory above 48 KB),
    minimum resident blocks per SM (launch bounds), the blocks per SM the K split aims at, steps the
    loads run ahead of the math (registers: a ring of ``prefetch + 1`` steps), outliers per row and bucket
    loaded before the K loop; ``stages`` >= 2 instead streams the steps' loads through a ring of that many
    steps in shared memory (cp.async, ``stages - 1`` steps in flight, no registers held; ``prefetch`` unused)."""

    units: int = 32
    min_blocks: int = 2
    per_sm: float = 2.0
    prefetch: int = 1
    out_batch: int = 4
    stages: int = 0

    def __post_init__(self) -> None:
        if (self.units not in (16, 32, 48, 64) or min(self.min_blocks, self.prefetch, self.out_batch) < 1
                or self.per_sm <= 0 or self.stages == 1 or not 0 <= self.stages <= 8):  # 48: what grid() may give
            raise ValueError(f"CudaMmaConfig: {self} (units 16, 32, 48 or 64, min_blocks, prefetch, out_batch >= 1, "
                             "per_sm > 0, stages 0 or 2-8)")


def n_tiles(m: int) -> int:
    """Groups of 8 activation rows (the mma's N) for batch ``m``."""
    return -(-m // 8)


def shared_bytes(cfg: CudaMmaConfig, m: int, stat_bits: int, stat_group: int, bits: int) -> int:
    """Shared memory of a variant at batch ``m`` (staged activations, then the statistics coefficients
    and the output tile, which share one buffer, then the ring of ``cfg.stages`` steps of ``bits``-bit
    codes and statistics words: per thread ``bits + 4`` words of 8 bytes a step)."""
    nbt = 128 // stat_group if 128 % stat_group == 0 else -(-128 // stat_group) + 1
    st2 = 0 if stat_bits == STAT_FP16 else 2 * cfg.units * nbt * 16
    rows = 8 * n_tiles(m)
    red = ROWS * (rows + 4) * 4
    return cfg.units * rows * 64 + max(st2, red) + cfg.stages * (bits + 4) * 8 * 256 + 16


def dynamic_shared_bytes(cfg: CudaMmaConfig, m: int, stat_bits: int, stat_group: int, bits: int) -> int:
    """The dynamic shared memory a variant launches with: 0 where all of it fits 48 KB of static shared
    memory and no ring is asked for, else all but the 16-byte arrival flag."""
    smem = shared_bytes(cfg, m, stat_bits, stat_group, bits)
    return smem - 16 if smem > STATIC_SHARED or cfg.stages else 0


def unsupported_reason(dtype: torch.dtype, t, m: int) -> str | None:
    """Why this kernel cannot serve batch ``m`` of this layer and activation dtype, or None."""
    if not 1 <= m <= MAX_M:
        return f"{m} activation rows (it takes 1-{MAX_M})"
    return cuda_gemv.unsupported_reason(dtype, t)


def grid(t, cfg: CudaMmaConfig, sms: int) -> tuple[int, int]:
    """(K splits, units per block): about ``per_sm`` blocks per SM over the row tiles, whole buckets per
    block, at most ``cfg.units`` units, no empty split."""
    n_units = -(-t.in_features // 32)
    per_bucket = BUCKET // 32
    buckets = -(-n_units // per_bucket)
    tiles = -(-t.out_features // ROWS)
    split = max(1, min(buckets, round(cfg.per_sm * sms / tiles)))
    upb = min(cfg.units, -(-buckets // split) * per_bucket)
    return -(-n_units // upb), upb


def heuristic(t, m: int, sms: int) -> CudaMmaConfig | None:
    """The launch for batch ``m``, or None where another kernel was faster (H200 sweep, 2026-11-29 16:25
    UTC, BENCHMARKS.md "The CUDA tensor-core kernel for 2-16 rows"): 2-16 rows, except layers of fewer
    than 2048 x 4096 weights at M = 2-3 (1024x4096: 10.3 us against the CUDA GEMV's 6.6-6.8 at M = 2) and,
    at M = 2, the layers the CUDA GEMV counts as large (more than 4 one-step blocks per SM: level there,
    28.6 / 29.5 us against 28.1 / 28.7 on 14336x4096 / 4096x14336). The defaults: up to 32 units per
    block, ~2 blocks per SM, loads one step ahead (deeper prefetch and 16-unit blocks were not faster)."""
    if not 2 <= m <= MAX_M or (m <= 3 and t.out_features * t.in_features < 2048 * 4096):
        return None
    if m == 2 and cuda_gemv.one_step_blocks(t, cuda_gemv.CudaGemvConfig()) > 4 * sms:
        return None
    return CudaMmaConfig()


def pair_offsets(bits: int) -> list[int]:
    """Per pair: the field offset in its (possibly shifted) word where both decodes read it (the 3-bit
    pair 15, assembled at bit 0: 0)."""
    shift = bits * _direct_slots(bits)
    return [0 if w < 0 else (s - shift if s + bits > 10 else s) for _, _, w, s in pair_layout(bits)]


def scratch_need(t, m: int, cfg: CudaMmaConfig, sms: int) -> tuple[int, int]:
    """(fp32 workspace elements, arrival counters) of one call at batch ``m`` (0, 0 without a K split)."""
    split, _ = grid(t, cfg, sms)
    return (split * m * t.out_features, -(-t.out_features // ROWS)) if split > 1 else (0, 0)


def _pair_lop3(bits: int, r: int, p: int, magic: str) -> str:
    """The LOP3 (three for the 3-bit pair 15) putting pair ``p`` of row ``r``'s unit into the mantissas of
    ``magic``, at the field offset :func:`pair_offsets` gives (fields past bit 10 read from the word
    shifted once, ``h<r><w>``)."""
    _, _, w, s = pair_layout(bits)[p]
    if w < 0:  # 3-bit pair 15: bit b of each code from word b, bits 15 / 31
        return (f"lop3(w{r}[2] >> 13, 0x00040004u, lop3(w{r}[1] >> 14, 0x00020002u, "
                f"lop3(w{r}[0] >> 15, 0x00010001u, {magic})))")
    src = f"h{r}{w}" if s + bits > 10 else f"w{r}[{w}]"
    field = ((1 << bits) - 1) << pair_offsets(bits)[p]
    return f"lop3({src}, {field | field << 16:#x}u, {magic})"


def decode_c(bits: int) -> str:
    """C statements decoding the 16 pairs of one unit of the thread's two rows (words ``w0[]``, ``w1[]``)
    straight into the A operands of the step's 8 mmas: ``A[i]`` = (row 0 pair 2i, row 1 pair 2i, row 0
    pair 2i + 1, row 1 pair 2i + 1) as fp16x2, with the groups' coefficients ``s2[row][c]``, ``n2[row][c]``:
    the instructions of :func:`.pair_asm.decode_asm` per pair, at compile-time offsets."""
    off = 1 << (bits - 1)
    shift = bits * _direct_slots(bits)
    mg = f"{MAGIC | MAGIC << 16:#x}u"
    lines = [f"const u32 h{r}{w} = w{r}[{w}] >> {shift};" for r in range(2) for w in range(bits)]
    for p, se in enumerate(pair_offsets(bits)):
        for r in range(2):
            q = _pair_lop3(bits, r, p, mg)
            bi = _f16x2(-(1024 / 2**se + off))
            centred = f"hadd2({q}, {bi:#x}u)" if se == 0 else f"hfma2({q}, {_f16x2(2.0**-se):#x}u, {bi:#x}u)"
            lines.append(f"A[{p >> 1}].{'xyzw'[(p & 1) * 2 + r]} = hfma2({centred}, s2[{r}][{p // 8}], n2[{r}][{p // 8}]);")
    return "\n".join("    " + line for line in lines)


def emulate_decode_c(bits: int, words: tuple[list[int], list[int]], s2: list[list[int]],
                     n2: list[list[int]]) -> list[list[int]]:
    """Run the statements of :func:`decode_c` in Python (tests): the words of the two rows, the fp16x2
    coefficients ``s2[row][group]``, ``n2[row][group]`` -> ``A`` as 8 x 4 fp16x2 bit patterns. The fp16x2
    operations round like the hardware (:func:`.pair_asm._run_ptx`'s rules: exact, then once to fp16)."""
    from effllm_kernels.spqr.pair_asm import _halves, _pack

    def hfma2(a: int, b: int, c: int) -> int:
        (a0, a1), (b0, b1), (c0, c1) = _halves(a), _halves(b), _halves(c)
        return _pack(a0 * b0 + c0, a1 * b1 + c1)

    def hadd2(a: int, b: int) -> int:
        (a0, a1), (b0, b1) = _halves(a), _halves(b)
        return _pack(a0 + b0, a1 + b1)

    env = {"w0": [w & 0xFFFFFFFF for w in words[0]], "w1": [w & 0xFFFFFFFF for w in words[1]], "s2": s2, "n2": n2,
           "lop3": lambda a, b, c: (a & b) | c, "hfma2": hfma2, "hadd2": hadd2, "A": [[0] * 4 for _ in range(8)]}
    for line in decode_c(bits).splitlines():
        target, expr = (part.strip().rstrip(";") for part in line.split("=", 1))
        expr = re.sub(r"(0x[0-9a-f]+)u", r"\1", expr)
        value = eval(expr, {}, env)  # noqa: S307 - the generator's own constant text
        if target.startswith("const u32 "):
            env[target.removeprefix("const u32 ")] = value
        else:  # A[i].x .. A[i].w
            i, comp = target[2:].split("].")
            env["A"][int(i)]["xyzw".index(comp)] = value
    return env["A"]


def source(bits: int, stat_bits: int, stat_group: int, cfg: CudaMmaConfig, m: int, has_out: bool,
           bias: int) -> str:
    """The CUDA source of one variant for batch ``m`` (macros, shared helpers, the kernels); ValueError if
    it would not fit."""
    smem = shared_bytes(cfg, m, stat_bits, stat_group, bits)
    if smem > MAX_SHARED:
        raise ValueError(f"CudaMmaConfig {cfg}: {smem} bytes of shared memory at {m} activation rows "
                         f"({MAX_SHARED // 1024} KB at most)")
    defs = {
        "BITS": bits, "SB": stat_bits, "SG": stat_group, "NT": n_tiles(m), "MR": m, "UB": cfg.units, "MINB": cfg.min_blocks,
        "PF": cfg.prefetch, "OB": cfg.out_batch,
        "BUCKET": BUCKET, "HAS_OUT": int(has_out), "BIAS": bias, "XSC": f"{BF16_SCALE!r}f", "WS": f"{WS!r}f",
        "PW": cuda_gemv.pairs_per_half(bits), "STG": cfg.stages,
        "DSM": int(dynamic_shared_bytes(cfg, m, stat_bits, stat_group, bits) > 0),
    }
    head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    head += "".join(f"#define {name}({arg}) ({expr})\n" for name, (arg, expr) in _PAIR_MACROS.items())
    dec = ("__device__ __forceinline__ void decode_unit(const u32* w0, const u32* w1, const u32 (*s2)[2], "
           "const u32 (*n2)[2], uint4* A) {\n" + decode_c(bits) + "\n}\n")
    return head + COMMON_C + _SOURCE_HEAD + dec + _SOURCE


_SOURCE_HEAD = r"""
__device__ __forceinline__ u32 lop3(u32 a, u32 b, u32 c) {  // (a & b) | c
    u32 d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 hadd2(u32 a, u32 b) { u32 d; asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 pack2(float hi, float lo) { u32 d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d; }
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {  // zero-filled unless ok
    u32 d;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ uint2 ld2(const u32* p) { return *(const uint2*)p; }
// 4 or 8 bytes through L1 into shared memory; "memory": the compiler keeps the thread's earlier reads of
// the slot before it (the ring's write-after-read) and its later reads after the wait (STG loop)
__device__ __forceinline__ void cp_async(void* dst, const void* src, int bytes) {
    u32 d;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(dst));
    if (bytes == 8) asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(d), "l"(src) : "memory");
    else asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(d), "l"(src) : "memory");
}
"""

_SOURCE = r"""
#define T (NT * 8)        // activation rows staged per unit: the call's n-tiles
#define OFF ((float)(1 << (BITS - 1)))
// the staged chunk q of (unit ul, row m), swizzled so that the quads' 16-byte reads never share a bank
#define XCH(ul, m, q) (((ul) * T + (m)) * 4 + ((q) ^ ((ul) & 3)))
#define NBT (128 % SG == 0 ? 128 / SG : (128 + SG - 1) / SG + 1)
#define RS (T + 4)        // row stride of the output tile in shared memory
#define NCHM (UB * 32 / BUCKET)
#if SB != 16
#define BUFN ((2 * UB * NBT * 4 > 128 * RS) ? 2 * UB * NBT * 4 : 128 * RS)  // floats: coefficients, then output tile
#else
#define BUFN (128 * RS)
#endif
#define RSTEP ((BITS + 4) * 256)  // uint2 words of one step of the shared ring (STG)

// x [M, K] (bf16, rows stride_xm) -> xp [n_units][T][16] fp16 pairs, scaled by XSC, through perm, in
// pair order (codes PA(p), PB(p) of each unit), rows >= M and columns >= K zero.
extern "C" __global__ void spqr_mma_xprep(const u16* __restrict__ x, const int* __restrict__ perm,
                                          u32* __restrict__ xp, int M, int K, int stride_xm, int n_units,
                                          int has_perm) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_units * T * 16) return;
    const int p = e & 15, m = (e >> 4) % T, u = e / (16 * T);
    const int ka = u * 32 + PA(p), kb = u * 32 + PB(p);
    u32 v = 0;
    if (m < M) {
        const u16* xr = x + (size_t)m * stride_xm;
        const float a = ka < K ? bf16_f(xr[has_perm ? perm[ka] : ka]) : 0.f;
        const float b = kb < K ? bf16_f(xr[has_perm ? perm[kb] : kb]) : 0.f;
        v = pack2(b * XSC, a * XSC);
    }
    xp[e] = v;
}

// The loads of one step of a thread: its unit's code words and first-level statistics words of its
// two rows (rows past N read the last valid pair of rows: never written).
struct Step {
    uint2 w[BITS];
    uint2 s[2], z[2];
};

__device__ __forceinline__ void load_step(Step& b, int u, const u32* __restrict__ qw, const u32* __restrict__ sq,
                                          const u32* __restrict__ zq, int N, int lrow, int n_units, int NSW, int G) {
    // 32-bit element indices (the launch checks they fit): one IMAD.WIDE per address
    u = min(u, n_units - 1);
    const int qi = u * BITS * N + lrow;
#pragma unroll
    for (int w = 0; w < BITS; ++w) b.w[w] = ld2(qw + (qi + w * N));
#if SB != 16
    const int wi = min((u * 2 * SB) >> 5, NSW - 1), wh = min(wi + 1, NSW - 1);
    const int il = wi * N + lrow, ih = wh * N + lrow;
    b.s[0] = ld2(sq + il); b.s[1] = ld2(sq + ih);
    b.z[0] = ld2(zq + il); b.z[1] = ld2(zq + ih);
#else
    const int g0 = min(2 * u, G - 1), g1 = min(2 * u + 1, G - 1);
    b.s[0].x = *(const u32*)((const u16*)sq + (g0 * N + lrow));
    b.s[1].x = *(const u32*)((const u16*)sq + (g1 * N + lrow));
    b.z[0].x = *(const u32*)((const u16*)zq + (g0 * N + lrow));
    b.z[1].x = *(const u32*)((const u16*)zq + (g1 * N + lrow));
#endif
}

#if STG
// load_step's words copied (cp.async) into the thread's slot of a step of the shared ring instead: field
// f at ring[f * 256], a warp's 8-byte words side by side (no bank conflict); read back by read_step.
// (A separate function: folding both into one template changed the register path's SASS.)
__device__ __forceinline__ void copy_step(uint2* ring, int u, const u32* __restrict__ qw, const u32* __restrict__ sq,
                                          const u32* __restrict__ zq, int N, int lrow, int n_units, int NSW, int G) {
    u = min(u, n_units - 1);
    const int qi = u * BITS * N + lrow;
#pragma unroll
    for (int w = 0; w < BITS; ++w) cp_async(ring + w * 256, qw + (qi + w * N), 8);
#if SB != 16
    const int wi = min((u * 2 * SB) >> 5, NSW - 1), wh = min(wi + 1, NSW - 1);
    const int il = wi * N + lrow, ih = wh * N + lrow;
    cp_async(ring + BITS * 256, sq + il, 8); cp_async(ring + (BITS + 1) * 256, sq + ih, 8);
    cp_async(ring + (BITS + 2) * 256, zq + il, 8); cp_async(ring + (BITS + 3) * 256, zq + ih, 8);
#else
    const int g0 = min(2 * u, G - 1), g1 = min(2 * u + 1, G - 1);
    cp_async(ring + BITS * 256, (const u16*)sq + (g0 * N + lrow), 4);
    cp_async(ring + (BITS + 1) * 256, (const u16*)sq + (g1 * N + lrow), 4);
    cp_async(ring + (BITS + 2) * 256, (const u16*)zq + (g0 * N + lrow), 4);
    cp_async(ring + (BITS + 3) * 256, (const u16*)zq + (g1 * N + lrow), 4);
#endif
}

__device__ __forceinline__ void read_step(Step& b, const uint2* ring) {
#pragma unroll
    for (int w = 0; w < BITS; ++w) b.w[w] = ring[w * 256];
    b.s[0] = ring[BITS * 256]; b.s[1] = ring[(BITS + 1) * 256];
    b.z[0] = ring[(BITS + 2) * 256]; b.z[1] = ring[(BITS + 3) * 256];
}
#endif

// One bucketed outlier (column within bucket c of the block | fp16 value << 16) times the staged
// activations of the MR rows of the call, added to outl (a compile-time count: no predicate per row).
__device__ __forceinline__ void outlier_terms(u32 wd, int c, const uint4* xs, float* outl) {
    const int kl = c * BUCKET + (int)(wd & 0xFFFFu), ul = kl >> 5, cc = kl & 31;
    const int p = PAIR_OF(cc), half = HALF_OF(cc);
    const float v = h_f((u16)(wd >> 16));
    const u16* ch = (const u16*)&xs[XCH(ul, 0, p >> 2)] + 2 * (p & 3) + half;  // 16-bit loads: no shift
#pragma unroll
    for (int i = 0; i < MR; ++i) outl[i] = fmaf(v, h_f(ch[32 * i]), outl[i]);
}

// The math of one step of a thread: its unit ``ul`` (block-local) of its two rows, decoded with the
// unit's statistics into the A operands of 8 mmas per n-tile of activation rows.
__device__ __forceinline__ void step_math(const Step& a, int ul, int ub, const float4* st2, int blk,
                                          const uint4 (*xs)[T][4], int g, float (*acc)[4]) {
    u32 s2[2][2], n2[2][2];  // [row][group]: fp16x2 (WS * scale, -WS * scale * (zero - 2**(BITS-1)))
#if SB != 16
    const int sh0 = ((ub + ul) * 2 * SB) & 31;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const u32 sl = r ? a.s[0].y : a.s[0].x, shh = r ? a.s[1].y : a.s[1].x;
        const u32 zl = r ? a.z[0].y : a.z[0].x, zh = r ? a.z[1].y : a.z[1].x;
        const u32 vs = (u32)((((u64)shh << 32) | sl) >> sh0), vz = (u32)((((u64)zh << 32) | zl) >> sh0);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const float4 k = st2[(2 * ul + c) * NBT + blk];
            const float s = fmaf(k.x, mant(vs, c * SB), k.y), zc = fmaf(k.z, mant(vz, c * SB), k.w);
            s2[r][c] = pack2(s, s);
            const float nbv = -s * zc;
            n2[r][c] = pack2(nbv, nbv);
        }
    }
#else
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const float s = h_f((u16)(a.s[c].x >> (16 * r))) * WS, zc = h_f((u16)(a.z[c].x >> (16 * r))) - OFF;
            s2[r][c] = pack2(s, s);
            n2[r][c] = pack2(-s * zc, -s * zc);
        }
#endif
    uint4 A[8];
    {
        u32 w0[BITS], w1[BITS];
#pragma unroll
        for (int w = 0; w < BITS; ++w) { w0[w] = a.w[w].x; w1[w] = a.w[w].y; }
        decode_unit(w0, w1, s2, n2, A);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // pairs 4q .. 4q + 3: mmas 2q, 2q + 1
        uint4 xv[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n) xv[n] = xs[ul][8 * n + g][q ^ (ul & 3)];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            mma(acc[n], A[2 * q].x, A[2 * q].y, A[2 * q].z, A[2 * q].w, xv[n].x, xv[n].y);
            mma(acc[n], A[2 * q + 1].x, A[2 * q + 1].y, A[2 * q + 1].z, A[2 * q + 1].w, xv[n].z, xv[n].w);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, MINB)
spqr_mma_cuda(const uint4* __restrict__ xp, const u32* __restrict__ qw, const u32* __restrict__ sq,
              const u32* __restrict__ zq, const u16* __restrict__ sst, const u16* __restrict__ zst,
              const int* __restrict__ bptr, const u32* __restrict__ ent, const void* __restrict__ bias,
              u16* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
              int M, int N, int G, int NBLK, int n_units, int NSW, int KS, int UPB, int NBK)
{
    // the block's activations: (unit, row) -> 16 fp16 pairs as 4 chunks of 16 bytes, chunk q at q ^ (unit & 3)
#if DSM  // above 48 KB: dynamic shared memory, the same two buffers one after the other
    extern __shared__ __align__(16) uint4 dsm[];
    uint4* xs = dsm;
    float* buf = (float*)(dsm + UB * T * 4);
#else
    __shared__ __align__(16) uint4 xs[UB * T * 4];
    __shared__ __align__(16) float buf[BUFN];
#endif
    __shared__ int last;
#if SB != 16
    float4* st2 = (float4*)buf;  // (As, Bs, Az, Bz) per (group, statistics block); then the output tile
#endif
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x, kb = blockIdx.y;
    const int ub = kb * UPB, nb = min(UPB, n_units - ub);  // the block's units [ub, ub + nb)
    const int row = tile * 128 + warp * 16 + 2 * g;  // the thread's rows: row (mma row g), row + 1 (g + 8)
    const int lrow = min(row, N - 2);
    const int steps = (nb + 3) >> 2;  // a step: 4 units, one per lane of a quad

    // 1. the first PF steps' loads (STG: the first STG - 1 steps' copies into the shared ring, a group
    //    each), the row pointers of the block's outlier buckets
#if STG
    uint2* sring = (uint2*)(buf + BUFN) + tid;  // the thread's word of field 0 of ring step 0
#pragma unroll
    for (int i = 0; i < STG - 1; ++i) {
        if (i < steps) copy_step(sring + i * RSTEP, ub + 4 * i + t, qw, sq, zq, N, lrow, n_units, NSW, G);
        asm volatile("cp.async.commit_group;");
    }
#else
    Step ring[PF + 1];
#pragma unroll
    for (int i = 0; i < PF; ++i)
        if (i < steps) load_step(ring[i], ub + 4 * i + t, qw, sq, zq, N, lrow, n_units, NSW, G);
#endif
#if HAS_OUT
    const int orow = tid & 127, oh = tid >> 7, cb0 = ub * 32 / BUCKET, nch = min(UPB * 32 / BUCKET, NBK - cb0);
    int os[NCHM], oe[NCHM];
#pragma unroll
    for (int c = 0; c < NCHM; ++c) {
        const int i = (tile * NBK + cb0 + min(c, nch - 1)) * 128 + orow;
        os[c] = c < nch ? bptr[i] : 0;
        oe[c] = c < nch ? bptr[i + 1] : 0;
    }
#endif
    // 2. the activations (cp.async, zero past the block's units), the second-level statistics as FMA
    //    coefficients: scale * WS = As * f + Bs, zero - 2**(BITS-1) = Az * f + Bz, f = 1 + code * 2**-SB
    for (int e = tid; e < UB * T * 4; e += 256) {
        const int ul = e / (T * 4), m = (e / 4) % T, q = e % 4;
        const bool ok = ul < nb;
        cp_async16(&xs[XCH(ul, m, q)], xp + ((size_t)(ok ? ub + ul : 0) * T + m) * 4 + q, ok);
    }
    asm volatile("cp.async.commit_group;");
#if SB != 16
    for (int e = tid; e < 2 * UB * NBT; e += 256) {
        const int gl = e / NBT, bl = e % NBT;
        const int gg = min(2 * ub + gl, G - 1), b = min((tile * 128) / SG + bl, NBLK - 1);
        const size_t o = (size_t)(2 * gg) * NBLK + b;
        const float s0 = h_f(sst[o]), s1 = h_f(sst[o + NBLK]), z0 = h_f(zst[o]), z1 = h_f(zst[o + NBLK]);
        const float as = s0 * (float)(1 << SB), az = z0 * (float)(1 << SB);
        st2[e] = make_float4(as * WS, -(as + s0 * s1) * WS, az, -(az + z0 * z1) - OFF);
    }
    const int blk = (tile * 128 + warp * 16) / SG - (tile * 128) / SG;
#define ST2 st2
#define BLK blk
#else
#define ST2 nullptr
#define BLK 0
#endif
    asm volatile("cp.async.wait_all;");
    __syncthreads();
#if HAS_OUT
    u32 oent[NCHM][OB];  // the thread's first OB outliers per bucket (every other one of its row), in flight
#pragma unroll            // during the K loop
    for (int c = 0; c < NCHM; ++c)
#pragma unroll
        for (int e = 0; e < OB; ++e) {
            const int j = os[c] + oh + 2 * e;
            oent[c][e] = j < oe[c] ? ent[j] : 0u;  // 0: the value +0
        }
#endif

    // 3. the K loop: the loads of step j + PF go out before the math of step j (a ring of PF + 1 steps)
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#if STG  // step j + STG - 1 copied while step j is read back (its group complete) and computed
#pragma unroll 1
    for (int j = 0, rd = 0, wr = STG - 1; j < steps; ++j) {
        if (j + STG - 1 < steps)
            copy_step(sring + wr * RSTEP, ub + 4 * (j + STG - 1) + t, qw, sq, zq, N, lrow, n_units, NSW, G);
        asm volatile("cp.async.commit_group;" ::: "memory");
        asm volatile("cp.async.wait_group %0;" :: "n"(STG - 1) : "memory");
        Step a;
        read_step(a, sring + rd * RSTEP);
        step_math(a, 4 * j + t, ub, ST2, BLK, (const uint4 (*)[T][4])xs, g, acc);
        rd = rd == STG - 1 ? 0 : rd + 1;
        wr = wr == STG - 1 ? 0 : wr + 1;
    }
#else
#pragma unroll 1
    for (int j0 = 0; j0 < steps; j0 += PF + 1) {
#pragma unroll
        for (int r = 0; r <= PF; ++r) {
            const int j = j0 + r;
            if (j < steps) {
                if (j + PF < steps)
                    load_step(ring[(r + PF) % (PF + 1)], ub + 4 * (j + PF) + t, qw, sq, zq, N, lrow, n_units, NSW, G);
                step_math(ring[r], 4 * j + t, ub, ST2, BLK, (const uint4 (*)[T][4])xs, g, acc);
            }
        }
    }
#endif

    // 4. the output tile in shared memory (it reuses the coefficients' buffer), then the outliers of
    //    the thread's row in the block's buckets (two threads per row, every other outlier each)
    __syncthreads();
    float* red = buf;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int r0 = warp * 16 + 2 * g, c0 = 8 * n + 2 * t;
        *(float2*)&red[r0 * RS + c0] = make_float2(acc[n][0], acc[n][1]);
        *(float2*)&red[(r0 + 1) * RS + c0] = make_float2(acc[n][2], acc[n][3]);
    }
#if HAS_OUT
    {
        float outl[MR];
#pragma unroll
        for (int i = 0; i < MR; ++i) outl[i] = 0.f;
#pragma unroll
        for (int c = 0; c < NCHM; ++c) {
#pragma unroll
            for (int e = 0; e < OB; ++e) outlier_terms(oent[c][e], c, xs, outl);
            for (int j = os[c] + oh + 2 * OB; j < oe[c]; j += 2) outlier_terms(ent[j], c, xs, outl);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // the two threads of a row add in a fixed order
            __syncthreads();
            if (oh == h)
#pragma unroll
                for (int i = 0; i < MR; ++i) red[orow * RS + i] += outl[i] * (1.0f / XSC);
        }
    }
#endif
    // 5. y (+ bias) or this split's partial; the last split of the tile to arrive adds all in split order
    __syncthreads();
    for (int e = tid; e < 128 * M; e += 256) {
        const int rr = e & 127, m = e >> 7, n = tile * 128 + rr;
        if (n >= N) continue;
        const float v = red[rr * RS + m];
        if (KS == 1) y[(size_t)m * N + n] = f_bf16(v + bias_at(bias, n));
        else ws[((size_t)kb * M + m) * N + n] = v;
    }
    if (KS == 1) return;
    __syncthreads();  // every partial of the block is written ...
    if (tid == 0) {   // ... before thread 0's release (cumulative through the barrier) and arrival
        __threadfence();
        last = atomicAdd(&cnt[tile], 1) == KS - 1;
        if (last) __threadfence();  // acquire: the other blocks' partials, for the whole block (barrier)
    }
    __syncthreads();
    if (!last) return;
    // every element of the thread at once, four splits at a time: up to 4 * EPT loads in flight (one
    // element at a time left the last block waiting ~KS / 4 round trips per element); the adds keep
    // split order, so the sum is the same
    constexpr int EPT = (128 * MR + 255) / 256;
    float v[EPT];
#pragma unroll
    for (int q = 0; q < EPT; ++q) v[q] = 0.f;
#pragma unroll 4
    for (int k = 0; k < KS; ++k)
#pragma unroll
        for (int q = 0; q < EPT; ++q) {
            const int e = tid + 256 * q, rr = e & 127, m = e >> 7, n = tile * 128 + rr;
            if (m < M && n < N) v[q] += ld_cg(ws + ((size_t)k * M + m) * N + n);
        }
#pragma unroll
    for (int q = 0; q < EPT; ++q) {
        const int e = tid + 256 * q, rr = e & 127, m = e >> 7, n = tile * 128 + rr;
        if (m < M && n < N) y[(size_t)m * N + n] = f_bf16(v[q] + bias_at(bias, n));
    }
    if (tid == 0) cnt[tile] = 0;
}
"""


@functools.lru_cache(maxsize=256)  # one variant per batch size: 15 a layer format at 2-16 rows
def _kernels(bits: int, stat_bits: int, stat_group: int, cfg: CudaMmaConfig, m: int, has_out: bool, bias: int,
             device_index: int):
    """(xprep kernel, main kernel, the main kernel's dynamic shared memory in bytes) of one variant."""
    dyn = dynamic_shared_bytes(cfg, m, stat_bits, stat_group, bits)
    optin = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 49152)
    if dyn + 16 > optin:
        raise ValueError(f"CudaMmaConfig {cfg}: {dyn + 16} bytes of shared memory at {m} activation rows, "
                         f"this device allows {optin} per block")
    prep, kern = cuda_gemv.build(source(bits, stat_bits, stat_group, cfg, m, has_out, bias),
                                 ("spqr_mma_xprep", "spqr_mma_cuda"), device_index, "spqr CUDA mma")
    if dyn:
        with torch.cuda.device(device_index):
            kern.set_shared_memory_config(dyn)  # the opt-in above 48 KB (cuFuncSetAttribute)
    return prep, kern, dyn


def launch(x2: torch.Tensor, t, bias: torch.Tensor | None, y: torch.Tensor, cfg: CudaMmaConfig, sms: int) -> None:
    """y [M, N] = x2 [M, K] (bf16, rows contiguous, M <= MAX_M) @ W_s^T (+ bias) for the kernel layout
    ``t`` (with its ``outlier_buckets``) on a device of ``sms`` SMs. Raises :class:`.cuda_gemv.CompileError` when
    NVRTC cannot build the kernels."""
    from effllm_kernels.splitk import SCRATCH

    m, k = x2.shape
    n = t.out_features
    rows = 8 * n_tiles(m)
    fp16_stats = t.stat_bits == STAT_FP16
    if bias is not None and (bias.dtype not in BIAS_CODES or bias.stride(-1) != 1):
        bias = bias.float().contiguous()
    if max(t.qweight.numel(), t.scale_q.numel(), t.zero_q.numel()) >= 2**31:
        raise ValueError(f"spqr CUDA mma: a {n}x{k} layer's packed tensors exceed 32-bit indices")
    split, upb = grid(t, cfg, sms)
    cfg_b = replace(cfg, units=upb)  # shared memory and the staging loop sized for the units a block takes
    tiles = -(-n // ROWS)
    n_units = -(-k // 32)
    prep, kern, dyn = _kernels(t.bits, t.stat_bits, 16 if fp16_stats else t.stat_group, cfg_b, m, t.nnz > 0,
                          0 if bias is None else BIAS_CODES[bias.dtype], x2.device.index or 0)
    xp = torch.empty(n_units * rows * 16, dtype=torch.int32, device=x2.device)  # 16 pair words per (unit, row)
    if split > 1:
        ws, cnt = SCRATCH.get(x2.device, split * m * n, tiles)
    else:
        ws, cnt = y, y  # never read
    dummy = t.qweight
    nb = tiles * -(-k // BUCKET) * ROWS + 1
    bptr, ent = (t.outlier_buckets[:nb], t.outlier_buckets[nb:]) if t.nnz else (dummy, dummy)
    with torch.cuda.device(x2.device):
        prep(grid=(math.ceil(xp.numel() / 256), 1, 1), block=(256, 1, 1),
             args=[x2, t.perm if t.perm is not None else dummy, xp, m, k, x2.stride(0), n_units, int(t.perm is not None)])
        kern(grid=(tiles, split, 1), block=(256, 1, 1),
             shared_mem=dyn,
             args=[xp, t.qweight, t.scale_q, t.zero_q, dummy if fp16_stats else t.scale_stats,
                   dummy if fp16_stats else t.zero_stats, bptr, ent, bias if bias is not None else y, y, ws, cnt,
                   m, n, t.n_groups, t.n_blocks, n_units, t.scale_q.shape[0], split, upb, -(-k // BUCKET)])


__all__ = ["MAX_M", "MAX_SHARED", "STATIC_SHARED", "CudaMmaConfig", "decode_c", "dynamic_shared_bytes",
           "emulate_decode_c", "grid", "heuristic", "launch", "n_tiles", "scratch_need", "shared_bytes", "source",
           "unsupported_reason"]
