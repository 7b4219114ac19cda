"""Launch the ``spqr`` Triton kernels: configuration heuristics and the host-side entry point."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from effllm_kernels.dispatch import interpreter_enabled
from effllm_kernels.splitk import SCRATCH, output_buffer
from effllm_kernels.spqr import cuda_gemv, cuda_mma, kernel_unsupported_reason
from effllm_kernels.spqr.layout import STAT_FP16, SpqrTensors
from effllm_kernels.spqr.pair_asm import BF16_SCALE
from effllm_kernels.spqr.repack import SpqrKernelTensors, repack
from effllm_kernels.spqr.scratch import x_scratch

#: Largest M served by the GEMV kernels (one pass per activation row); above it the tensor-core kernels (for
#: bf16 on CUDA the CUDA tensor-core kernel also takes some of M = 2-3: pick_config).
#: H200 (2026-11-29 06:04, table in BENCHMARKS.md; the GEMV's configuration before the 06:05 re-tune):
#: at M = 3 the GEMV takes 17.8 / 53.0 / 61.7 us on 4096x4096 / 14336x4096 / 4096x14336, the fp16
#: tensor-core kernel at M = 4 29.5 / 57.9 / 56.5 us (ahead only on 4096x14336).
GEMV_MAX_M = 3
#: Smallest M served by dequantizing the layer once per call and one cuBLAS matmul (:mod:`.triton_dequant`);
#: below it the fused kernels. H200 measurement: see pick_config. From 65 rows the tensor-core kernel runs
#: two 64-row tiles (the grid and split of M = 128, where the dequantize path was ahead on every shape).
DEQUANT_MIN_M = 65
#: Rows and slots per row of a program of the dequantize path's outlier scatter (:mod:`.triton_dequant`):
#: 128 rows x 4 slots left 32 programs walking ~45 dependent steps each on a 4096 x 14336 layer.
OUTLIER_SCATTER_ROWS, OUTLIER_SCATTER_SLOTS = 8, 64
#: In-features from which the fp16x2 GEMV takes the long-K configuration (pick_config).
LONG_K = 8192
#: The bits of fp32 1.0, a kernel argument (not a literal) so that ptxas keeps it in a register.
ONE_BITS = 0x3F800000
#: Outlier slots per row and step of the outlier loop, as elements of the [BN, R(, BM)] tile per thread.
OUTLIER_ELEMS_PER_THREAD = 16


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters: which kernel, block sizes, K split (in programs), warps, pipeline depth.

    ``host_perm`` (GEMV): gather x through the permutation once per call on the host side (one
    small extra launch) instead of in every program; the tensor-core kernel always does.
    ``cuda`` is the CUDA C++ GEMV (:mod:`.cuda_gemv`, NVRTC; :func:`cuda_unsupported_reason`),
    ``cuda_mma`` the CUDA C++ tensor-core kernel for 1-16 rows (:mod:`.cuda_mma`, NVRTC),
    ``gemv16`` the fp16x2 Triton GEMV (:mod:`.triton_gemv16`; :func:`gemv16_unsupported_reason`), ``mma16``
    the fp16 tensor-core kernel with the pair decode (:mod:`.triton_mma16`; :func:`mma16_unsupported_reason`),
    ``mma`` the older tensor-core kernel (bf16 dequantization, any format and activation dtype),
    ``dequant`` the dense W_s written once per call and one cuBLAS matmul (:mod:`.triton_dequant`; BN
    rows x C units per program of the dequantization kernel).
    """

    path: str  # "cuda", "cuda_mma", "gemv16", "gemv", "mma", "mma16" or "dequant"
    block_m: int  # activation rows per program (1 for the GEMVs)
    block_n: int  # weight rows per program
    units: int  # C: 32-code units per step of the K loop (BK = 32 * C codes)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    host_perm: bool = False
    rows: int = 4  # gemv16 / mma16: neighbouring rows per thread (R)
    prefetch: int = 1  # gemv16 (0-2) / mma16 (0-1): load step i + prefetch (0: i) before the math of step i
    outliers_first: bool = False  # gemv16: the outliers before the K loop instead of after it
    unroll: int = 1  # gemv16: K-loop unroll factor
    host_cast: bool = False  # mma16: x scaled and rounded to fp16 once per call on the host side
    cuda: cuda_gemv.CudaGemvConfig | None = None  # "cuda": the CUDA GEMV's launch (:mod:`.cuda_gemv`)
    cuda_mma: cuda_mma.CudaMmaConfig | None = None  # "cuda_mma": the CUDA tensor-core kernel's (:mod:`.cuda_mma`)


