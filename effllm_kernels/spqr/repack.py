"""Load-time repack of a stored ``spqr`` layer into the layout its Triton kernels read.

The stored layout (:mod:`.layout`) keeps each output row's codes and statistics codes as one bit
stream. The kernels give each thread a few *neighbouring output rows* of one 32-code unit, so the
repacked tensors put neighbouring rows next to each other (every tensor keeps its dtype and, up
to the padding of a ragged last unit, its size; each is an exact rearrangement of the stored one):

- ``qweight`` int32 [n_units * bits, N]: the stored words transposed, ``[u * bits + w, n]`` is
  word ``w`` of unit ``u`` (codes ``32u .. 32u + 31``) of row ``n``. A warp loads one word of 128
  neighbouring rows as 16-byte vectors, and decodes code ``j`` of a unit with a compile-time shift.
  The stored rows hold ``packed_words(K, bits)`` words; when K % 32 != 0 the last unit is padded
  with zero words (at most ``bits - 1`` words per row). 3-bit units are also *paired*
  (:func:`paired_position`): the 96 bits of a unit are reordered so that codes ``2p`` and ``2p + 1``
  sit at the same offset of the two 16-bit halves of one word, where one LOP3 turns them into an
  fp16x2 (the fp16x2 GEMV, :mod:`.triton_gemv16`); 2- and 4-bit units already pair codes of one
  group at offsets ``s`` and ``s + 16`` and keep the stored bit order.
- ``scale_q`` / ``zero_q``: transposed, int32 [packed_words(G, stat_bits), N] (fp16 [G, N] for
  16-bit statistics): the statistic code of group g sits at the same bit of the same word row for
  every output row, so its shift is uniform across a warp.
- ``scale_stats`` / ``zero_stats``: fp16 [G, 2, n_blocks] (from [n_blocks, G, 2]): the (step,
  zero-point) planes of one group are contiguous over the second-level blocks of neighbouring rows.
- the CSR outliers and the permutation are unchanged; on CUDA the layer also gets a bucketed copy
  of its outliers, ``outlier_buckets`` (:func:`effllm_kernels.spqr.cuda_gemv.outlier_buckets`: one
  32-bit word per outlier plus row pointers per 128-row tile and 512 columns), which the CUDA kernels read.

:func:`unpack` inverts :func:`repack` bit-exactly, so a module that holds the repacked tensors
still saves the stored format.

Building the kernel layout of ``qweight`` on CUDA also reserves the kernels' scratch buffers for
the layer (:func:`effllm_kernels.spqr.scratch.reserve`): eagerly, at load time, never first inside a
CUDA-graph warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm_kernels.packing import packed_words
from effllm_kernels.spqr.layout import STAT_FP16, LayerFields, SpqrTensors
from effllm_kernels.spqr.scratch import reserve


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
    outlier_buckets: torch.Tensor | None = None  # int32: the outliers for the CUDA GEMV (CUDA only)

    @property
    def n_units(self) -> int:
        """32-code units per row (the last may be partly padding)."""
        return -(-self.in_features // 32)

    def average_bits(self) -> float:
        """Bits per parameter of the stored format (``SpqrTensors.average_bits``; padding not counted)."""
        return unpack(self).average_bits()

    def to(self, device: torch.device | str) -> SpqrKernelTensors:
        """A copy on ``device``, the bucketed outliers with it (built there if it is CUDA and they are missing)."""
        out = super().to(device)
        out.outlier_buckets = (self.outlier_buckets.to(device) if self.outlier_buckets is not None
                               else buckets_for(out))
        return out


#: Bit widths whose units are stored paired in the kernel layout (see the module docstring).
PAIRED_BITS = (3,)
_PAIRS_PER_WORD_3 = 5  # 3-bit: five pairs per word at offsets 0, 3, .., 12 of each half; pair 15 in bits 15/31


def paired_position(code: int, bit: int) -> tuple[int, int]:
    """(word, bit) inside a paired 3-bit unit of code ``code`` (0..31), bit ``bit`` (0..2).

    Pair ``p = code // 2`` (codes 2p, 2p + 1: one group of 16 holds pairs 0..7 or 8..15): for p < 15
    word ``p // 5``, bit ``16 * (code % 2) + 3 * (p % 5) + bit``; pair 15 (codes 30, 31) uses the spare
    bit 15 / 31 of each word: bit ``b`` of code 30 + h is bit ``15 + 16 h`` of word ``b``.
    """
    p, half = divmod(code, 2)
    if p < 15:
        return p // _PAIRS_PER_WORD_3, 16 * half + 3 * (p % _PAIRS_PER_WORD_3) + bit
    return bit, 15 + 16 * half


def _u32(words: torch.Tensor) -> list[torch.Tensor]:
    return [w.to(torch.int64) & 0xFFFFFFFF for w in words.unbind(-1)]


def _i32(word: torch.Tensor) -> torch.Tensor:
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _reorder_units(q: torch.Tensor, to_paired: bool) -> torch.Tensor:
    """Words [N, n_units * 3] of 3-bit units -> the same units with their bits paired (or back)."""
    units = q.reshape(q.shape[0], -1, 3)
    src = _u32(units)
    out = [torch.zeros_like(src[0]) for _ in range(3)]
    for code in range(32):
        for bit in range(3):
            w, pos = paired_position(code, bit)
            sw, spos = divmod(3 * code + bit, 32)  # the stored (LSB-first stream) position
            if not to_paired:
                w, pos, sw, spos = sw, spos, w, pos
            out[w] |= ((src[sw] >> spos) & 1) << pos
    return torch.stack([_i32(w) for w in out], dim=-1).reshape(q.shape)


def repack_qweight(qweight: torch.Tensor, in_features: int, bits: int) -> torch.Tensor:
    """Stored codes int32 [N, packed_words(K, bits)] -> kernel layout int32 [n_units * bits, N]."""
    n_words = -(-in_features // 32) * bits
    q = qweight
    if q.shape[1] < n_words:
        q = torch.nn.functional.pad(q, (0, n_words - q.shape[1]))
    if bits in PAIRED_BITS:
        q = torch.cat([_reorder_units(c, True) for c in q.split(4096)]) if q.shape[0] else q
    return q.t().contiguous()


def unpack_qweight(qweight_t: torch.Tensor, in_features: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`repack_qweight` (drops the zero padding words)."""
    q = qweight_t.t()
    if bits in PAIRED_BITS:
        q = torch.cat([_reorder_units(c, False) for c in q.split(4096)]) if q.shape[0] else q.contiguous()
    return q[:, : packed_words(in_features, bits)].contiguous()


