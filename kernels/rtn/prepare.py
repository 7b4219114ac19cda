"""Load-time conversion of the stored ``rtn`` weight into the layout the Triton kernels read.

The stored format (``effllm_kernels.rtn.reference``) packs consecutive codes of a row into each
int32 word. The kernels want every bit field of a word to cover a contiguous run of K instead, so
that one loaded word tile yields ``32 // bits`` dense [rows, KC] code slices by shifts alone (no
reshapes or gathers in registers), each slice inside a single quantization group.

Prepared layout ("chunked planar"), for ``bits`` in {4, 8} and ``PW = 32 // bits`` codes a word:
K is cut into chunks of ``KC * PW`` codes (the last one zero-padded); chunk ``c`` of row ``n`` is
stored as ``KC`` consecutive words of ``qweight[n]``, and bits ``[j*bits, (j+1)*bits)`` of word
``i`` of that chunk hold the code of ``k = c*KC*PW + j*KC + i``. ``KC`` divides ``group_size``, so a
slice (fixed ``c`` and ``j``) never straddles two groups. Scales and zeros are transposed to
[groups, N] so that a group's values for a block of rows are one contiguous load.

This is done once per weight (the quantized module holds the result); it costs one pass of torch
ops over the weight and as much memory as the stored weight plus its scales and zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm_kernels.packing import packed_words

#: Bit widths the Triton kernels implement (the codes of a word never straddle words).
KERNEL_BITS = (4, 8)
#: Rows converted at a time, to bound the temporary int32/int64 tensors.
_ROWS_PER_STEP = 2048


@dataclass(frozen=True)
class RtnWeight:
    """An ``rtn`` weight in the kernels' layout (see the module docstring).

    Attributes:
        qweight: [N, n_chunks * chunk_words] int32, chunked planar codes.
        scales: [n_groups, N] in the stored scales' dtype.
        zeros: [n_groups, N] in the stored zeros' dtype (floats in code units).
        bits, group_size, in_features, out_features: the format parameters (K = in_features).
        chunk_words: KC, words of one row in one chunk (32 or 16).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int
    chunk_words: int

    @property
    def codes_per_word(self) -> int:
        """PW, the number of codes (bit fields) in one int32 word."""
        return 32 // self.bits

    @property
    def chunk_codes(self) -> int:
        """Codes of one row covered by one chunk (KC * PW)."""
        return self.chunk_words * self.codes_per_word

    @property
    def n_chunks(self) -> int:
        """Chunks per row (the last one may be partly padding)."""
        return self.qweight.shape[1] // self.chunk_words

    @property
    def n_groups(self) -> int:
        """Quantization groups per row, ceil(K / group_size)."""
        return self.scales.shape[0]


def layout_unsupported_reason(bits: int, group_size: int) -> str | None:
    """Why the kernel layout cannot hold this format, or None when it can."""
    if bits not in KERNEL_BITS:
        return f"bits={bits} (kernels implement {KERNEL_BITS})"
    if group_size <= 0 or group_size % 16:
        return f"group_size={group_size} (kernels need a multiple of 16)"
    return None


def chunk_words_for(group_size: int) -> int:
    """KC: the largest of 32 and 16 that divides ``group_size`` (a slice stays in one group)."""
    return 32 if group_size % 32 == 0 else 16


def _unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """[rows, words] int32 with whole codes per word -> [rows, K] int32 codes (LSB first)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, words, PW]
    return codes.reshape(packed.shape[0], -1)[:, :k]


def _pack_planar(codes: torch.Tensor, bits: int, chunk_words: int) -> torch.Tensor:
    """[rows, K] codes -> [rows, n_chunks * KC] int32 in the chunked planar layout."""
    rows, k = codes.shape
    per_word = 32 // bits
    chunk = chunk_words * per_word
    n_chunks = -(-k // chunk)
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, n_chunks * chunk - k))
    fields = padded.reshape(rows, n_chunks, per_word, chunk_words)  # [.., j, i]
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (fields << shifts[:, None]).sum(dim=2)  # fields are disjoint: sum == bitwise or
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)  # two's complement int32
    return words.reshape(rows, n_chunks * chunk_words).to(torch.int32)


def _check_shapes(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int, in_features: int) -> None:
    n = packed.shape[0]
    n_groups = -(-in_features // group_size)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != packed_words(in_features, bits):
        raise ValueError(
            f"packed must be int32 [N, {packed_words(in_features, bits)}] for K={in_features}, "
            f"bits={bits}; got {packed.dtype} {tuple(packed.shape)}"
        )
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, n_groups) or not t.is_floating_point():
            raise ValueError(f"{name} must be floating [{n}, {n_groups}], got {t.dtype} {tuple(t.shape)}")


def prepare_rtn_weight(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> RtnWeight:
    """Convert a stored ``rtn`` weight (on any device) into an :class:`RtnWeight` on that device.

    Call once when the weight is loaded and keep the result; ``rtn_linear(..., prepared=w)`` then
    costs no conversion per call. Raises ValueError for shapes that do not match the format or for
    formats the kernels do not implement (see :func:`layout_unsupported_reason`).
    """
    reason = layout_unsupported_reason(bits, group_size)
    if reason is not None:
        raise ValueError(f"rtn Triton layout: unsupported {reason}")
    _check_shapes(packed, scales, zeros, bits, group_size, in_features)
    kc = chunk_words_for(group_size)
    steps = [
        _pack_planar(_unpack_rows(packed[r : r + _ROWS_PER_STEP], bits, in_features), bits, kc)
        for r in range(0, packed.shape[0], _ROWS_PER_STEP)
    ]
    return RtnWeight(
        qweight=torch.cat(steps) if steps else packed.new_zeros(0, 0),
        scales=scales.t().contiguous(),
        zeros=zeros.t().contiguous(),
        bits=bits,
        group_size=group_size,
        in_features=in_features,
        out_features=packed.shape[0],
        chunk_words=kc,
    )
