"""Load-time repack of a stored ``spqr`` layer into the layout its Triton kernels read.

The stored layout (:mod:`.layout`) keeps each output row's codes and statistics codes as one bit
stream. The kernels give each thread a few *neighbouring output rows* of one 32-code unit, so the
repacked tensors put neighbouring rows next to each other (every tensor keeps its dtype and, up
to the padding of a ragged last unit, its size; each is an exact rearrangement of the stored one):

- ``qweight`` int32 [n_units * bits, N]: the stored words transposed, ``[u * bits + w, n]`` is
  word ``w`` of unit ``u`` (codes ``32u .. 32u + 31``) of row ``n``. A warp loads one word of 128
  neighbouring rows as 16-byte vectors, and decodes code ``j`` of a unit with a compile-time shift.
  The stored rows hold ``packed_words(K, bits)`` words; when K % 32 != 0 the last unit is padded
  with zero words (at most ``bits - 1`` words per row).
- ``scale_q`` / ``zero_q``: transposed, int32 [packed_words(G, stat_bits), N] (fp16 [G, N] for
  16-bit statistics): the statistic code of group g sits at the same bit of the same word row for
  every output row, so its shift is uniform across a warp.
- ``scale_stats`` / ``zero_stats``: fp16 [G, 2, n_blocks] (from [n_blocks, G, 2]): the (step,
  zero-point) planes of one group are contiguous over the second-level blocks of neighbouring rows.
- the CSR outliers and the permutation are unchanged.

:func:`unpack` inverts :func:`repack` bit-exactly, so a module that holds the repacked tensors
still saves the stored format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm_kernels.packing import packed_words
from effllm_kernels.spqr.layout import STAT_FP16, LayerFields, SpqrTensors


@dataclass
class SpqrKernelTensors(LayerFields):
    """One ``spqr`` layer in the kernels' layout (module docstring); fields named as in SpqrTensors."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    stat_bits: int
    stat_group: int
    qweight: torch.Tensor  # int32 [n_units * bits, N]
    scale_q: torch.Tensor  # int32 [S_ROW, N], or fp16 [G, N]
    zero_q: torch.Tensor
    scale_stats: torch.Tensor | None  # fp16 [G, 2, n_blocks]
    zero_stats: torch.Tensor | None
    outlier_rowptr: torch.Tensor
    outlier_col: torch.Tensor
    outlier_val: torch.Tensor
    perm: torch.Tensor | None = None

    @property
    def n_units(self) -> int:
        """32-code units per row (the last may be partly padding)."""
        return -(-self.in_features // 32)

    def average_bits(self) -> float:
        """Bits per parameter of the stored format (``SpqrTensors.average_bits``; padding not counted)."""
        return unpack(self).average_bits()


def repack_qweight(qweight: torch.Tensor, in_features: int, bits: int) -> torch.Tensor:
    """Stored codes int32 [N, packed_words(K, bits)] -> kernel layout int32 [n_units * bits, N]."""
    n_words = -(-in_features // 32) * bits
    q = qweight
    if q.shape[1] < n_words:
        q = torch.nn.functional.pad(q, (0, n_words - q.shape[1]))
    return q.t().contiguous()


def unpack_qweight(qweight_t: torch.Tensor, in_features: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`repack_qweight` (drops the zero padding words)."""
    return qweight_t[: packed_words(in_features, bits)].t().contiguous()


def _second_level_to_kernel(stats: torch.Tensor) -> torch.Tensor:
    return stats.permute(1, 2, 0).contiguous()  # [B, G, 2] -> [G, 2, B]


def _second_level_to_stored(stats: torch.Tensor) -> torch.Tensor:
    return stats.permute(2, 0, 1).contiguous()  # [G, 2, B] -> [B, G, 2]


def repack_field(name: str, value: torch.Tensor | None, meta: dict[str, int]) -> torch.Tensor | None:
    """One stored field in the kernel layout (the module docstring's list; other fields unchanged)."""
    if value is None:
        return None
    if name == "qweight":
        return repack_qweight(value, meta["in_features"], meta["bits"])
    if name in ("scale_q", "zero_q"):
        return value.t().contiguous()
    if name in ("scale_stats", "zero_stats"):
        return _second_level_to_kernel(value)
    return value


def unpack_field(name: str, value: torch.Tensor | None, meta: dict[str, int]) -> torch.Tensor | None:
    """Inverse of :func:`repack_field`."""
    if value is None:
        return None
    if name == "qweight":
        return unpack_qweight(value, meta["in_features"], meta["bits"])
    if name in ("scale_q", "zero_q"):
        return value.t().contiguous()
    if name in ("scale_stats", "zero_stats"):
        return _second_level_to_stored(value)
    return value


def repack(t: SpqrTensors) -> SpqrKernelTensors:
    """The kernel layout of a stored layer (new tensors on t's device; ``t`` is left as it is)."""
    t.validate()
    meta = t.meta()
    return SpqrKernelTensors(**meta, **{f: repack_field(f, getattr(t, f), meta) for f in t.TENSOR_FIELDS})


def unpack(k: SpqrKernelTensors) -> SpqrTensors:
    """The stored layer of a repacked one, bit-exact (inverse of :func:`repack`)."""
    meta = k.meta()
    return SpqrTensors(**meta, **{f: unpack_field(f, getattr(k, f), meta) for f in k.TENSOR_FIELDS})


__all__ = ["STAT_FP16", "SpqrKernelTensors", "repack", "repack_field", "unpack", "unpack_field"]
