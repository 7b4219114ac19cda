"""Pure-torch reference of the grouped dequantize-matmul (the executable spec).

Format: ``packed`` [N, ceil(K*bits/32)] int32 codes (see ``effllm_kernels.packing``),
``scales`` and ``zeros`` [N, ceil(K/group_size)] floating point. Weight element
``W[n, k] = (code[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]``; the last
group may be shorter (K=576 with group_size=128 gives groups 128,128,128,128,64).
"""

from __future__ import annotations

import torch

from effllm_kernels.packing import unpack_codes


def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    """Return the dense [N, K] weight in fp32 (exact for every statistics dtype)."""
    codes = unpack_codes(packed, bits, in_features).float()  # [N, K]
    gidx = torch.arange(in_features, device=packed.device) // group_size  # [K]
    return (codes - zeros.float()[:, gidx]) * scales.float()[:, gidx]


def rtn_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [..., K] -> [..., N] in x's dtype."""
    w = dequantize(packed, scales, zeros, bits, group_size, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
