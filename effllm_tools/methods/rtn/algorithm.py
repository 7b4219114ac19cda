"""Round-to-nearest groupwise weight quantization: pure tensor math, no modules.

Grid per (output row, group of ``group_size`` input columns):
- asymmetric: min-max, ``scale = (max - min) / (2**bits - 1)``, ``zero = -min / scale`` kept as a
  float in code units (HQQ-style; an integer zero point would shift the grid off a min-max grid such
  as GGUF Q4_1's and lose accuracy);
- symmetric: GPTQ's convention, ``scale = 2 * absmax / (2**bits - 1)``, ``zero = 2**(bits - 1)``.
``W_hat = (code - zero) * scale``. The last group may be shorter than ``group_size`` (K=576, g=128).

Exact zeros (pruned weights, e.g. Wanda's 2:4) stay exact zeros with ``keep_zeros``: an asymmetric
group that holds an exact zero gets its zero point rounded to an integer code, so 0 lies on its grid
and quantizes to ``code == zero`` (dequantized ``(zero - zero) * scale = 0`` exactly); the symmetric
zero point ``2**(bits - 1)`` is an integer already. Groups without exact zeros keep the float zero
point. By default (``keep_zeros=None``) this applies only to a *sparse* weight, one with at least
``SPARSE_SHARE`` exact zeros, so a dense checkpoint's few incidental zeros (the demo model's Q4_1
grid holds 0.03%) never move its grids.
Statistics are rounded to their storage dtype *before* the codes are chosen, so the stored
checkpoint reproduces exactly the weights this function returns.
"""

from __future__ import annotations

import torch

SPARSE_SHARE = 0.01  # a weight with at least this share of exact zeros is treated as pruned


def is_sparse(w: torch.Tensor) -> bool:
    """Whether ``w`` holds at least ``SPARSE_SHARE`` exact zeros: a pruned weight, whose zeros the
    quantizers keep; fewer are incidental (module docstring)."""
    return bool(w.numel()) and float((w == 0).float().mean()) >= SPARSE_SHARE


def zero_counts(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[int, int]:
    """(exact zeros of a *sparse* input weight, how many of them the quantized weight keeps): the
    ``input_exact_zeros`` / ``exact_zeros_kept`` metrics, which tell whether a pruned input stays pruned.
    A weight that is not :func:`is_sparse` counts (0, 0): its few zeros are not a pruning mask."""
    if not is_sparse(w):
        return 0, 0
    zero = w == 0
    return int(zero.sum()), int((zero & (w_hat.to(zero.device) == 0)).sum())


def group_count(in_features: int, group_size: int) -> int:
    return (in_features + group_size - 1) // group_size


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> padded [N, G, g] view and a validity mask [G, g] (False in the ragged tail)."""
    n, k = w.shape
    g = group_count(k, group_size)
    pad = g * group_size - k
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(n, g, group_size)
    valid = (torch.arange(g * group_size, device=w.device) < k).reshape(g, group_size)
    return wp, valid


def fit_grid(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, stats_dtype: torch.dtype = torch.float16,
    keep_zeros: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [N, G] (in ``stats_dtype``) for weight [N, K]; ``keep_zeros``: integer zero
    points in the asymmetric groups that hold an exact zero (module docstring)."""
    maxq = (1 << bits) - 1
    wp, valid = _grouped(w.float(), group_size)
    xmin = torch.where(valid, wp, torch.inf).amin(-1)  # [N, G]
    xmax = torch.where(valid, wp, -torch.inf).amax(-1)
    if symmetric:
        scale = 2 * torch.maximum(xmin.abs(), xmax.abs()) / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        scale = (xmax - xmin) / maxq
    tiny = torch.finfo(stats_dtype).tiny
    scale = torch.where(scale > tiny, scale, torch.ones_like(scale)).to(stats_dtype)
    if not symmetric:
        zero = -xmin / scale.float()
        if keep_zeros:
            has_zero = ((wp == 0) & valid).any(-1)  # [N, G]; such a group has xmin <= 0 <= xmax
            zero = torch.where(has_zero, zero.round().clamp(0, maxq), zero)
        zero = zero.to(stats_dtype)
    return scale, zero.to(stats_dtype)


def quantize_to_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Nearest codes [N, K] uint8 for weight [N, K] on the given grid."""
    k = w.shape[1]
    gidx = torch.arange(k, device=w.device) // group_size
    q = torch.round(w.float() / scales.float()[:, gidx] + zeros.float()[:, gidx])
    return q.clamp_(0, (1 << bits) - 1).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] fp32 weight from codes and statistics."""
    gidx = torch.arange(codes.shape[1], device=codes.device) // group_size
    return (codes.float() - zeros.float()[:, gidx]) * scales.float()[:, gidx]


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, stats_dtype: torch.dtype = torch.float16,
    keep_zeros: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] uint8, scales and zeros [N, G]. ``group_size`` <= 0 means one group per row.

    With ``keep_zeros`` every exact zero of ``w`` dequantizes to an exact zero; ``None`` (the default)
    turns it on for sparse weights (at least ``SPARSE_SHARE`` exact zeros, e.g. a pruned layer).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if keep_zeros is None:
        keep_zeros = is_sparse(w)
    if group_size <= 0 or group_size > w.shape[1]:
        group_size = w.shape[1]
    scales, zeros = fit_grid(w, bits, group_size, symmetric, stats_dtype, keep_zeros=keep_zeros)
    codes = quantize_to_codes(w, scales, zeros, bits, group_size)
    if keep_zeros:
        gidx = torch.arange(w.shape[1], device=w.device) // group_size
        zero_codes = zeros.float()[:, gidx].round().to(torch.uint8)  # integral wherever w == 0
        codes = torch.where(w == 0, zero_codes, codes)
    return codes, scales, zeros


def average_bits(bits: int, group_size: int, in_features: int, stats_dtype: torch.dtype) -> float:
    """Exact storage bits per weight: codes plus one scale and one zero per group."""
    stat_bits = torch.finfo(stats_dtype).bits
    return bits + 2 * stat_bits * group_count(in_features, group_size) / in_features
