"""Pure-torch reference of the ``spqr`` format (the executable spec of :mod:`.layout`)."""

from __future__ import annotations

import torch

from effllm_kernels.packing import unpack_codes
from effllm_kernels.spqr.layout import STAT_FP16, SpqrTensors


def dequantize_statistics(t: SpqrTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """First-level (scale, zero), each fp32 [N, G]."""
    if t.stat_bits == STAT_FP16:
        return t.scale_q.float(), t.zero_q.float()
    g = t.n_groups
    block = torch.arange(t.out_features, device=t.qweight.device) // t.stat_group  # [N]
    out = []
    for q, stats in ((t.scale_q, t.scale_stats), (t.zero_q, t.zero_stats)):
        codes = unpack_codes(q, t.stat_bits, g).float()  # [N, G]
        st = stats.float()[block]  # [N, G, 2]
        out.append(st[..., 0] * (codes - st[..., 1]))
    return out[0], out[1]


def outlier_matrix(t: SpqrTensors) -> torch.Tensor:
    """The outliers as a dense fp32 [N, K] matrix in stored column order."""
    dense = torch.zeros(t.out_features, t.in_features, dtype=torch.float32, device=t.qweight.device)
    if t.nnz:
        counts = (t.outlier_rowptr[1:] - t.outlier_rowptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(t.out_features, device=dense.device), counts)
        cols = t.outlier_col.long() & 0xFFFF
        dense.index_put_((rows, cols), t.outlier_val.float(), accumulate=True)
    return dense


def dequantize_stored(t: SpqrTensors) -> torch.Tensor:
    """``W_s`` fp32 [N, K] in stored column order (codes, statistics and outliers)."""
    scale, zero = dequantize_statistics(t)
    gidx = torch.arange(t.in_features, device=t.qweight.device) // t.group_size  # [K]
    codes = unpack_codes(t.qweight, t.bits, t.in_features).float()
    return scale[:, gidx] * (codes - zero[:, gidx]) + outlier_matrix(t)


def dequantize(t: SpqrTensors) -> torch.Tensor:
    """The weight fp32 [N, K] in the original column order."""
    w = dequantize_stored(t)
    if t.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, t.perm.long()] = w
    return out


def spqr_linear_reference(x: torch.Tensor, t: SpqrTensors, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for x [..., K] -> [..., N] in x's dtype."""
    w = dequantize(t).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
