"""The ``spqr`` weight format: its stored layout, pure-torch reference, Triton kernels, dispatcher.

Typical use by a quantized Linear module::

    from effllm_kernels.spqr import spqr_linear

    y = spqr_linear(x, t, bias)  # t: SpqrTensors (layout.py), x [..., K] -> [..., N]

``EFFLLM_KERNELS`` (auto | triton | reference, :mod:`effllm_kernels.dispatch`) picks the backend per
call. The kernels read the repacked layout of :mod:`.repack` (``repack(t)`` once at load time:
:class:`SpqrKernelTensors`, the same bytes rearranged; a stored layer is repacked per call). The
reference reads the stored layout (a repacked layer is unpacked first). Under ``torch.compile``
the call goes through the custom op ``torch.ops.effllm.spqr_linear`` (:mod:`.op`), which CUDA
graphs capture. Importing this package needs neither triton nor CUDA: the Triton modules are
imported on the first Triton call.
"""

from __future__ import annotations

import torch

from effllm_kernels.dispatch import choose_backend
from effllm_kernels.spqr.layout import FORMAT_VERSION, STAT_FP16, SpqrTensors
from effllm_kernels.spqr.op import op_args, op_meta, spqr_linear_op
from effllm_kernels.spqr.reference import dequantize, dequantize_stored, spqr_linear_reference
from effllm_kernels.spqr.repack import SpqrKernelTensors, repack, unpack

__all__ = [
    "FORMAT_VERSION", "STAT_FP16", "SpqrKernelTensors", "SpqrTensors", "dequantize", "dequantize_stored",
    "kernel_unsupported_reason",
    "repack", "spqr_linear", "spqr_linear_op", "spqr_linear_reference", "triton_unsupported_reason", "unpack",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


Layer = SpqrTensors | SpqrKernelTensors


def kernel_unsupported_reason(group_size: int) -> str | None:
    """Why the kernels cannot run this format, or None (groups of 8, 16 or a multiple of 32)."""
    if group_size in (8, 16) or group_size % 32 == 0:
        return None
    return f"group_size={group_size} (kernels need 8, 16 or a multiple of 32)"


def triton_unsupported_reason(x: torch.Tensor, t: Layer) -> str | None:
    """Why the Triton kernels cannot serve this call, or None when they can."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"activation dtype {x.dtype} (kernels take float16, bfloat16 or float32)"
    if (reason := kernel_unsupported_reason(t.group_size)) is not None:
        return reason
    if x.device != t.qweight.device:
        return f"x on {x.device} but the weight on {t.qweight.device}"
    return None


def _dispatch(x: torch.Tensor, t: Layer, bias: torch.Tensor | None) -> torch.Tensor:
    backend = choose_backend("spqr_linear", x, triton_unsupported_reason(x, t))
    if backend == "reference":
        return spqr_linear_reference(x, unpack(t) if isinstance(t, SpqrKernelTensors) else t, bias)
    from effllm_kernels.spqr.launch import spqr_matmul_triton  # lazy: jit after TRITON_INTERPRET is set

    return spqr_matmul_triton(x, t, bias)


def spqr_linear(x: torch.Tensor, t: Layer, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for one SpQR layer; x [..., K] -> [..., N] in x's dtype.

    The Triton kernels (fp32 accumulation, output rounded once) when ``choose_backend`` picks them,
    else :func:`spqr_linear_reference`. Under ``torch.compile`` the call is the custom op, so the
    compiled graph (and its CUDA graph) holds one opaque launch per layer.
    """
    if torch.compiler.is_compiling():
        return spqr_linear_op(x, *op_args(t), bias, op_meta(t))
    return _dispatch(x, t, bias)
