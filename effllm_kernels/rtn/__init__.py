"""The ``rtn`` weight format's grouped dequantize-matmul: reference, Triton kernels, dispatcher.

Typical use by a quantized Linear module::

    from effllm_kernels.rtn import prepare_rtn_weight, rtn_linear

    prepared = prepare_rtn_weight(qweight, scales, zeros, bits, group_size, in_features)  # once, on load
    y = rtn_linear(x, qweight, scales, zeros, bits, group_size, in_features, bias, prepared=prepared)

``EFFLLM_KERNELS`` (auto | triton | reference, see :mod:`effllm_kernels.dispatch`) picks the
backend per call. The Triton module is imported only when the Triton path is taken, so importing
this package never needs triton nor initialises CUDA.
"""

from __future__ import annotations

import torch

from effllm_kernels.dispatch import choose_backend
from effllm_kernels.rtn.prepare import RtnWeight, layout_unsupported_reason, prepare_rtn_weight
from effllm_kernels.rtn.reference import dequantize, rtn_linear_reference

__all__ = [
    "RtnWeight", "dequantize", "prepare_rtn_weight", "rtn_linear", "rtn_linear_reference",
    "triton_unsupported_reason",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def triton_unsupported_reason(x: torch.Tensor, bits: int, group_size: int) -> str | None:
    """Why the Triton kernel cannot serve this call, or None when it can."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"activation dtype {x.dtype} (kernels take float16 or bfloat16)"
    return layout_unsupported_reason(bits, group_size)


def _check_prepared(prepared: RtnWeight, packed: torch.Tensor, bits: int, group_size: int, in_features: int) -> None:
    stored = (bits, group_size, in_features, packed.shape[0])
    held = (prepared.bits, prepared.group_size, prepared.in_features, prepared.out_features)
    if stored != held:
        raise ValueError(f"prepared weight (bits, group_size, K, N) = {held} does not match the call's {stored}")


def rtn_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    *,
    prepared: RtnWeight | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the ``rtn`` format; x [..., K] -> [..., N] in x's dtype.

    Args:
        x: activations [..., in_features]; the kernel takes float16/bfloat16 on CUDA.
        packed, scales, zeros, bits, group_size, in_features: the stored weight
            (``effllm_kernels.rtn.reference`` documents the format).
        bias: optional [N], any float dtype.
        prepared: the same weight from :func:`prepare_rtn_weight`, made once and held by the
            caller. The Triton path needs it; without it the weight is converted on every call
            (correct, but a full pass over the weight each time).

    Returns the kernel's result when ``effllm_kernels.dispatch.choose_backend`` picks Triton
    (fp32 accumulation, output rounded once), else :func:`rtn_linear_reference`'s.
    """
    backend = choose_backend("rtn_linear", x, triton_unsupported_reason(x, bits, group_size))
    if backend == "reference":
        return rtn_linear_reference(x, packed, scales, zeros, bits, group_size, in_features, bias)
    from effllm_kernels.rtn.launch import rtn_matmul_triton  # lazy: jit after TRITON_INTERPRET is set

    if prepared is None:
        prepared = prepare_rtn_weight(packed, scales, zeros, bits, group_size, in_features)
    else:
        _check_prepared(prepared, packed, bits, group_size, in_features)
    return rtn_matmul_triton(x, prepared, bias)
