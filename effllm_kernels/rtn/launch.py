"""Launch the ``rtn`` Triton kernels: configuration heuristics and the host-side entry point."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from effllm_kernels.dispatch import interpreter_enabled
from effllm_kernels.rtn.prepare import RtnWeight
from effllm_kernels.rtn.triton_matmul import _rtn_gemv_kernel, _rtn_mma_kernel, _splitk_reduce_kernel
from effllm_kernels.splitk import SCRATCH, output_buffer

#: Exponent bits the decoders put above the codes, passed as a kernel argument (not a constant) so
#: that ptxas keeps them in a register: fp32 for ``_prmt_byte``, 16-bit pairs for ``unit_pair16``.
_MAGIC_F32 = {4: 0x3F000000, 8: 0x3F800000}
_MAGIC_PAIR = {torch.bfloat16: 0x3F003F00, torch.float16: 0x38003800}
#: Largest M served by the GEMV kernel; above it the tensor-core kernel.
GEMV_MAX_M = 1
#: Largest tile (rows x activation rows) whose split-K partials the last arriving program adds
#: itself (one launch); above it a reduce kernel does (H200: in-program reduction of 128 x 128
#: tiles made M = 128 up to 1.7x slower, the serial reduction being the launch's tail).
LAST_REDUCES_MAX_TILE = 64 * 64


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters: which kernel, its block sizes, the K split, warps and pipeline depth.

    ``pair`` (mma, 4-bit only): feed the raw decoded codes to the tensor cores and apply the group
    coefficients per group (cheap for few activation rows), instead of dequantizing each weight.
    """

    path: str  # "gemv" or "mma"
    block_m: int  # activation rows per program (1 for the GEMV)
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    pair: bool = False


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number keeps test grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(programs: int, n_chunks: int, below: int, target: int, cap: int) -> int:
    """K split: 1 when ``programs`` >= ``below``, else enough to bring them near ``target``.

    At most ``cap``, and at most one split per 2 chunks (each must amortise its pipeline fill).
    """
    if programs >= below:
        return 1
    return max(1, min(-(-target // programs), cap, n_chunks // 2))


def pick_config(m: int, weight: RtnWeight, device: torch.device) -> KernelConfig:
    """Heuristic launch configuration for an [m, K] input.

    Chosen from the ``--sweep`` of scripts/bench_rtn_matmul.py on an H200 (BENCHMARKS.md). M = 1:
    the GEMV, 16 rows per one-warp program (4-warp programs of 16-64 rows measured 16-115% slower
    on 14336x4096), split over K (still one launch, see ``triton_matmul``) only when the rows give
    fewer than 4 programs per SM. Above: the fp32-dequantizing tensor-core kernel (PAIR mode
    measured slower), 64 rows on 4 warps up to M = 64, else 128 x 128 tiles on 8 warps.
    """
    n, sms = weight.out_features, _sm_count(device)
    if m <= GEMV_MAX_M:
        programs = -(-n // 16) * m
        split = _split_for(programs, weight.n_chunks, 4 * sms, 8 * sms, 8)
        return KernelConfig("gemv", 1, 16, split, num_warps=1, num_stages=4)
    if m <= 64:
        block_m = max(16, triton.next_power_of_2(m))
        programs = -(-n // 64) * -(-m // block_m)
        split = _split_for(programs, weight.n_chunks, 8 * sms, 8 * sms, 4)
        return KernelConfig("mma", block_m, 64, split, num_warps=4, num_stages=3)
    programs = -(-n // 128) * -(-m // 128)
    if programs >= sms // 2:  # most SMs busy: only a long K loop (>= 32 chunks) pays for a split
        split = 2 if programs < sms and weight.n_chunks >= 32 else 1
    else:
        split = _split_for(programs, weight.n_chunks, sms // 2, 2 * sms, 16)
    return KernelConfig("mma", 128, 128, split, num_warps=8, num_stages=2)


def _units_per_group(weight: RtnWeight) -> int:
    """UPG: consecutive units of a chunk that always share a group (coefficients loaded once per UPG).

    Blocks of UPG units start at multiples of UPG * USPAN codes, so they stay inside one group
    exactly when UPG * USPAN divides group_size; a chunk holds 4 units, so UPG must divide 4.
    """
    return math.gcd(weight.group_size // weight.unit_span, 4)


def rtn_matmul_triton(
    x: torch.Tensor,
    weight: RtnWeight,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for x [..., K] (bf16 or fp16) -> [..., N] in x's dtype, fp32 accumulation.

    ``config`` overrides the heuristic (benchmarks and tests use it to reach every path); ``out``
    (contiguous, x's dtype, [..., N] elements) receives the result instead of a new tensor.
    """
    k, n = weight.in_features, weight.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in _MAGIC_PAIR:
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = output_buffer(out, m, n, x)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    cfg = config or pick_config(m, weight, x.device)
    chunks_per_split = -(-weight.n_chunks // cfg.split_k)
    split = -(-weight.n_chunks // chunks_per_split)  # drop empty splits
    n_blocks = triton.cdiv(n, cfg.block_n)
    m_blocks = m if cfg.path == "gemv" else triton.cdiv(m, cfg.block_m)
    if split > 1:
        ws, cnt = SCRATCH.get(x.device, split * m * n, n_blocks * m_blocks)
    else:
        ws, cnt = y, y  # never read
    interpret = interpreter_enabled()
    meta = dict(
        BITS=weight.bits, GROUP=weight.group_size, KC=weight.chunk_words, UPG=_units_per_group(weight),
        BN=cfg.block_n, EVEN_K=k % weight.chunk_codes == 0, USE_WS=split > 1, HAS_BIAS=bias is not None,
        INTERPRET=interpret, NUM_STAGES=cfg.num_stages, FAST=not interpret,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    b = bias if bias is not None else y  # never read without HAS_BIAS
    if b.stride(-1) != 1:
        b = b.contiguous()
    pair = cfg.path == "mma" and cfg.pair and weight.bits == 4
    magic = _MAGIC_PAIR[x.dtype] if pair else _MAGIC_F32[weight.bits]
    tail = (m, n, k, x2.stride(0), weight.n_groups, chunks_per_split, weight.n_chunks, magic, split)
    last_reduces = cfg.block_m * cfg.block_n <= LAST_REDUCES_MAX_TILE
    if cfg.path == "mma":
        grid = (n_blocks, split, m_blocks)
        _rtn_mma_kernel[grid](x2, weight.qweight, weight.coefs, b, y, ws, cnt, *tail,
                              BM=cfg.block_m, PAIR=pair, LAST_REDUCES=last_reduces, **meta)
    else:
        grid = (m, n_blocks, split)
        _rtn_gemv_kernel[grid](x2, weight.qweight, weight.coefs, b, y, ws, cnt, *tail,
                               LAST_REDUCES=last_reduces, **meta)
    if split > 1 and not last_reduces:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            ws, b, y, m * n, n, SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block, INTERPRET=interpret,
            num_warps=4,
        )
    return y.reshape(*x.shape[:-1], n)
