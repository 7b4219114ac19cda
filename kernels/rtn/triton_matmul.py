"""Triton kernels for the ``rtn`` grouped dequantize-matmul: y = x @ W^T (+ bias).

W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g], read from the chunked planar layout
of :mod:`effllm_kernels.rtn.prepare`. Both kernels walk K one chunk of ``KC`` words per row at a
time; the ``PW = 32 // bits`` bit fields of that word tile are ``PW`` slices of ``KC`` consecutive
codes, each inside one group. A slice is dequantized with the float exponent trick: the field is
shifted under the mantissa of 1.0, which gives ``f = 1 + q * 2**-bits`` exactly (no int-to-float
conversion, which runs at a quarter of the FMA rate), and one FMA per weight,
``W = f * (s * 2**bits) - s * (2**bits + z)``, finishes the dequantization in fp32.

Two kernels:

* ``_rtn_gemv_kernel`` (decode, M <= 4): CUDA-core FMAs into a [BM, BN, KC] fp32 accumulator that
  is reduced over K once at the end; memory-bound, so it only has to keep enough loads in flight.
* ``_rtn_mma_kernel`` (M > 4): the dequantized [BN, KC] tile, in the activation dtype, is the A
  operand of ``tl.dot`` against the [KC, BM] activation slice ("swap AB": the weight rows fill the
  tensor core's 64-row side, the few activation rows its narrow side); fp32 accumulation.

Both split K over a second grid axis when the output alone gives too few programs; partial sums
then go to an fp32 workspace that ``_splitk_reduce_kernel`` sums (deterministic, no atomics).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from effllm_kernels.dispatch import interpreter_enabled
from effllm_kernels.rtn.prepare import RtnWeight


@triton.jit
def _group_coeffs(s_ptr, z_ptr, k0, N, n_groups, rn, n_mask, GROUP: tl.constexpr, BITS: tl.constexpr):
    """(s * 2**BITS, s * (2**BITS + z)) in fp32 for rows ``rn`` in the group holding code ``k0``."""
    g = k0 // GROUP
    mask = n_mask & ((rn * 0 + g) < n_groups)  # chunks past K (padding) read no scales and weigh zero
    s = tl.load(s_ptr + g * N + rn, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + rn, mask=mask, other=0.0).to(tl.float32)
    return s * (1 << BITS), s * ((1 << BITS) + z)


@triton.jit
def _dequant_slice(words, cs, zcs, J: tl.constexpr, BITS: tl.constexpr):
    """Bit field ``J`` of ``words`` [BN, KC] int32 -> W [BN, KC] fp32, given the group coefficients."""
    LOW: tl.constexpr = 23 - BITS  # lowest mantissa bit that the field lands on
    SHIFT: tl.constexpr = LOW - J * BITS
    if SHIFT >= 0:
        v = words << SHIFT
    else:
        v = words >> (-SHIFT)
    v = (v & (((1 << BITS) - 1) << LOW)) | 0x3F800000  # 1.0 with the code in the top mantissa bits
    f = v.to(tl.float32, bitcast=True)  # 1 + q * 2**-BITS, exact
    return f * cs[:, None] - zcs[:, None]


@triton.jit
def _to_out_dtype(out, y_ptr, INTERPRET: tl.constexpr):
    """fp32 -> y's dtype, rounded to nearest even (the interpreter truncates bf16: round by hand)."""
    if INTERPRET and y_ptr.dtype.element_ty == tl.bfloat16:
        b = out.to(tl.int32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
        out = b.to(tl.float32, bitcast=True)
    return out.to(y_ptr.dtype.element_ty)


@triton.jit
def _store_out(out, y_ptr, ws_ptr, b_ptr, y_offs, ws_offs, rn_b, mask, USE_WS: tl.constexpr,
               HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """Write a finished tile (+ bias, in y's dtype) or a split-K partial (fp32 workspace)."""
    if USE_WS:
        tl.store(ws_ptr + ws_offs, out, mask=mask)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + rn_b, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offs, _to_out_dtype(out, y_ptr, INTERPRET), mask=mask)


@triton.jit
def _rtn_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, stride_xm, n_groups, chunks_per_split, n_chunks,
    BITS: tl.constexpr, GROUP: tl.constexpr, KC: tl.constexpr, SPG: tl.constexpr,
    BN: tl.constexpr, EVEN_K: tl.constexpr, USE_WS: tl.constexpr,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program: rows [BN] for activation row ``m`` over chunks [chunks_per_split] of K.

    The activation rows of one weight block are neighbouring programs (axis 0), so for M > 1 the
    re-read weight tiles come from L2. Everything stays 2-D [BN, KC] in one register layout.
    """
    PW: tl.constexpr = 32 // BITS
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    ri = tl.arange(0, KC)
    n_mask = rn < N
    w_ptrs = qw_ptr + rn[:, None] * (n_chunks * KC) + ri[None, :]
    x_ptrs = x_ptr + m * stride_xm + ri
    acc = tl.zeros([BN, KC], dtype=tl.float32)
    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, n_chunks)
    for c in tl.range(c_begin, c_end, num_stages=NUM_STAGES):
        words = tl.load(w_ptrs + c * KC, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
        for gi in tl.static_range(PW // SPG):
            k0 = c * (KC * PW) + gi * (SPG * KC)
            cs, zcs = _group_coeffs(s_ptr, z_ptr, k0, N, n_groups, rn, n_mask, GROUP, BITS)
            for jj in tl.static_range(SPG):
                w = _dequant_slice(words, cs, zcs, gi * SPG + jj, BITS)  # [BN, KC]
                if EVEN_K:
                    xj = tl.load(x_ptrs + (k0 + jj * KC))
                else:
                    xj = tl.load(x_ptrs + (k0 + jj * KC), mask=k0 + jj * KC + ri < K, other=0.0)
                acc += w * xj.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)  # [BN]
    _store_out(out, y_ptr, ws_ptr, b_ptr, m * N + rn, (pid_k * M + m) * N + rn, rn, n_mask,
               USE_WS, HAS_BIAS, INTERPRET)


@triton.jit
def _rtn_mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, stride_xm, n_groups, chunks_per_split, n_chunks,
    BITS: tl.constexpr, GROUP: tl.constexpr, KC: tl.constexpr, SPG: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr, USE_WS: tl.constexpr,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program: acc[BN, BM] = W[rows] @ x[acts]^T over chunks [chunks_per_split] of K."""
    PW: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    ri = tl.arange(0, KC)
    n_mask = rn < N
    m_mask = rm < M
    w_ptrs = qw_ptr + rn[:, None] * (n_chunks * KC) + ri[None, :]
    x_ptrs = x_ptr + rm[None, :] * stride_xm + ri[:, None]  # [KC, BM], x transposed
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, n_chunks)
    for c in tl.range(c_begin, c_end, num_stages=NUM_STAGES):
        words = tl.load(w_ptrs + c * KC, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
        for gi in tl.static_range(PW // SPG):
            k0 = c * (KC * PW) + gi * (SPG * KC)
            cs, zcs = _group_coeffs(s_ptr, z_ptr, k0, N, n_groups, rn, n_mask, GROUP, BITS)
            for jj in tl.static_range(SPG):
                w = _dequant_slice(words, cs, zcs, gi * SPG + jj, BITS)  # [BN, KC] fp32
                kk = k0 + jj * KC + ri
                if EVEN_K:
                    x_mask = m_mask[None, :]
                else:
                    x_mask = m_mask[None, :] & (kk < K)[:, None]
                xt = tl.load(x_ptrs + (k0 + jj * KC), mask=x_mask, other=0.0)
                if INTERPRET:  # the interpreter cannot do bf16 arithmetic: fp32 operands there
                    acc = tl.dot(w, xt.to(tl.float32), acc)
                else:
                    acc = tl.dot(w.to(x_ptr.dtype.element_ty), xt, acc)
    mask = n_mask[:, None] & m_mask[None, :]
    _store_out(acc, y_ptr, ws_ptr, b_ptr, rm[None, :] * N + rn[:, None],
               (pid_k * M + rm[None, :]) * N + rn[:, None], rn[:, None], mask, USE_WS, HAS_BIAS, INTERPRET)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, b_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """y[m, n] = sum over splits of ws[split, m, n] (+ bias[n]), cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    out = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        out += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _to_out_dtype(out, y_ptr, INTERPRET), mask=mask)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters: which kernel, its block sizes, the K split, warps and pipeline depth."""

    path: str  # "gemv" or "mma"
    block_m: int  # activation rows per program (1 for the GEMV)
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


#: Largest M served by the GEMV kernel; above it the tensor-core kernel wins.
GEMV_MAX_M = 4


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number keeps test grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(programs: int, n_chunks: int, target: int, min_chunks: int) -> int:
    """K split that brings ``programs`` near ``target``, each split keeping >= ``min_chunks``."""
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), n_chunks // min_chunks))


def pick_config(m: int, weight: RtnWeight, device: torch.device) -> KernelConfig:
    """Heuristic launch configuration for an [m, K] input (see scripts/README.md for the tuning)."""
    n, sms = weight.out_features, _sm_count(device)
    if m <= GEMV_MAX_M:
        block_n = 32 if n >= 32 * 4 * sms else 16
        programs = -(-n // block_n) * m
        split = _split_for(programs, weight.n_chunks, 4 * sms, 2)
        return KernelConfig("gemv", 1, block_n, split, num_warps=1, num_stages=4)
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n, warps = (128, 8) if block_m >= 128 else (64, 4)
    programs = -(-n // block_n) * -(-m // block_m)
    split = _split_for(programs, weight.n_chunks, 2 * sms, 2)
    return KernelConfig("mma", block_m, block_n, split, num_warps=warps, num_stages=3 if block_m < 128 else 2)


def _slices_per_group(weight: RtnWeight) -> int:
    """SPG: consecutive slices of a chunk that always share a group (scales are loaded once per SPG).

    Blocks of SPG slices start at multiples of SPG * KC codes, so they stay inside one group exactly
    when SPG * KC divides group_size; chunks start at multiples of PW * KC, so SPG must divide PW.
    """
    return math.gcd(weight.group_size // weight.chunk_words, weight.codes_per_word)


def rtn_matmul_triton(
    x: torch.Tensor, weight: RtnWeight, bias: torch.Tensor | None = None, config: KernelConfig | None = None
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for x [..., K] (bf16 or fp16) -> [..., N] in x's dtype, fp32 accumulation.

    ``config`` overrides the heuristic (benchmarks and tests use it to reach every path).
    """
    k, n = weight.in_features, weight.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    cfg = config or pick_config(m, weight, x.device)
    chunks_per_split = -(-weight.n_chunks // cfg.split_k)
    split = -(-weight.n_chunks // chunks_per_split)  # drop empty splits
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    meta = dict(
        BITS=weight.bits, GROUP=weight.group_size, KC=weight.chunk_words, SPG=_slices_per_group(weight),
        BN=cfg.block_n, EVEN_K=k % weight.chunk_codes == 0, USE_WS=split > 1,
        HAS_BIAS=bias is not None, INTERPRET=interpreter_enabled(), NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.path == "mma":
        kernel, grid = _rtn_mma_kernel, (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
        meta["BM"] = cfg.block_m
    else:
        kernel, grid = _rtn_gemv_kernel, (m, triton.cdiv(n, cfg.block_n), split)
    b = bias.contiguous() if bias is not None else y  # never read without HAS_BIAS
    kernel[grid](
        x2, weight.qweight, weight.scales, weight.zeros, b, y, ws,
        m, n, k, x2.stride(0), weight.n_groups, chunks_per_split, weight.n_chunks, **meta,
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            ws, b, y, m * n, n, SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block,
            INTERPRET=meta["INTERPRET"], num_warps=4,
        )
    return y.reshape(*x.shape[:-1], n)
