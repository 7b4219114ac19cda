"""Launch the ``spqr`` Triton kernels: configuration heuristics and the host-side entry point."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

from effllm_kernels.dispatch import interpreter_enabled
from effllm_kernels.rtn.launch import _SCRATCH
from effllm_kernels.spqr.layout import STAT_FP16, SpqrTensors
from effllm_kernels.spqr.triton_spqr import _spqr_gemv_kernel, _spqr_mma_kernel

#: Largest M served by the GEMV kernel (one pass per activation row); above it the tensor-core
#: kernel. H200 sweep (2026-11-28): GEMV M=1 24-74 us vs mma M=16 82-292 us on the Llama shapes, so
#: the GEMV stays ahead while M * t(M=1) < t(mma); M=2..3 is extrapolated, not measured.
GEMV_MAX_M = 3
#: Outlier slots per row and step of the outlier loop, as elements of the [BN, R(, BM)] tile per thread.
OUTLIER_ELEMS_PER_THREAD = 16


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters: which kernel, block sizes, K split (in programs), warps, pipeline depth."""

    path: str  # "gemv" or "mma"
    block_m: int  # activation rows per program (1 for the GEMV)
    block_n: int  # weight rows per program
    units: int  # C: 32-code units per step of the K loop (BK = 32 * C codes)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number keeps test grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(programs: int, n_steps: int, target: int, cap: int) -> int:
    """K split bringing ``programs`` near ``target`` (at most ``cap``, at least one step per split)."""
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), cap, n_steps))


def with_split(cfg: KernelConfig, m: int, t: SpqrTensors, device: torch.device) -> KernelConfig:
    """``cfg`` with the K split that brings its programs near the occupancy target of its path."""
    n_units = -(-t.in_features // 32)
    programs = -(-t.out_features // cfg.block_n) * (m if cfg.path == "gemv" else -(-m // cfg.block_m))
    target = (8 if cfg.path == "gemv" else 4) * _sm_count(device)
    cap = 16 if cfg.path == "gemv" else 8
    return replace(cfg, split_k=_split_for(programs, -(-n_units // cfg.units), target, cap))


def pick_config(m: int, t: SpqrTensors, device: torch.device) -> KernelConfig:
    """Heuristic launch configuration for an [m, K] input.

    The fastest candidates of ``scripts/bench_spqr_matmul.py --sweep`` on the H200 (4096x4096,
    14336x4096, 4096x14336; 3- and 4-bit): GEMV 64 rows x 2 units per step on 2 warps (split to ~8
    programs per SM); tensor cores 128 rows x 2 units on 8 warps for M = 16 and 64.
    """
    if m <= GEMV_MAX_M:
        return with_split(KernelConfig("gemv", 1, 64, 2, num_warps=2, num_stages=2), m, t, device)
    bm = min(64, max(16, triton.next_power_of_2(m)))
    return with_split(KernelConfig("mma", bm, 128, 2, num_warps=8, num_stages=2), m, t, device)


def _slots(cfg: KernelConfig) -> int:
    """R: outlier slots per row and step, so that the outlier tile holds a few elements per thread."""
    per_slot = cfg.block_n * (cfg.block_m if cfg.path == "mma" else 1)
    return max(1, min(64, triton.next_power_of_2(-(-OUTLIER_ELEMS_PER_THREAD * 32 * cfg.num_warps // per_slot))))


def _output(out: torch.Tensor | None, m: int, n: int, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if out.dtype != x.dtype or out.device != x.device or out.numel() != m * n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of {m}x{n} elements on {x.device}")
    return out.view(m, n)


def spqr_matmul_triton(
    x: torch.Tensor,
    t: SpqrTensors,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[..., perm] @ W_s^T (+ bias)`` for x [..., K] -> [..., N] in x's dtype, fp32 accumulation.

    ``config`` overrides the heuristic (tests and benchmarks reach every path with it); ``out``
    (contiguous, x's dtype, [..., N] elements) receives the result instead of a new tensor.
    """
    k, n = t.in_features, t.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the spqr weight expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = _output(out, m, n, x)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    cfg = config or pick_config(m, t, x.device)
    n_units = -(-k // 32)
    steps = -(-n_units // cfg.units)
    steps_per_split = -(-steps // cfg.split_k)
    split = -(-steps // steps_per_split)  # drop empty splits
    units_per_split = steps_per_split * cfg.units
    n_blocks = triton.cdiv(n, cfg.block_n)
    m_blocks = m if cfg.path == "gemv" else triton.cdiv(m, cfg.block_m)
    if split > 1:
        ws, cnt = _SCRATCH.get(x.device, split * m * n, n_blocks * m_blocks)
    else:
        ws, cnt = y, y  # never read
    fp16_stats = t.stat_bits == STAT_FP16
    dummy = t.qweight  # for absent optional tensors: never read
    b = bias if bias is not None else y
    if b.stride(-1) != 1:
        b = b.contiguous()
    args = (
        x2, t.perm if t.perm is not None else dummy, t.qweight, t.scale_q, t.zero_q,
        dummy if fp16_stats else t.scale_stats, dummy if fp16_stats else t.zero_stats,
        t.outlier_rowptr, t.outlier_col, t.outlier_val, b, y, ws, cnt,
        m, n, k, x2.stride(0), t.qweight.shape[1], 1 if fp16_stats else t.scale_q.shape[1], t.n_groups,
        units_per_split, n_units, split,
    )
    meta = dict(
        BITS=t.bits, GROUP=t.group_size, STAT_BITS=t.stat_bits, STAT_GROUP=t.stat_group,
        ONE_BLOCK=t.stat_group % cfg.block_n == 0, BN=cfg.block_n, C=cfg.units, R=_slots(cfg),
        HAS_PERM=t.perm is not None, HAS_OUTLIERS=t.nnz > 0, HAS_BIAS=bias is not None, USE_WS=split > 1,
        EVEN=k % (32 * cfg.units) == 0,
        INTERPRET=interpreter_enabled(), NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.path == "mma":
        _spqr_mma_kernel[(n_blocks, split, m_blocks)](*args, BM=cfg.block_m, **meta)
    else:
        _spqr_gemv_kernel[(m, n_blocks, split)](*args, **meta)
    return y.reshape(*x.shape[:-1], n)
