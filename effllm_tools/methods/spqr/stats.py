"""SpQR's grids: small-group min-max statistics, their second-level quantization, leave-one-out.

Pure tensor math (SpQR, arXiv 2306.03078, §4.1 "bilevel quantization" and §4.2 outliers; official
``quant_groups.py:Quantizer.find_params`` and ``spqr_engine.py:get_leave_one_out_error``).

Every statistic is rounded to exactly what the stored format holds (:mod:`effllm_kernels.spqr.layout`)
*before* any weight code is chosen, and dequantized with the same fp32 operations as
:mod:`effllm_kernels.spqr.reference`, so the checkpoint reproduces the in-memory weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm_kernels.spqr.layout import STAT_FP16

_TINY16 = torch.finfo(torch.float16).tiny
_ZP_RANGE = 2.0**14  # |zero-point| / step stays below this, so fp16 zero-points never overflow


@dataclass
class SecondLevel:
    """One first-level statistic vector [N] quantized over blocks of ``stat_group`` rows.

    ``codes`` [N] uint8 (None for fp16 statistics); ``stats`` [B, 2] fp16 (step, zero-point), None
    for fp16 statistics; ``values`` [N]: the statistic as stored (fp16 values, or
    ``step * (code - zero_point)``), fp32.
    """

    codes: torch.Tensor | None
    stats: torch.Tensor | None
    values: torch.Tensor


def quantize_statistic(v: torch.Tensor, stat_bits: int, stat_group: int) -> SecondLevel:
    """Min-max quantize ``v`` [N] to ``stat_bits`` over consecutive blocks of ``stat_group`` rows.

    Official ``Quantizer(qq_*_bits, perchannel=True, sym=False, round_zero=False)`` on
    ``v.reshape(-1, qq_groupsize)``: step = (max - min) / (2^b - 1), zero-point = -min / step (a
    float), both stored as fp16. The last block may be shorter. A block whose values are (almost)
    equal gets a step large enough to keep the fp16 zero-point finite (the reference would divide by
    zero there).
    """
    v = v.float()
    if stat_bits == STAT_FP16:
        return SecondLevel(None, None, v.to(torch.float16).float())
    n = v.numel()
    blocks = -(-n // stat_group)
    pad = blocks * stat_group - n
    vp = torch.nn.functional.pad(v, (0, pad)).reshape(blocks, stat_group)
    valid = (torch.arange(blocks * stat_group, device=v.device) < n).reshape(blocks, stat_group)
    lo = torch.where(valid, vp, torch.inf).amin(-1)
    hi = torch.where(valid, vp, -torch.inf).amax(-1)
    maxq = (1 << stat_bits) - 1
    absmax = torch.maximum(lo.abs(), hi.abs())
    step = torch.maximum((hi - lo) / maxq, absmax / _ZP_RANGE).clamp_min(_TINY16).to(torch.float16)
    zp = (-lo / step.float()).to(torch.float16)
    st, zf = step.float()[:, None], zp.float()[:, None]
    codes = torch.round(vp / st + zf).clamp_(0, maxq)
    values = st * (codes - zf)  # the reference's dequantization, operation for operation
    return SecondLevel(codes.reshape(-1)[:n].to(torch.uint8), torch.stack([step, zp], -1),
                       values.reshape(-1)[:n])


@dataclass
class GroupStats:
    """The grid of one group of columns for all N rows: stored scale and zero, each [N] fp32."""

    scale: SecondLevel
    zero: SecondLevel


def fit_group_grid(w: torch.Tensor, bits: int, stat_bits: int, stat_group: int) -> GroupStats:
    """Asymmetric min-max grid per row of ``w`` [N, g], with second-level quantized statistics.

    scale = (max - min) / (2^bits - 1) (1 where the row is constant, as in our RTN grid), then
    quantized; zero = -min / scale_q in code units, then quantized. Unlike the official code (which
    derives the zero from the unquantized scale) the zero is fitted on the scale as stored, so the
    row's minimum stays on the grid. With fp16 statistics this is exactly
    :func:`effllm_tools.methods.rtn.algorithm.fit_grid` (and so GPTQ's grid).
    """
    maxq = (1 << bits) - 1
    xmin = w.float().amin(1)
    xmax = w.float().amax(1)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > _TINY16, scale, torch.ones_like(scale))
    scale_q = quantize_statistic(scale, stat_bits, stat_group)
    zero_q = quantize_statistic(-xmin / scale_q.values, stat_bits, stat_group)
    return GroupStats(scale_q, zero_q)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float) and dequantized values of ``w`` [N, ...] on per-row grids ``scale``, ``zero`` [N, ...]."""
    codes = torch.round(w / scale + zero).clamp_(0, (1 << bits) - 1)
    return codes, scale * (codes - zero)


def _minmax_error(x: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """Sum over the last dim of ((RTN_minmax(x) - x) / d)^2, the grid fitted on that last dim."""
    maxq = (1 << bits) - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    _, deq = quantize_with(x, scale, -lo / scale, bits)
    return ((deq - x) / d).square().sum(-1)


def leave_one_out_gain(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """How much each weight's removal lowers its group's Hessian-weighted error, [N, g].

    For row n and weight j: err(all g weights on their own min-max grid) minus err(the other g-1
    weights on the grid fitted without j), errors weighted by 1 / d^2 with ``d`` [g] the group's
    ``diag(chol(H^-1))`` (SpQR §4.2; official ``get_leave_one_out_error``).
    """
    n, g = w.shape
    w = w.float()
    base = _minmax_error(w, d, bits)[:, None]  # [N, 1]
    if g < 2:
        return torch.zeros_like(w)
    idx = torch.arange(g, device=w.device)
    others = idx[1:] - (idx[:, None] >= idx[1:]).long()  # [g, g-1]: row j lists every index but j
    loo = _minmax_error(w[:, others], d[others], bits)  # [N, g]
    return base - loo
