"""``torch.ops.effllm.spqr_linear``: the spqr linear layer as a torch custom op.

Registered with a fake (meta) implementation so that ``torch.compile`` traces through it with
``fullgraph=True`` and CUDA graphs (``mode="reduce-overhead"``, transformers' static-cache
``generate``) capture the Triton launch: eager decode pays ~40-60 us of host dispatch per launch,
a replayed graph none. The op takes the flattened :class:`SpqrTensors` fields; its body is the
dispatcher (``effllm_kernels.spqr._dispatch``), so ``EFFLLM_KERNELS`` still decides per call.
Registering needs torch only: no triton import, no CUDA initialisation.
"""

from __future__ import annotations

import torch

from effllm_kernels.spqr.layout import SpqrTensors
from effllm_kernels.spqr.repack import SpqrKernelTensors

OP_NAME = "effllm::spqr_linear"
META_FIELDS = SpqrTensors.INT_FIELDS  # in_features, out_features, bits, group_size, stat_bits, stat_group
#: The last meta entry says which layout the tensors are in: the stored one or the kernels' (repack.py).
STORED, KERNEL = 0, 1


def tensors_from_args(qweight: torch.Tensor, scale_q: torch.Tensor, zero_q: torch.Tensor,
                      scale_stats: torch.Tensor | None, zero_stats: torch.Tensor | None,
                      outlier_rowptr: torch.Tensor, outlier_col: torch.Tensor, outlier_val: torch.Tensor,
                      perm: torch.Tensor | None, meta: list[int],
                      outlier_buckets: torch.Tensor | None = None) -> SpqrTensors | SpqrKernelTensors:
    """Rebuild the layer of one op call (no validation: the caller's object was valid)."""
    kernel = len(meta) > len(META_FIELDS) and meta[len(META_FIELDS)] == KERNEL
    cls = SpqrKernelTensors if kernel else SpqrTensors
    t = cls(**dict(zip(META_FIELDS, meta[: len(META_FIELDS)], strict=True)), qweight=qweight, scale_q=scale_q,
            zero_q=zero_q, scale_stats=scale_stats, zero_stats=zero_stats, outlier_rowptr=outlier_rowptr,
            outlier_col=outlier_col, outlier_val=outlier_val, perm=perm)
    if kernel:
        t.outlier_buckets = outlier_buckets
    return t


def op_meta(t: SpqrTensors | SpqrKernelTensors) -> list[int]:
    """The op's ``meta`` argument: the integer fields, then the layout (STORED or KERNEL)."""
    return [int(getattr(t, f)) for f in META_FIELDS] + [KERNEL if isinstance(t, SpqrKernelTensors) else STORED]


def op_args(t: SpqrTensors | SpqrKernelTensors) -> tuple:
    """The op's arguments after ``x`` and before ``bias`` ... ``meta`` for one layer."""
    return (t.qweight, t.scale_q, t.zero_q, t.scale_stats, t.zero_stats, t.outlier_rowptr, t.outlier_col,
            t.outlier_val, t.perm, getattr(t, "outlier_buckets", None))


@torch.library.custom_op(OP_NAME, mutates_args=())
def spqr_linear_op(
    x: torch.Tensor, qweight: torch.Tensor, scale_q: torch.Tensor, zero_q: torch.Tensor,
    scale_stats: torch.Tensor | None, zero_stats: torch.Tensor | None, outlier_rowptr: torch.Tensor,
    outlier_col: torch.Tensor, outlier_val: torch.Tensor, perm: torch.Tensor | None,
    outlier_buckets: torch.Tensor | None, bias: torch.Tensor | None, meta: list[int],
) -> torch.Tensor:
    """x [..., K] -> [..., N] (see :func:`effllm_kernels.spqr.spqr_linear`)."""
    from effllm_kernels.spqr import _dispatch

    t = tensors_from_args(qweight, scale_q, zero_q, scale_stats, zero_stats, outlier_rowptr, outlier_col,
                          outlier_val, perm, meta, outlier_buckets)
    return _dispatch(x, t, bias)


@spqr_linear_op.register_fake
def _(x, qweight, scale_q, zero_q, scale_stats, zero_stats, outlier_rowptr, outlier_col, outlier_val, perm,
      outlier_buckets, bias, meta):
    return x.new_empty(*x.shape[:-1], meta[1])
