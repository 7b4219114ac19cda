"""Triton kernels for the ``rtn`` grouped dequantize-matmul: y = x @ W^T (+ bias).

W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g], read from the prepared layout of
:mod:`effllm_kernels.rtn.prepare`: each program walks K one chunk of ``KC`` words per row at a
time; the 4 units of that word tile each decode (``triton_decode``) into ``USPAN`` consecutive
codes inside one group.

* ``_rtn_gemv_kernel`` (decode, small M): fp32 FMAs of the decoded ``F0 + q/256`` values with x
  into a [BN, KC] accumulator; per group one multiply by ``cs`` and a correction ``zcs * sum(x)``.
* ``_rtn_mma_kernel`` (tensor cores): the decoded [BN, USPAN] tile is the A operand of ``tl.dot``
  against the [USPAN, BM] activation slice ("swap AB": weight rows fill the tensor core's 64-row
  side, activation rows its narrow side). PAIR mode (4-bit): the tile is the raw ``0.5 + q/256``
  in bf16/fp16 (exact; two codes per instruction) and the group coefficients are applied to the
  per-group partial product, with the activation group sums taken from the loaded x tiles. Otherwise
  the tile is dequantized in fp32 (``f * cs - zcs``, one FMA) and rounded to the activation dtype.

All accumulate in fp32. A split of K over a grid axis stays ONE launch: each program writes its
fp32 partial tile to a workspace and bumps a per-tile arrival counter; the last program to arrive
adds the SPLIT partials in split order (deterministic), writes y and resets the counter to zero for
the next call (``effllm_kernels.splitk.finish``). Large tensor-core tiles (``launch.LAST_REDUCES_MAX_TILE``)
instead leave the partials to ``_splitk_reduce_kernel`` (a second launch, spread over all SMs).
``launch.py`` picks the configuration; ``effllm_kernels.splitk`` holds the scratch buffers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from effllm_kernels.rtn.triton_decode import field_f32, group_coeffs, nibbles, unit_f32, unit_pair16
from effllm_kernels.splitk import finish as _finish
from effllm_kernels.splitk import to_out_dtype as _to_out_dtype


@triton.jit
def _rtn_gemv_kernel(
    x_ptr, qw_ptr, c_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, n_groups, chunks_per_split, n_chunks, magic, split,
    BITS: tl.constexpr, GROUP: tl.constexpr, KC: tl.constexpr, UPG: tl.constexpr, BN: tl.constexpr,
    EVEN_K: tl.constexpr, USE_WS: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
    NUM_STAGES: tl.constexpr, FAST: tl.constexpr, LAST_REDUCES: tl.constexpr = True,
):
    """One program: rows [BN] for activation row ``m`` over chunks [chunks_per_split] of K.

    The activation rows of one weight block are neighbouring programs (axis 0), so for M > 1 the
    re-read weight tiles come from L2.
    """
    H: tl.constexpr = 32 // BITS // 4  # halves per unit: 2 for 4-bit (even / odd codes)
    USPAN: tl.constexpr = KC * H
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    w_ptrs = qw_ptr + rn[:, None] * (n_chunks * KC) + tl.arange(0, KC)[None, :]
    acc = tl.zeros([BN, KC], dtype=tl.float32)  # sum over groups of cs * sum_k f * x
    corr = tl.zeros([BN], dtype=tl.float32)  # sum over groups of zcs * sum_k x
    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, n_chunks)
    for c in tl.range(c_begin, c_end, num_stages=NUM_STAGES):
        words = tl.load(w_ptrs + c * KC, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
        nib_even, nib_odd = nibbles(words, BITS, FAST)
        for gu in tl.static_range(4 // UPG):
            k0 = c * (4 * USPAN) + gu * (UPG * USPAN)
            part = tl.zeros([BN, KC], dtype=tl.float32)
            xs = tl.zeros([1, KC], dtype=tl.float32)
            for uu in tl.static_range(UPG):
                # The unit's USPAN activations as [1, KC, H] (code i*H + h): each thread loads the
                # 4*H consecutive values of its own 4 words in one vector, in the words' layout.
                kk = k0 + uu * USPAN + H * tl.arange(0, KC)[None, :, None] + tl.arange(0, H)[None, None, :]
                if EVEN_K:
                    xu = tl.load(x_ptr + m * stride_xm + kk).to(tl.float32)
                else:
                    xu = tl.load(x_ptr + m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
                if H == 2:
                    x_even, x_odd = tl.split(xu)  # [1, KC] each: the codes of nibbles u and u + 4
                    part += field_f32(words, nib_even, nib_odd, magic, gu * UPG + uu, BITS, FAST) * x_even
                    part += field_f32(words, nib_even, nib_odd, magic, gu * UPG + uu + 4, BITS, FAST) * x_odd
                    xs += x_even + x_odd
                else:
                    xj = tl.reshape(xu, (1, KC))
                    part += field_f32(words, nib_even, nib_odd, magic, gu * UPG + uu, BITS, FAST) * xj
                    xs += xj
            cs, zcs = group_coeffs(c_ptr, k0, N, n_groups, rn, n_mask, GROUP)
            acc += part * cs[:, None]
            corr += tl.sum(tl.sum(xs, axis=1), axis=0) * zcs
    out = tl.sum(acc, axis=1) - corr  # [BN]
    _finish(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, m * N + rn, m * N + rn, M * N, pid_k, split,
            m * tl.num_programs(1) + pid_n, rn, n_mask, USE_WS, LAST_REDUCES, HAS_BIAS, INTERPRET)


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b; the interpreter cannot do bf16 arithmetic, so it gets fp32 operands."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _rtn_mma_kernel(
    x_ptr, qw_ptr, c_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, n_groups, chunks_per_split, n_chunks, magic, split,
    BITS: tl.constexpr, GROUP: tl.constexpr, KC: tl.constexpr, UPG: tl.constexpr, BN: tl.constexpr,
    BM: tl.constexpr, PAIR: tl.constexpr, EVEN_K: tl.constexpr, USE_WS: tl.constexpr,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr, FAST: tl.constexpr,
    LAST_REDUCES: tl.constexpr = True,
):
    """One program: acc[BN, BM] = W[rows] @ x[acts]^T over chunks [chunks_per_split] of K."""
    H: tl.constexpr = 32 // BITS // 4
    USPAN: tl.constexpr = KC * H
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, USPAN)
    n_mask = rn < N
    m_mask = rm < M
    w_ptrs = qw_ptr + rn[:, None] * (n_chunks * KC) + tl.arange(0, KC)[None, :]
    x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]  # [USPAN, BM], x transposed
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, n_chunks)
    for c in tl.range(c_begin, c_end, num_stages=NUM_STAGES):
        words = tl.load(w_ptrs + c * KC, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
        nib_even, nib_odd = nibbles(words, BITS, FAST and not PAIR)
        for gu in tl.static_range(4 // UPG):
            k0 = c * (4 * USPAN) + gu * (UPG * USPAN)
            cs, zcs = group_coeffs(c_ptr, k0, N, n_groups, rn, n_mask, GROUP)
            part = tl.zeros([BN, BM], dtype=tl.float32)
            xsum = tl.zeros([BM], dtype=tl.float32)
            for uu in tl.static_range(UPG):
                kx = k0 + uu * USPAN
                if EVEN_K:
                    xt = tl.load(x_ptrs + kx, mask=m_mask[None, :], other=0.0)
                else:
                    xt = tl.load(x_ptrs + kx, mask=m_mask[None, :] & (kx + rk < K)[:, None], other=0.0)
                if PAIR:
                    part = _dot(unit_pair16(words, magic, gu * UPG + uu, DT), xt, part, INTERPRET)
                    xsum += tl.sum(xt.to(tl.float32), axis=0)  # the group's activation sums, in-program
                else:
                    f = unit_f32(words, nib_even, nib_odd, magic, gu * UPG + uu, BITS, FAST)
                    w = f * cs[:, None] - zcs[:, None]  # [BN, USPAN] dequantized, fp32
                    if INTERPRET:  # no bf16 rounding of w there (the interpreter truncates)
                        acc = _dot(w, xt, acc, INTERPRET)
                    else:
                        acc = tl.dot(w.to(DT), xt, acc)
            if PAIR:
                acc += part * cs[:, None]  # two FMAs per element and group
                acc -= zcs[:, None] * xsum[None, :]
    mask = n_mask[:, None] & m_mask[None, :]
    offs = rm[None, :] * N + rn[:, None]
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, b_ptr, offs, offs, M * N, pid_k, split,
            pid_m * tl.num_programs(0) + pid_n, rn[:, None], mask, USE_WS, LAST_REDUCES, HAS_BIAS, INTERPRET)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, b_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """y[m, n] = sum over splits of ws[split, m, n] (+ bias[n]), cast to y's dtype (large-tile split-K)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    out = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        out += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _to_out_dtype(out, y_ptr, INTERPRET), mask=mask)