#: The dequantize path's kernel tile (64 rows x 4 units per program, 4 warps; pick_config).
DEQUANT_CONFIG = KernelConfig("dequant", 1, 64, 4, num_warps=4)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1); plain Python: ``triton.next_power_of_2`` is a
    constexpr function whose call wrapper costs microseconds per launch."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number keeps test grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(programs: int, n_steps: int, target: int, cap: int) -> int:
    """K split bringing ``programs`` near ``target`` (at most ``cap``, at least two steps per split)."""
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), cap, n_steps // 2))


def with_split(cfg: KernelConfig, m: int, t: SpqrTensors | SpqrKernelTensors, device: torch.device,
               per_sm: float | None = None, cap: int = 32) -> KernelConfig:
    """``cfg`` with the K split (at most ``cap``) that brings its programs near ``per_sm`` programs per
    SM (default: the occupancy target of its path)."""
    n_units = -(-t.in_features // 32)
    gemv = cfg.path.startswith("gemv")
    programs = -(-t.out_features // cfg.block_n) * (m if gemv else -(-m // cfg.block_m))
    if per_sm is None:  # the sweep at BM = 64 for mma16: split 2 (14336 x 4096), 7-8 (N = 4096)
        per_sm = 1.5 if cfg.path == "mma16" and cfg.block_m > 16 else {"gemv16": 3, "gemv": 8}.get(cfg.path, 4)
    target = int(per_sm * _sm_count(device))
    return replace(cfg, split_k=_split_for(programs, -(-n_units // cfg.units), target, cap))


def pick_config(m: int, t: SpqrTensors | SpqrKernelTensors, device: torch.device,
                dtype: torch.dtype = torch.bfloat16, cuda: bool = True) -> KernelConfig:
    """Heuristic launch configuration for an [m, K] input.

    For bf16 activations on a CUDA device the CUDA C++ kernels where their sweeps had them ahead or
    level, each by its own launch heuristic: the tensor-core kernel (:mod:`.cuda_mma`) at 2-16 rows
    (not small layers at 2-3 rows, nor the large ones at 2), then the GEMV (:mod:`.cuda_gemv`) up to
    GEMV_MAX_M rows (not the small layers at M = 3);
    ``cuda=False`` gives the Triton configuration they fall back to. The rest:

    From ``scripts/bench_spqr_matmul.py --sweep`` on the H200 (2026-11-29; 3-bit codes and
    statistics, 16/16 groups; 4096x4096, 14336x4096, 4096x14336). The fp16x2 GEMV (bf16 activations,
    2-4 bits, groups of 16): 256 rows x 2 units on 4 warps; K < LONG_K: loads one step ahead, the K loop
    unrolled by two, K split to ~3 programs per SM (06:05 sweep: 20.3 us on 14336x4096 against 26.9 us
    for prefetch 2 with the outliers first; 4096x4096 10.5-11.0 us, a tie); K >= LONG_K: loads two steps ahead,
    outliers before the K loop, ~6 programs per SM (4096x14336: 24.9 us at split 50, 45 after empty
    splits are dropped, against 26.8 us at split 25; the 4-bit layer was 2.6 us slower there, 31.3 us). The fp32 GEMV (other formats and
    activation dtypes): many small programs (128 rows x 2 units on 2 warps, K split to ~8 programs per SM). Above GEMV_MAX_M the fp16 tensor-core kernel (bf16 / fp16
    activations, 2-4 bits, groups of 16, statistics blocks of a multiple of 4 rows or fp16 statistics):
    128 rows x 2 units on 4 warps, 1 stage, loads one step ahead, x cast on the host; K split to ~4
    programs per SM at BM = 16 and ~1.5 above (05:50 UTC sweep: the best candidate of all six M = 16 /
    64 cases, or within 5% of it; BM = 32 was not swept; 1.2-1.45x faster than
    the older tensor-core kernel, which serves the other formats and fp32 activations: 128 rows x 2
    units on 4 warps, 3 stages, split to ~4 programs per SM). From DEQUANT_MIN_M rows on (any format and
    activation dtype): the dense W_s written once (64 rows x 4 units per program) and cuBLAS (2026-11-29
    08:56-09:05 UTC: ahead of mma16's best candidate at M = 128 on 4096x4096 / 14336x4096 / 4096x14336,
    44 / 135 / 143 us against 61 / 174 / 174, and 5x at M = 2048; behind it at M = 64, where mma16 needs one
    64-row tile: 42 / 95 / 103 us). At M = 65 / 96 / 127 (11:43 UTC) the dequantize path was ahead of every
    mma16 candidate on the three shapes (M = 65: 40 / 134 / 136 us against 57 / 168 / 154).
    """
    if m >= DEQUANT_MIN_M:
        return DEQUANT_CONFIG
    c = cuda_mma.heuristic(t, m, _sm_count(device)) if cuda else None
    if c is not None and cuda_unsupported_reason(dtype, t, device, m) is None:
        return KernelConfig("cuda_mma", 16, cuda_gemv.ROWS, 4, num_warps=8, cuda_mma=c)
    c = cuda_gemv.heuristic(t, m, _sm_count(device)) if cuda and m <= GEMV_MAX_M else None
    if c is not None and cuda_unsupported_reason(dtype, t, device) is None:
        return KernelConfig("cuda", 1, cuda_gemv.ROWS, c.units, num_warps=c.warps, cuda=c)
    if m <= GEMV_MAX_M and gemv16_unsupported_reason(dtype, t) is None:
        if t.in_features >= LONG_K:  # 4096 x 14336: twice the programs, loads two steps ahead
            cfg = KernelConfig("gemv16", 1, 256, 2, num_warps=4, num_stages=1, prefetch=2, outliers_first=True)
            return with_split(cfg, m, t, device, per_sm=6, cap=64)
        cfg = KernelConfig("gemv16", 1, 256, 2, num_warps=4, num_stages=1, prefetch=1, unroll=2)
        return with_split(cfg, m, t, device)
    if m <= GEMV_MAX_M:
        return with_split(KernelConfig("gemv", 1, 128, 2, num_warps=2, num_stages=2), m, t, device)
    bm = min(64, max(16, _pow2(m)))
    if mma16_unsupported_reason(dtype, t, 4, bm) is None:
        cfg = KernelConfig("mma16", bm, 128, 2, num_warps=4, num_stages=1, rows=4, prefetch=1, host_cast=True)
        return with_split(cfg, m, t, device)
    return with_split(KernelConfig("mma", bm, 128, 2, num_warps=4, num_stages=3), m, t, device)


def cuda_unsupported_reason(dtype: torch.dtype, t: SpqrTensors | SpqrKernelTensors,
                            device: torch.device, mma_m: int | None = None) -> str | None:
    """Why the CUDA GEMV (:mod:`.cuda_gemv`), or with ``mma_m`` the CUDA tensor-core kernel at that batch
    (:mod:`.cuda_mma`), cannot serve this layer, activation dtype and device, or None."""
    if device.type != "cuda" or interpreter_enabled():
        return f"device {device} (the CUDA kernels run on CUDA devices)"
    if not cuda_gemv.usable():
        return "an NVRTC build failed earlier in this process"
    if mma_m is not None:
        return cuda_mma.unsupported_reason(dtype, t, mma_m)
    return cuda_gemv.unsupported_reason(dtype, t)


#: Activation scale of the fp16x2 GEMV per activation dtype (pair_asm.BF16_SCALE; the rescale by 1 / XS
#: happens once per row in fp32).
GEMV16_XS = {torch.bfloat16: BF16_SCALE}


def gemv16_unsupported_reason(dtype: torch.dtype, t: SpqrTensors | SpqrKernelTensors,
                              rows: int = 4) -> str | None:
    """Why the fp16x2 GEMV cannot serve this layer and activation dtype, or None."""
    if dtype not in GEMV16_XS:
        return f"activations {dtype} (the fp16x2 GEMV takes {list(GEMV16_XS)})"
    if t.bits not in (2, 3, 4) or t.group_size != 16:
        return f"{t.bits}-bit codes in groups of {t.group_size} (it takes 2-4 bits, groups of 16)"
    if t.stat_bits != STAT_FP16 and t.stat_group % rows:
        return f"statistics blocks of {t.stat_group} rows ({rows} rows per thread must share one)"
    return None


#: Activation scale of the fp16 tensor-core kernel (:mod:`.triton_mma16`) per activation dtype.
MMA16_XS = {torch.bfloat16: BF16_SCALE, torch.float16: 1.0}


def mma16_unsupported_reason(dtype: torch.dtype, t: SpqrTensors | SpqrKernelTensors, rows: int = 4,
                             block_m: int = 16) -> str | None:
    """Why the fp16 tensor-core kernel cannot serve this layer, activation dtype and tile, or None."""
    if dtype not in MMA16_XS:
        return f"activations {dtype} (the fp16 tensor-core kernel takes {list(MMA16_XS)})"
    if block_m < 16:
        return f"block_m {block_m} (tl.dot needs >= 16)"
    return gemv16_unsupported_reason(torch.bfloat16, t, rows)


@functools.lru_cache(maxsize=4096)
def _cached_config(m: int, meta: tuple, device: torch.device, dtype: torch.dtype, cuda: bool = True) -> KernelConfig:
    """:func:`pick_config` memoised per (M, the layer's integer fields, device, dtype): it reads nothing
    else, and the host cost of an eager launch matters at batch 1."""
    return pick_config(m, SimpleNamespace(**dict(meta)), device, dtype, cuda)  # type: ignore[arg-type]


def _gemv16_slots(t: SpqrTensors | SpqrKernelTensors, split: int) -> int:
    """Outlier slots per row and step of the fp16x2 GEMV: ~1.5x a row's mean share per K split, so that
    most programs take one step of the outlier loop without loading many empty slots."""
    share = t.nnz / max(1, t.out_features) / split
    return max(2, min(16, _pow2(int(1.5 * share) + 1)))


def _slots(cfg: KernelConfig) -> int:
    """R: outlier slots per row and step, so that the outlier tile holds a few elements per thread."""
    per_slot = cfg.block_n * (cfg.block_m if cfg.path.startswith("mma") else 1)
    return max(1, min(64, _pow2(-(-OUTLIER_ELEMS_PER_THREAD * 32 * cfg.num_warps // per_slot))))


def _grid(cfg: KernelConfig, m: int, k: int, n: int) -> tuple[int, int, int, int]:
    """(K-loop steps per split, K splits without the empty ones, row blocks, activation blocks)."""
    n_units = -(-k // 32)
    steps = -(-n_units // cfg.units)
    steps_per_split = -(-steps // cfg.split_k)
    split = -(-steps // steps_per_split)  # drop empty splits
    m_blocks = -(-m // cfg.block_m) if cfg.path.startswith("mma") else m
    return steps_per_split, split, -(-n // cfg.block_n), m_blocks


def split_k_need(meta: dict[str, int], device: torch.device) -> tuple[int, int]:
    """:func:`_split_k_need` memoised per layer shape and format (every layer of a model calls it)."""
    return _split_k_need(tuple(sorted(meta.items())), torch.device(device))


@functools.lru_cache(maxsize=256)
def _split_k_need(meta_items: tuple, device: torch.device) -> tuple[int, int]:
    """(fp32 workspace elements, arrival counters) that the heuristic's split-K launches of one layer
    need at any M (bf16 / fp16 / fp32 activations): what :func:`effllm_kernels.spqr.scratch.reserve`
    allocates at load time, so that no call grows the buffers inside CUDA-graph capture.

    The split depends on M only through the activation blocks, so ``split * M`` peaks at the last M of
    each block count: M = 1..GEMV_MAX_M (the GEMVs), 16, 32, then every multiple of 64 until the
    programs alone reach the occupancy target (split 1 from there on), and DEQUANT_MIN_M - 1 (from
    DEQUANT_MIN_M on the dequantize path never splits)."""
    need = [0, 0]  # workspace elements, counters
    meta = dict(meta_items)
    t = SimpleNamespace(**meta)
    k, n = meta["in_features"], meta["out_features"]

    def split_at(m: int, dtype: torch.dtype) -> int:
        """The heuristic's split at M (recording what it needs when it splits)."""
        cfg = pick_config(m, t, device, dtype)  # type: ignore[arg-type]
        if cfg.path in ("cuda", "cuda_mma"):  # and the Triton kernel it falls back to
            ws, cnt = (cuda_gemv.scratch_need(t, m, cfg.cuda, _sm_count(device)) if cfg.path == "cuda"
                       else cuda_mma.scratch_need(t, m, cfg.cuda_mma, _sm_count(device)))
            need[:] = max(need[0], ws), max(need[1], cnt)
            cfg = pick_config(m, t, device, dtype, cuda=False)  # type: ignore[arg-type]
        _, split, n_blocks, m_blocks = _grid(cfg, m, k, n)
        if split > 1:
            need[:] = max(need[0], split * m * n), max(need[1], n_blocks * m_blocks)
        return split

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m in (*range(1, GEMV_MAX_M + 1), 16, 32, DEQUANT_MIN_M - 1):
            split_at(m, dtype)
        j = 1
        while 64 * j < DEQUANT_MIN_M and split_at(64 * j, dtype) > 1:
            j += 1
    return need[0], need[1]


def dequantize_triton(t: SpqrKernelTensors, dtype: torch.dtype, config: KernelConfig | None = None,
                      outliers: bool = True) -> torch.Tensor:
    """``W_s`` [N, K] in stored column order (codes, statistics and, unless ``outliers`` is False (a
    benchmark), the outliers) in ``dtype``, by the kernels of :mod:`.triton_dequant` (a new tensor per call)."""
    from effllm_kernels.spqr.triton_dequant import _spqr_dequant_kernel, _spqr_outlier_kernel

    cfg = config or DEQUANT_CONFIG
    k, n = t.in_features, t.out_features
    w = torch.empty(n, k, dtype=dtype, device=t.qweight.device)
    n_units = -(-k // 32)
    fp16_stats = t.stat_bits == STAT_FP16
    dummy = t.qweight
    interp = interpreter_enabled()
    _spqr_dequant_kernel[(-(-n // cfg.block_n), -(-n_units // cfg.units))](
        t.qweight, t.scale_q, t.zero_q, dummy if fp16_stats else t.scale_stats, dummy if fp16_stats else t.zero_stats,
        w, n, k, t.n_groups, t.n_blocks, n_units, ONE_BITS, BITS=t.bits, GROUP=t.group_size,
        STAT_BITS=t.stat_bits, STAT_GROUP=t.stat_group, BN=cfg.block_n, C=cfg.units, INTERPRET=interp,
        num_warps=cfg.num_warps)
    if t.nnz and outliers:  # few rows and many slots per program: every SM busy, few dependent round trips per row
        _spqr_outlier_kernel[(-(-n // OUTLIER_SCATTER_ROWS),)](
            t.outlier_rowptr, t.outlier_col, t.outlier_val, w, n, k, BN=OUTLIER_SCATTER_ROWS,
            R=OUTLIER_SCATTER_SLOTS, INTERPRET=interp, num_warps=4)
    return w


def dequant_matmul(x2: torch.Tensor, t: SpqrKernelTensors, bias: torch.Tensor | None, y: torch.Tensor,
                   cfg: KernelConfig) -> None:
    """y [M, N] = x2[:, perm] @ W_s^T (+ bias) through the dense W_s of :func:`dequantize_triton`
    and one ``torch.mm`` in x's dtype (cuBLAS on CUDA, under torch's matmul precision settings: reduced-
    precision bf16/fp16 reductions and TF32 apply as they do to a dense layer). Like the fused kernels it
    records no autograd graph."""
    w = dequantize_triton(t, x2.dtype, cfg)
    xp = x2.index_select(1, t.perm) if t.perm is not None else x2
    with torch.no_grad():  # mm(out=) refuses inputs that require grad
        if bias is None:
            torch.mm(xp, w.t(), out=y)
        else:
            torch.addmm(bias.to(x2.dtype), xp, w.t(), out=y)


def spqr_matmul_triton(
    x: torch.Tensor,
    t: SpqrTensors | SpqrKernelTensors,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[..., perm] @ W_s^T (+ bias)`` for x [..., K] -> [..., N] in x's dtype, fp32 accumulation.

    ``t`` should be the repacked layer (:func:`effllm_kernels.spqr.repack.repack`, done once at load
    time); a stored :class:`SpqrTensors` is repacked on every call (correct, but a copy per call).
    ``config`` overrides the heuristic (tests and benchmarks reach every path with it); ``out``
    (contiguous, x's dtype, [..., N] elements) receives the result instead of a new tensor.
    """
    if isinstance(t, SpqrTensors):
        t = repack(t, buckets=False)
    k, n = t.in_features, t.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the spqr weight expects {k}")
    reason = kernel_unsupported_reason(t.group_size)
    if reason is not None:
        raise ValueError(f"spqr Triton kernels: unsupported {reason}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = output_buffer(out, m, n, x)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    meta = tuple(t.meta().items())
    cfg = config or _cached_config(m, meta, x.device, x.dtype)
    if cfg.path in ("cuda", "cuda_mma"):
        reason = cuda_unsupported_reason(x.dtype, t, x.device, m if cfg.path == "cuda_mma" else None)
        if reason is None:
            xc = x2 if x2.stride(-1) == 1 else x2.contiguous()
            try:
                if cfg.path == "cuda":
                    cuda_gemv.launch(xc, t, bias, y, cfg.cuda, _sm_count(x.device))
                else:
                    cuda_mma.launch(xc, t, bias, y, cfg.cuda_mma, _sm_count(x.device))
                return y.reshape(*x.shape[:-1], n)
            except cuda_gemv.CompileError:
                if config is not None:
                    raise
        elif config is not None:
            raise ValueError(f"spqr CUDA kernel: unsupported {reason}")
        cfg = _cached_config(m, meta, x.device, x.dtype, False)  # the Triton kernel for this M
    if cfg.path == "dequant":
        dequant_matmul(x2, t, bias, y, cfg)
        return y.reshape(*x.shape[:-1], n)
    mma = cfg.path.startswith("mma")
    if cfg.path == "gemv16" and (reason := gemv16_unsupported_reason(x.dtype, t, cfg.rows)) is not None:
        raise ValueError(f"spqr fp16x2 GEMV: unsupported {reason}")
    if cfg.path == "mma16" and (reason := mma16_unsupported_reason(x.dtype, t, cfg.rows, cfg.block_m)) is not None:
        raise ValueError(f"spqr fp16 tensor-core kernel: unsupported {reason}")
    gather_in_kernel = t.perm is not None and not (mma or cfg.host_perm)
    if mma:  # [K, M], stored column order: one gather and transpose of x per call
        x2 = x2.t().index_select(0, t.perm) if t.perm is not None else x2.t().contiguous()
        if cfg.path == "mma16" and cfg.host_cast:  # fp16, scaled, padded to whole BM tiles (triton_mma16)
            xh = torch.empty((k, -(-m // cfg.block_m) * cfg.block_m), dtype=torch.float16, device=x.device)
            torch.mul(x2, MMA16_XS[x.dtype], out=xh[:, :m])
            if xh.shape[1] > m:  # zero padding: no NaN from stale memory ever reaches a product
                xh[:, m:].zero_()
            x2 = xh
    elif t.perm is not None and not gather_in_kernel:
        x2 = x2.index_select(1, t.perm)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_units = -(-k // 32)
    steps_per_split, split, n_blocks, m_blocks = _grid(cfg, m, k, n)
    if split > 1:
        ws, cnt = SCRATCH.get(x.device, split * m * n, n_blocks * m_blocks)
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
        m, n, k, x2.stride(0), t.n_groups, t.n_blocks, steps_per_split * cfg.units, n_units, split,
        ONE_BITS,
    )
    meta = dict(
        BITS=t.bits, GROUP=t.group_size, STAT_BITS=t.stat_bits, STAT_GROUP=t.stat_group,
        BN=cfg.block_n, C=cfg.units, R=_slots(cfg),
        HAS_OUTLIERS=t.nnz > 0, HAS_BIAS=bias is not None, USE_WS=split > 1,
        EVEN=k % (32 * cfg.units) == 0, INTERPRET=interpreter_enabled(), NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    from effllm_kernels.spqr.triton_kernels import _spqr_gemv_kernel, _spqr_mma_kernel

    if cfg.path == "gemv16":
        from effllm_kernels.spqr.pair_asm import dot_asm
        from effllm_kernels.spqr.triton_gemv16 import _spqr_gemv16_kernel

        asm, cons = dot_asm(t.bits)
        for key in ("GROUP", "C", "R", "EVEN", "NUM_STAGES"):
            del meta[key]
        xs, sx = x_scratch(x.device, m * n_units)
        _spqr_gemv16_kernel[(m, n_blocks, split)](
            *args, t.scale_q.shape[0], xs, sx, R=cfg.rows, C=cfg.units, RO=_gemv16_slots(t, split),
            XS=GEMV16_XS[x.dtype], HAS_PERM=gather_in_kernel, PREFETCH=cfg.prefetch, DOT_ASM=asm, DOT_CONS=cons,
            CP=min(32, _pow2(steps_per_split * cfg.units)), SPLIT_P2=_pow2(split),
            OUT_FIRST=cfg.outliers_first, UNROLL=cfg.unroll, **meta)
    elif cfg.path == "mma16":
        from effllm_kernels.spqr.pair_asm import decode_asm
        from effllm_kernels.spqr.triton_mma16 import _spqr_mma16_kernel

        asm, cons = decode_asm(t.bits)
        for key in ("GROUP", "C", "R", "EVEN"):
            del meta[key]
        _spqr_mma16_kernel[(n_blocks, split, m_blocks)](
            *args, t.scale_q.shape[0], BM=cfg.block_m, R=cfg.rows, RO=_slots(cfg), C=cfg.units,
            XS=MMA16_XS[x.dtype], PREFETCH=min(cfg.prefetch, 1), DEC_ASM=asm, DEC_CONS=cons, XH=cfg.host_cast, **meta)
    elif mma:
        _spqr_mma_kernel[(n_blocks, split, m_blocks)](*args, BM=cfg.block_m, **meta)
    else:
        _spqr_gemv_kernel[(m, n_blocks, split)](*args, HAS_PERM=gather_in_kernel, **meta)
    return y.reshape(*x.shape[:-1], n)