def _second_level_to_kernel(stats: torch.Tensor) -> torch.Tensor:
    return stats.permute(1, 2, 0).contiguous()  # [B, G, 2] -> [G, 2, B]


def _second_level_to_stored(stats: torch.Tensor) -> torch.Tensor:
    return stats.permute(2, 0, 1).contiguous()  # [G, 2, B] -> [B, G, 2]


def repack_field(name: str, value: torch.Tensor | None, meta: dict[str, int]) -> torch.Tensor | None:
    """One stored field in the kernel layout (the module docstring's list; other fields unchanged)."""
    if value is None:
        return None
    if name == "qweight":
        reserve(value.device, meta)  # scratch: eager, at load time
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


def buckets_for(t: SpqrTensors | SpqrKernelTensors) -> torch.Tensor | None:
    """The bucketed outliers the CUDA kernels read, for a layer on CUDA with outliers (else None)."""
    if not t.outlier_val.is_cuda or t.nnz == 0:
        return None
    from effllm_kernels.spqr.cuda_gemv import outlier_buckets

    return outlier_buckets(t)


def repack(t: SpqrTensors, buckets: bool = True) -> SpqrKernelTensors:
    """The kernel layout of a stored layer (new tensors on t's device; ``t`` is left as it is), with the
    CUDA GEMV's bucketed outliers on CUDA unless ``buckets`` is False (a per-call repack: the Triton GEMV
    then serves, and the call stays plain copies)."""
    t.validate()
    meta = t.meta()
    k = SpqrKernelTensors(**meta, **{f: repack_field(f, getattr(t, f), meta) for f in t.TENSOR_FIELDS})
    k.outlier_buckets = buckets_for(t) if buckets else None
    return k


def unpack(k: SpqrKernelTensors) -> SpqrTensors:
    """The stored layer of a repacked one, bit-exact (inverse of :func:`repack`)."""
    meta = k.meta()
    return SpqrTensors(**meta, **{f: unpack_field(f, getattr(k, f), meta) for f in SpqrTensors.TENSOR_FIELDS})


__all__ = ["PAIRED_BITS", "STAT_FP16", "SpqrKernelTensors", "buckets_for", "paired_position", "repack",
           "repack_field", "unpack", "unpack_field"]
