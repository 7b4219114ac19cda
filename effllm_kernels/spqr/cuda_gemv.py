"""A CUDA C++ GEMV for ``spqr`` layers at batch 1-3 (decode), compiled at run time by NVRTC.

Why CUDA and not Triton here: at batch 1 a layer is ~27 MB of codes and statistics on the large
Llama-3-8B shapes, a few microseconds of HBM time, so what counts is how long each block's dependent
work before and after its loads takes and how many bytes stay in flight. The fp16x2 Triton GEMV
(:mod:`.triton_gemv16`) stages the activations through a global scratch in every program and walks
each row's CSR outliers through ``perm`` (four dependent round trips). Here:

- a block owns 128 output rows (4 neighbouring rows per lane, one 16-byte load per code word) and
  ``warps * units * S`` units of K; warp ``w`` takes units ``(j * warps + w) * units ..`` in step ``j``
  and issues the loads of step ``j + 1`` (codes, statistics words) before the math of step ``j``;
- while the first step's loads are in flight the block gathers its activations through ``perm`` into
  shared memory (scaled by 2**-8 into fp16, in pair order, with group sums) and turns the second-level
  statistics of its groups into FMA coefficients there (every load of a thread issued before any use);
- the outliers are read from a load-time *bucketed* copy (:func:`outlier_buckets`: per 128-row tile
  and 512 stored columns, row by row, one 32-bit word per outlier), so a block finds its rows' outliers
  with two loads and multiplies them by the activations already in shared memory: no gather through
  ``perm`` and no separate pass (the copy: 4 bytes per outlier plus a row pointer per row and bucket);
- warps add their partials in shared memory in warp order and K splits through the split-K workspace
  of :mod:`effllm_kernels.splitk` (the last block of a row tile adds them in split order): the result
  does not depend on timing.

The arithmetic is the fp16x2 GEMV's: per (row, 32-code unit) the PTX block of
:func:`effllm_kernels.spqr.pair_asm.dot_asm` gives the two centred group dots; per (row, group)
``y += s * (P - (z - 2**(bits-1)) * sum_j x_j)`` in fp32. Needs (:func:`unsupported_reason`): bf16
activations, 2/3/4-bit codes in groups of 16, 2-4-bit statistics in blocks of a multiple of 16 rows or
fp16 statistics, a multiple of 4 output features, and NVRTC (PyTorch's ``torch.cuda._compile_kernel``,
from the CUDA wheels; no nvcc). Each variant compiles once per process (~0.3 s).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace

import torch

from effllm_kernels.spqr.layout import STAT_FP16
from effllm_kernels.spqr.pair_asm import BF16_SCALE, dot_asm

log = logging.getLogger(__name__)

ROWS = 128  # output rows per block (32 lanes x 4 rows)
BUCKET = 512  # stored columns per outlier bucket (16 units): a block's K range is whole buckets


@dataclass(frozen=True)
class CudaGemvConfig:
    """Warps per block, units per warp and K step, minimum resident blocks per SM (launch bounds), K
    steps per block at most, the blocks per SM the K split aims at (:func:`grid`), outliers per thread
    and bucket loaded in one batch."""

    warps: int = 8
    units: int = 2
    min_blocks: int = 2
    max_steps: int = 8
    per_sm: float = 2.0
    out_batch: int = 8

    def __post_init__(self) -> None:
        if self.warps % 4 or not 4 <= self.warps <= 32:
            raise ValueError(f"CudaGemvConfig: warps={self.warps} (a multiple of 4 up to 32: 128 rows per block)")
        if min(self.units, self.min_blocks, self.max_steps, self.out_batch) < 1 or self.per_sm <= 0:
            raise ValueError(f"CudaGemvConfig: {self} (units, min_blocks, max_steps, out_batch >= 1, per_sm > 0)")
        if _bucket_align(self) > self.max_steps:
            raise ValueError(f"CudaGemvConfig: {self.warps * self.units} units per step need "
                             f"{_bucket_align(self)} steps per block (whole outlier buckets), max_steps={self.max_steps}")


def _bucket_align(cfg: CudaGemvConfig) -> int:
    """K steps per block that make it whole outlier buckets (BUCKET / 32 units)."""
    return (BUCKET // 32) // math.gcd(BUCKET // 32, cfg.warps * cfg.units)


def shared_bytes(cfg: CudaGemvConfig, stat_bits: int, stat_group: int) -> int:
    """Static shared memory of a variant (the kernel's arrays; must stay under 48 KB)."""
    bum = cfg.warps * cfg.units * cfg.max_steps
    nbt = 128 // stat_group if 128 % stat_group == 0 else -(-128 // stat_group) + 1
    st2 = 0 if stat_bits == STAT_FP16 else 2 * bum * nbt * 16
    return bum * 64 + bum * 8 + (cfg.warps + cfg.warps // 4) * 512 + st2 + 4


def unsupported_reason(dtype: torch.dtype, t) -> str | None:
    """Why the CUDA GEMV cannot serve this layer and activation dtype, or None."""
    if dtype != torch.bfloat16:
        return f"activations {dtype} (the CUDA GEMV takes bfloat16)"
    if t.bits not in (2, 3, 4) or t.group_size != 16:
        return f"{t.bits}-bit codes in groups of {t.group_size} (it takes 2-4 bits, groups of 16)"
    if t.stat_bits != STAT_FP16 and not (2 <= t.stat_bits <= 4 and t.stat_group % 16 == 0):
        return f"{t.stat_bits}-bit statistics in blocks of {t.stat_group} rows (it takes 2-4 bits, blocks of 16k rows)"
    if t.out_features % 4:
        return f"{t.out_features} output features (it takes a multiple of 4)"
    if getattr(t, "nnz", 0) and getattr(t, "outlier_buckets", None) is None:
        return "no bucketed outliers (built by repack on a CUDA device)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no NVRTC entry point (torch.cuda._compile_kernel)"
    return None


def outlier_buckets(t) -> torch.Tensor:
    """The outliers of a layer regrouped per (row tile of 128, bucket of BUCKET stored columns), row by
    row, as one int32 tensor: the row pointers ``bptr`` [tiles * buckets * 128 + 1] (row r of bucket b
    of tile i: entries ``bptr[(i * buckets + b) * 128 + r]`` up to the next one), then the entries
    [nnz] (the column within the bucket in the low 16 bits, the fp16 value's bits in the high 16).
    An exact rearrangement of the CSR outliers (tested); built at load time, next to them."""
    n, k = t.out_features, t.in_features
    dev = t.outlier_val.device
    tiles, buckets = -(-n // ROWS), -(-k // BUCKET)
    counts = (t.outlier_rowptr[1:] - t.outlier_rowptr[:-1]).long()
    # no host sync (output_size, index_add_): the layout can be built inside a captured stream
    rows = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=t.nnz)
    cols = t.outlier_col.long() & 0xFFFF
    slot = ((rows // ROWS) * buckets + cols // BUCKET) * ROWS + rows % ROWS  # the bucket row of each entry
    order = torch.argsort(slot * BUCKET + cols % BUCKET)
    bptr = torch.zeros(tiles * buckets * ROWS + 1, dtype=torch.int64, device=dev)
    bptr.index_add_(0, slot + 1, torch.ones_like(slot))
    bptr = bptr.cumsum(0)
    word = (cols[order] % BUCKET) | ((t.outlier_val.view(torch.int16).long()[order] & 0xFFFF) << 16)
    return torch.cat([bptr, torch.where(word >= 2**31, word - 2**32, word)]).to(torch.int32)


#: C macros over ``PW`` (:func:`pairs_per_half`) for pair_layout's table, both ways: codes a / b of pair p
#: (PA, PB) and the pair / half holding code c of a unit (PAIR_OF, HALF_OF). The same expressions are
#: evaluated in Python by :func:`pair_macros` (tested against ``pair_layout``).
_PAIR_MACROS = {
    "PA": ("p", "((p) / PW) * 2 * PW + (p) % PW"),
    "PB": ("p", "((p) / PW) * 2 * PW + (p) % PW + PW"),
    "PAIR_OF": ("c", "((c) / (2 * PW)) * PW + (c) % PW"),
    "HALF_OF": ("c", "((c) / PW) & 1"),
}


def pairs_per_half(bits: int) -> int:
    """PW: the distance of a pair's two codes in a unit (3 bits: neighbours; 2 / 4 bits: 8 / 4 apart)."""
    return 1 if bits == 3 else 16 // bits


def pair_macros(bits: int, name: str, value: int) -> int:
    """The C macro ``name`` of :data:`_PAIR_MACROS` at ``value`` for ``bits``-bit codes (integer C semantics,
    all operands non-negative: Python's // and % agree)."""
    arg, expr = _PAIR_MACROS[name]
    return int(eval(expr.replace("/", "//").replace("PW", str(pairs_per_half(bits))), {}, {arg: value}))


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


#: The kernel's BIAS macro per bias dtype (0: no bias).
BIAS_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def source(bits: int, stat_bits: int, stat_group: int, cfg: CudaGemvConfig, has_perm: bool, has_out: bool,
           bias: int) -> str:
    """The CUDA source of one variant (the macros, then the kernel); ValueError if it would not fit."""
    if shared_bytes(cfg, stat_bits, stat_group) > 48 * 1024:
        raise ValueError(f"CudaGemvConfig {cfg}: {shared_bytes(cfg, stat_bits, stat_group)} bytes of shared "
                         f"memory for {stat_bits}-bit statistics in blocks of {stat_group} rows (48 KB at most)")
    asm, _ = dot_asm(bits)
    pw = pairs_per_half(bits)
    defs = {
        "BITS": bits, "SB": stat_bits, "SG": stat_group, "WARPS": cfg.warps, "U": cfg.units,
        "MINB": cfg.min_blocks, "MAXS": cfg.max_steps, "OB": cfg.out_batch, "BUCKET": BUCKET,
        "HAS_PERM": int(has_perm), "HAS_OUT": int(has_out), "BIAS": bias,
        "XSC": f"{BF16_SCALE!r}f", "DOT_ASM": _c_string(asm.replace("$", "%")), "PW": pw,
    }
    head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    head += "".join(f"#define {name}({arg}) ({expr})\n" for name, (arg, expr) in _PAIR_MACROS.items())
    return head + COMMON_C + _SOURCE


#: C helpers the CUDA kernels of this package share (after the variant's macros: ``SB``, ``BIAS``).
COMMON_C = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

__device__ __forceinline__ float bf16_f(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ float h_f(u16 v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ u16 f_h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u16 f_bf16(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
// 16 bytes read once (no L1 allocation)
__device__ __forceinline__ uint4 ld_stream(const u32* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
// 1 + (field of SB bits at bit ``from`` of v) * 2**-SB: the field under the mantissa of 1.0f
__device__ __forceinline__ float mant(u32 v, int from) {
    const int low = 23 - SB;
    const u32 t = from <= low ? v << (low - from) : v >> (from - low);
    return __uint_as_float((t & (((1u << SB) - 1) << low)) | 0x3F800000u);
}
__device__ __forceinline__ u32 pick(const uint4& v, int r) { return r == 0 ? v.x : r == 1 ? v.y : r == 2 ? v.z : v.w; }
__device__ __forceinline__ float ld_cg(const float* p) { float v; asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p)); return v; }

// The bias of row n as fp32 (BIAS: 0 none, 1 bf16, 2 fp16, 3 fp32)
__device__ __forceinline__ float bias_at(const void* bias, int n) {
    if (BIAS == 1) return bf16_f(((const u16*)bias)[n]);
    if (BIAS == 2) return h_f(((const u16*)bias)[n]);
    if (BIAS == 3) return ((const float*)bias)[n];
    return 0.f;
}

"""

_SOURCE = r"""
__device__ __forceinline__ void dot(u32 w0, u32 w1, u32 w2, u32 w3, const u32* x, float& p0, float& p1) {
    u32 a, b;
    asm(DOT_ASM : "=r"(a), "=r"(b)
        : "r"(w0), "r"(w1), "r"(w2), "r"(w3), "r"(x[0]), "r"(x[1]), "r"(x[2]), "r"(x[3]), "r"(x[4]), "r"(x[5]),
          "r"(x[6]), "r"(x[7]), "r"(x[8]), "r"(x[9]), "r"(x[10]), "r"(x[11]), "r"(x[12]), "r"(x[13]), "r"(x[14]),
          "r"(x[15]));
    p0 = __uint_as_float(a);
    p1 = __uint_as_float(b);
}

#define THREADS (WARPS * 32)
#define BU (WARPS * U)
#define OFF ((float)(1 << (BITS - 1)))
#define NBT (128 % SG == 0 ? 128 / SG : (128 + SG - 1) / SG + 1)  // statistics blocks a 128-row tile touches
#define BUM (BU * MAXS)  // units of a block at most
#define NP ((BUM * 16 + THREADS - 1) / THREADS)  // activation pairs per thread in the prologue
#define NS ((2 * BUM * NBT + THREADS - 1) / THREADS)  // (group, statistics block) pairs per thread
#define H (THREADS / 128)  // threads per row in the outlier pass
#define NCHM (BUM * 32 / BUCKET)  // outlier buckets of a block at most

// Split-K: after this block's partial is in ws, the last block of the tile to arrive adds all
// partials in split order and writes y (+ bias) in bf16.
__device__ __forceinline__ void finish(const void* bias, u16* y, float* ws, int* cnt, int M, int N, int parts,
                                       int tile, int m, int* last) {
    const int tid = threadIdx.x;
    __syncthreads();  // every partial of the block is written ...
    if (tid == 0) {   // ... before thread 0's release (cumulative through the barrier) and arrival
        __threadfence();
        *last = atomicAdd(&cnt[blockIdx.z * gridDim.x + tile], 1) == parts - 1;
        if (*last) __threadfence();  // acquire: the other blocks' partials, for the whole block (barrier)
    }
    __syncthreads();
    if (!*last) return;
    for (int rr = tid; rr < 128; rr += THREADS) {
        const int n = tile * 128 + rr;
        if (n >= N) continue;
        float v = 0.f;
        for (int k = 0; k < parts; ++k) v += ld_cg(ws + ((size_t)k * M + m) * N + n);
        v += bias_at(bias, n);
        y[(size_t)m * N + n] = f_bf16(v);
    }
    if (tid == 0) cnt[blockIdx.z * gridDim.x + tile] = 0;
}

// One bucketed outlier (column within bucket c of the block | fp16 value << 16) times its activation,
// read from the block's fp16 pairs (pair_layout's order): v * x, in the activations' scale.
__device__ __forceinline__ float outlier_term(u32 w, int c, const u32 (*xs)[16]) {
    const int kl = c * BUCKET + (int)(w & 0xFFFFu), ul = kl >> 5, cc = kl & 31;
    const int p = PAIR_OF(cc), half = HALF_OF(cc);
    return h_f((u16)(w >> 16)) * h_f((u16)(xs[ul][p] >> (16 * half)));
}

// The loads of one K step of one warp: U units of 4 rows (codes, first-level statistics words).
struct Step {
    uint4 cw[U][BITS];
#if SB != 16
    uint4 sl, sh, zl, zh;
#else
    uint2 sf[U][2], zf[U][2];
#endif
};

// (rows past N and units past K read the last valid ones: their codes meet zero activations or are
// never written, so no load needs a predicate)
__device__ __forceinline__ void load_step(Step& b, int u0, const u32* __restrict__ qw, const u32* __restrict__ sq,
                                          const u32* __restrict__ zq, int N, int lrow, int n_units, int NSW, int G) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
        const int u = min(u0 + i, n_units - 1);
#pragma unroll
        for (int w = 0; w < BITS; ++w) b.cw[i][w] = ld_stream(qw + (size_t)(u * BITS + w) * N + lrow);
    }
#if SB != 16
    const int wi = min((u0 * 2 * SB) >> 5, NSW - 1), wh = min(wi + 1, NSW - 1);
    b.sl = *(const uint4*)(sq + (size_t)wi * N + lrow);
    b.zl = *(const uint4*)(zq + (size_t)wi * N + lrow);
    b.sh = *(const uint4*)(sq + (size_t)wh * N + lrow);
    b.zh = *(const uint4*)(zq + (size_t)wh * N + lrow);
#else
#pragma unroll
    for (int i = 0; i < U; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int g = min(2 * (u0 + i) + j, G - 1);
            b.sf[i][j] = *(const uint2*)((const u16*)sq + (size_t)g * N + lrow);
            b.zf[i][j] = *(const uint2*)((const u16*)zq + (size_t)g * N + lrow);
        }
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS, MINB)
spqr_gemv_cuda(const u16* __restrict__ x, const int* __restrict__ perm, const u32* __restrict__ qw,
               const u32* __restrict__ sq, const u32* __restrict__ zq, const u16* __restrict__ sst,
               const u16* __restrict__ zst, const int* __restrict__ bptr, const u32* __restrict__ ent,
               const void* __restrict__ bias, u16* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
               int M, int N, int K, int stride_xm, int G, int NBLK, int n_units, int NSW, int KS, int S, int NBK)
{
    __shared__ __align__(16) u32 xs[BUM][16];  // the block's activations: fp16 pairs in pair order
    __shared__ float sxs[BUM][2];              // and their group sums
    __shared__ __align__(16) float red[WARPS + H][128];  // per-warp partials, then the outlier sums
#if SB != 16
    __shared__ float4 st2[2 * BUM][NBT];       // (As, Bs, Az, Bz) per group and statistics block
#endif
    __shared__ int last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tile = blockIdx.x, kb = blockIdx.y, m = blockIdx.z;
    const int row0 = tile * 128 + lane * 4;
    const int lrow = min(row0, N - 4);  // rows past N read the last valid rows (never written)
    const int ub = kb * BU * S;  // the block's units [ub, ub + nb); warp w, step j: ub + (j * WARPS + w) * U
    const int nb = min(BU * S, n_units - ub);

    // 1. the first step's loads, and the row pointers of this thread's row in the block's outlier buckets
    Step a;
    load_step(a, ub + warp * U, qw, sq, zq, N, lrow, n_units, NSW, G);
#if HAS_OUT
    const int orow = tid & 127, oh = tid >> 7, cb0 = ub * 32 / BUCKET, nch = min(BU * S * 32 / BUCKET, NBK - cb0);
    int os[NCHM], oe[NCHM];
#pragma unroll
    for (int c = 0; c < NCHM; ++c) {
        const int i = (tile * NBK + cb0 + min(c, nch - 1)) * 128 + orow;
        os[c] = c < nch ? bptr[i] : 0;
        oe[c] = c < nch ? bptr[i + 1] : 0;
    }
#endif

#if SB != 16
    // the second-level statistics' loads go out with the first step's, before the activations' two
    // dependent round trips (perm, then x), so that their wait overlaps those
    u16 v2[NS][4];
#pragma unroll
    for (int q = 0; q < NS; ++q) {
        const int e = tid + q * THREADS, gl = e / NBT, bl = e % NBT;
        const int g = min(2 * ub + gl, G - 1), b = min((tile * 128) / SG + bl, NBLK - 1);
        const size_t o = (size_t)(2 * g) * NBLK + b;
        const bool ok = gl < 2 * nb;
        v2[q][0] = ok ? sst[o] : (u16)0; v2[q][1] = ok ? sst[o + NBLK] : (u16)0;
        v2[q][2] = ok ? zst[o] : (u16)0; v2[q][3] = ok ? zst[o + NBLK] : (u16)0;
    }
#endif
    // 2. while they are in flight: the block's activations (every load of the thread first, then the
    //    math), through the permutation, scaled by XSC and rounded to fp16, with their group sums ...
    const u16* xr = x + (size_t)m * stride_xm;
    {
        int ka[NP], kb2[NP];
        u16 va[NP], vb[NP];
#pragma unroll
        for (int q = 0; q < NP; ++q) {
            const int e = tid + q * THREADS, p = e & 15, ul = e >> 4;
            const bool ok = e < BUM * 16 && ul < nb;
            ka[q] = ok ? (ub + ul) * 32 + PA(p) : K;
            kb2[q] = ok ? (ub + ul) * 32 + PB(p) : K;
        }
#pragma unroll
        for (int q = 0; q < NP; ++q) {
            ka[q] = ka[q] < K ? (HAS_PERM ? perm[ka[q]] : ka[q]) : -1;
            kb2[q] = kb2[q] < K ? (HAS_PERM ? perm[kb2[q]] : kb2[q]) : -1;
        }
#pragma unroll
        for (int q = 0; q < NP; ++q) {
            va[q] = ka[q] >= 0 ? xr[ka[q]] : (u16)0;
            vb[q] = kb2[q] >= 0 ? xr[kb2[q]] : (u16)0;
        }
#pragma unroll
        for (int q = 0; q < NP; ++q) {
            const int e = tid + q * THREADS, p = e & 15, ul = e >> 4;
            const u16 ha = f_h(bf16_f(va[q]) * XSC), hb = f_h(bf16_f(vb[q]) * XSC);
            float sum = h_f(ha) + h_f(hb);  // the group of 8 pairs: 8 neighbouring lanes
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            if (e < BUM * 16) {
                xs[ul][p] = (u32)ha | ((u32)hb << 16);
                if ((p & 7) == 0) sxs[ul][p >> 3] = sum;
            }
        }
    }
#if SB != 16
    // ... and the second-level statistics of the block's groups and row blocks (loaded above), as FMA
    //     coefficients: scale = As * f + Bs, zero - 2**(BITS-1) = Az * f + Bz with f = 1 + code * 2**-SB
    //     (the code under the mantissa of 1.0), A = step * 2**SB, B = -(A + step * zero-point)
    {
#pragma unroll
        for (int q = 0; q < NS; ++q) {
            const int e = tid + q * THREADS;
            if (e < 2 * BUM * NBT) {
                const float as = h_f(v2[q][0]) * (float)(1 << SB), az = h_f(v2[q][2]) * (float)(1 << SB);
                (&st2[0][0])[e] = make_float4(as, -(as + h_f(v2[q][0]) * h_f(v2[q][1])),
                                              az, -(az + h_f(v2[q][2]) * h_f(v2[q][3])) - OFF);
            }
        }
    }
    const int blk = row0 / SG - (tile * 128) / SG;  // the thread's statistics block within the tile's
#endif
    __syncthreads();

    // 3. the K loop: the loads of step j + 1 go out before the math of step j
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
    for (int j = 0; j < S; ++j) {
        const int u0 = ub + (j * WARPS + warp) * U;
        Step b;
        if (j + 1 < S) load_step(b, u0 + BU, qw, sq, zq, N, lrow, n_units, NSW, G);
#if SB != 16
        const int sh0 = (u0 * 2 * SB) & 31;
#endif
#pragma unroll
        for (int i = 0; i < U; ++i) {
            const int ul = u0 + i - ub;
            if (ul >= nb) break;
            u32 xp[16];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const uint4 v = *(const uint4*)&xs[ul][4 * q];
                xp[4 * q] = v.x; xp[4 * q + 1] = v.y; xp[4 * q + 2] = v.z; xp[4 * q + 3] = v.w;
            }
            const float sx0 = sxs[ul][0], sx1 = sxs[ul][1];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
#if SB != 16
                const u32 vs = (u32)((((u64)pick(a.sh, r) << 32) | pick(a.sl, r)) >> (sh0 + i * 2 * SB));
                const u32 vz = (u32)((((u64)pick(a.zh, r) << 32) | pick(a.zl, r)) >> (sh0 + i * 2 * SB));
                const float4 c0 = st2[2 * ul][blk], c1 = st2[2 * ul + 1][blk];
                const float s0 = fmaf(c0.x, mant(vs, 0), c0.y), s1 = fmaf(c1.x, mant(vs, SB), c1.y);
                const float zc0 = fmaf(c0.z, mant(vz, 0), c0.w), zc1 = fmaf(c1.z, mant(vz, SB), c1.w);
#else
                const u32 sp0 = r < 2 ? a.sf[i][0].x : a.sf[i][0].y, sp1 = r < 2 ? a.sf[i][1].x : a.sf[i][1].y;
                const u32 zp0 = r < 2 ? a.zf[i][0].x : a.zf[i][0].y, zp1 = r < 2 ? a.zf[i][1].x : a.zf[i][1].y;
                const float s0 = h_f((u16)(sp0 >> (16 * (r & 1)))), s1 = h_f((u16)(sp1 >> (16 * (r & 1))));
                const float zc0 = h_f((u16)(zp0 >> (16 * (r & 1)))) - OFF;
                const float zc1 = h_f((u16)(zp1 >> (16 * (r & 1)))) - OFF;
#endif
                const u32 w0 = pick(a.cw[i][0], r), w1 = pick(a.cw[i][1], r);
                const u32 w2 = BITS >= 3 ? pick(a.cw[i][BITS >= 3 ? 2 : 0], r) : w0;
                const u32 w3 = BITS >= 4 ? pick(a.cw[i][BITS >= 4 ? 3 : 0], r) : w0;
                float p0, p1;
                dot(w0, w1, w2, w3, xp, p0, p1);
                acc[r] += s0 * (p0 - zc0 * sx0);
                acc[r] += s1 * (p1 - zc1 * sx1);
            }
        }
        a = b;
    }
    *(float4*)&red[warp][lane * 4] = make_float4(acc[0], acc[1], acc[2], acc[3]);

#if HAS_OUT
    // 4. the outliers of this thread's row in the block's buckets (the first OB per bucket loaded at
    //    once, the rest one by one), against the block's activations in shared memory
    {
        u32 oent[NCHM][OB];
#pragma unroll
        for (int c = 0; c < NCHM; ++c)
#pragma unroll
            for (int e = 0; e < OB; ++e) {
                const int j = os[c] + oh + e * H;
                oent[c][e] = j < oe[c] ? ent[j] : 0u;  // 0: the value +0
            }
        float outl = 0.f;
#pragma unroll
        for (int c = 0; c < NCHM; ++c) {
#pragma unroll
            for (int e = 0; e < OB; ++e) outl += outlier_term(oent[c][e], c, xs);
            for (int j = os[c] + oh + OB * H; j < oe[c]; j += H) outl += outlier_term(ent[j], c, xs);
        }
        red[WARPS + oh][orow] = outl;
    }
#endif

    // 5. warps (then the outlier sums) add in a fixed order; K splits through the workspace
    __syncthreads();
    for (int rr = tid; rr < 128; rr += THREADS) {
        const int n = tile * 128 + rr;
        if (n >= N) continue;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS + (HAS_OUT ? H : 0); ++w) v += red[w][rr];
        v *= 1.0f / XSC;
        if (KS == 1) {
            v += bias_at(bias, n);
            y[(size_t)m * N + n] = f_bf16(v);
        } else {
            ws[((size_t)kb * M + m) * N + n] = v;
        }
    }
    if (KS > 1) finish(bias, y, ws, cnt, M, N, KS, tile, m, &last);
}
"""


class CompileError(RuntimeError):
    """NVRTC could not build or load the kernel (the caller falls back to Triton)."""


@functools.lru_cache(maxsize=64)
def _kernel(bits: int, stat_bits: int, stat_group: int, cfg: CudaGemvConfig, has_perm: bool, has_out: bool,
            bias: int, device_index: int):
    (kern,) = build(source(bits, stat_bits, stat_group, cfg, has_perm, has_out, bias), ("spqr_gemv_cuda",),
                    device_index, "spqr CUDA GEMV")
    return kern


#: The first build failure of this process, if any: from then on the Triton kernels serve.
_FAILED: list[str] = []


def usable() -> bool:
    """False once a build of either CUDA kernel failed in this process (then the Triton kernels serve)."""
    return not _FAILED


def build(src: str, names: tuple[str, ...], device_index: int, what: str) -> tuple:
    """The kernels ``names`` of ``src`` built by NVRTC on that device; on failure the first one of the
    process is logged and recorded (:func:`usable`) and :class:`CompileError` raised."""
    try:
        with torch.cuda.device(device_index):
            return tuple(torch.cuda._compile_kernel(src, name) for name in names)
    except Exception as exc:  # noqa: BLE001 - any NVRTC / driver failure: report once, use Triton
        err = CompileError(f"{what}: NVRTC build failed ({str(exc).splitlines()[0][:200]})")
        if usable():
            log.warning("%s; the Triton kernels serve instead", err)
            _FAILED.append(str(err))
        raise err from exc


def one_step_blocks(t, cfg: CudaGemvConfig) -> int:
    """Blocks of one K step each that ``t`` would take (the GEMV's measure of a layer's size)."""
    return -(-t.out_features // ROWS) * -(-t.in_features // (32 * cfg.warps * cfg.units))


def grid(t, cfg: CudaGemvConfig, sms: int, m: int = 1) -> tuple[int, int]:
    """(K splits, K steps per block) at batch ``m``: about ``per_sm`` blocks per SM over the row tiles
    and activation rows, at most ``max_steps`` steps of ``warps * units`` units per block, whole outlier
    buckets per block, no empty split."""
    n_units = -(-t.in_features // 32)
    steps = -(-n_units // (cfg.warps * cfg.units))
    tiles = -(-t.out_features // ROWS)
    split = max(1, min(steps, round(cfg.per_sm * sms / (tiles * m))))
    per = min(cfg.max_steps, -(-steps // split))
    align = _bucket_align(cfg)
    per = max(align, per // align * align)
    return -(-steps // per), per


def heuristic(t, m: int, sms: int) -> CudaGemvConfig | None:
    """The launch for batch ``m`` (H200 sweep, 2026-11-29 14:53 UTC, BENCHMARKS.md "The CUDA GEMV for
    decode"), or None where the Triton GEMV was faster (elsewhere this one was ahead or level). 8 warps x
    2 units per step; a layer whose one-step blocks fit about 4 per SM (4096x4096, 1024x4096 at M = 1)
    runs one step per block (most blocks, least latency), a larger one up to 8 steps per block at ~2
    blocks per SM. At M = 3 the small layers stay on Triton."""
    cfg = CudaGemvConfig()
    blocks = one_step_blocks(t, cfg)
    if blocks <= 4 * sms:
        if m >= 3:
            return None
        if blocks * m <= 4 * sms:
            return replace(cfg, max_steps=1, per_sm=4.0)
    return cfg


def scratch_need(t, m: int, cfg: CudaGemvConfig, sms: int) -> tuple[int, int]:
    """(fp32 workspace elements, arrival counters) of one call at batch ``m`` (0, 0 without a K split)."""
    split, _ = grid(t, cfg, sms, m)
    return (split * m * t.out_features, -(-t.out_features // ROWS) * m) if split > 1 else (0, 0)


def launch(x2: torch.Tensor, t, bias: torch.Tensor | None, y: torch.Tensor, cfg: CudaGemvConfig, sms: int) -> None:
    """y [M, N] = x2 [M, K] (bf16, rows contiguous) @ W_s^T (+ bias) for the kernel layout ``t``
    (:class:`effllm_kernels.spqr.repack.SpqrKernelTensors` with its ``outlier_buckets``) on a device of
    ``sms`` SMs. Raises :class:`CompileError` when NVRTC cannot build the kernel."""
    from effllm_kernels.splitk import SCRATCH

    m, k = x2.shape
    n = t.out_features
    fp16_stats = t.stat_bits == STAT_FP16
    if bias is not None and (bias.dtype not in BIAS_CODES or bias.stride(-1) != 1):
        bias = bias.float().contiguous()
    split, steps = grid(t, cfg, sms, m)
    # shared memory and the prologue's loops are sized for max_steps: build for the steps this call takes
    cfg = replace(cfg, max_steps=min(cfg.max_steps, 1 << (steps - 1).bit_length()))
    tiles = -(-n // ROWS)
    kern = _kernel(t.bits, t.stat_bits, 16 if fp16_stats else t.stat_group, cfg, t.perm is not None,
                   t.nnz > 0, 0 if bias is None else BIAS_CODES[bias.dtype], x2.device.index or 0)
    if split > 1:
        ws, cnt = SCRATCH.get(x2.device, split * m * n, tiles * m)
    else:
        ws, cnt = y, y  # never read
    dummy = t.qweight  # for absent optional tensors: never read
    nb = tiles * -(-k // BUCKET) * ROWS + 1
    bptr, ent = (t.outlier_buckets[:nb], t.outlier_buckets[nb:]) if t.nnz else (dummy, dummy)
    args = [x2, t.perm if t.perm is not None else dummy, t.qweight, t.scale_q, t.zero_q,
            dummy if fp16_stats else t.scale_stats, dummy if fp16_stats else t.zero_stats, bptr, ent,
            bias if bias is not None else y, y, ws, cnt,
            m, n, k, x2.stride(0), t.n_groups, t.n_blocks, -(-k // 32), t.scale_q.shape[0], split, steps,
            -(-k // BUCKET)]
    with torch.cuda.device(x2.device):  # the module's context; the launch takes this device's current stream
        kern(grid=(tiles, split, m), block=(32 * cfg.warps, 1, 1), args=args)


__all__ = ["BIAS_CODES", "BUCKET", "CompileError", "CudaGemvConfig", "build", "grid", "heuristic", "launch", "one_step_blocks", "outlier_buckets",
           "pair_macros", "pairs_per_half", "scratch_need", "shared_bytes", "source", "unsupported_reason", "usable"]
