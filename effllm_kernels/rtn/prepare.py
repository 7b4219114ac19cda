"""Load-time conversion of the stored ``rtn`` weight into the layout the Triton kernels read.

The stored format (``effllm_kernels.rtn.reference``) packs consecutive codes of a row into each
int32 word. The kernels want each bit field of a word tile to decode, by shifts and masks alone,
into a dense tile of consecutive codes that lies inside one quantization group.

Prepared layout, for ``bits`` in {4, 8}. A word holds ``PW = 32 // bits`` fields; field ``j``
(bits ``[j*bits, (j+1)*bits)``) belongs to unit ``u = j % 4`` and half ``h = j // 4`` (8-bit words
have one half, 4-bit words two). K is cut into chunks of ``KC * PW`` codes (the last zero-padded);
chunk ``c`` of row ``n`` is ``KC`` consecutive words of ``qweight[n]``, and field ``j`` of word
``i`` holds the code of ``k = c*KC*PW + u*USPAN + i*H + h`` with ``H = PW // 4`` halves and
``USPAN = KC * H``. So unit ``u`` of a word tile covers ``USPAN`` consecutive codes:

* 8-bit: byte ``u`` of word ``i`` is code ``u*KC + i``;
* 4-bit: nibbles ``u`` and ``u + 4`` of word ``i`` are codes ``u*2KC + 2i`` and ``u*2KC + 2i + 1``,
  so ``(word >> 4u) & 0x000F000F`` holds two neighbouring codes in its two 16-bit halves: OR-ed
  with a 16-bit float's exponent that is two dequantized-ready values in one instruction.

``USPAN`` divides ``group_size``, so a unit never straddles two groups.

Scales and zeros become two fp32 coefficients per group and row, stored [2, groups, N] so that a
group's values for a block of rows are contiguous. The kernels decode a code ``q`` to the float
``f = F0 + q * FS`` (:func:`field_float`), so ``W = (q - z) * s = f * cs - zcs`` with
``cs = s / FS`` and ``zcs = s * (F0 / FS + z)``: one FMA per weight, or per group with the sums of
the activations over the group. fp32 keeps ``zcs`` exact enough for that cancellation.

This is done once per weight (the quantized module holds the result); it costs one pass of torch
ops over the weight and as much memory as the stored weight plus its scales and zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm_kernels.packing import packed_words

#: Bit widths the Triton kernels implement (the codes of a word never straddle words).
KERNEL_BITS = (4, 8)
#: Rows converted at a time, to bound the temporary int64 tensors.
_ROWS_PER_STEP = 2048


@dataclass(frozen=True)
class RtnWeight:
    """An ``rtn`` weight in the kernels' layout (see the module docstring).

    Attributes:
        qweight: [N, n_chunks * chunk_words] int32 codes in the prepared layout.
        coefs: [2, n_groups, N] fp32: ``cs`` then ``zcs`` (module docstring).
        bits, group_size, in_features, out_features: the format parameters (K = in_features).
        chunk_words: KC, words of one row in one chunk.
    """

    qweight: torch.Tensor
    coefs: torch.Tensor
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
    def unit_span(self) -> int:
        """USPAN: consecutive codes decoded from one unit of a word tile."""
        return self.chunk_words * self.codes_per_word // 4

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
        return self.coefs.shape[1]


def field_float(bits: int) -> tuple[float, float]:
    """(F0, FS): the kernels decode a ``bits``-bit code q to F0 + q * FS, exactly.

    4-bit: 0.5 + q/256 (bits 16..19 of an fp32 with exponent byte 0x3F, or the low nibble of a
    bf16 0x3F00 / bits 3..6 of an fp16 0x3800). 8-bit: 1 + q/256 (bits 15..22 of an fp32 1.0).
    Must match the decoders in ``triton_matmul``.
    """
    return (0.5 if bits == 4 else 1.0), 2.0**-8


def group_coefficients(scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, G] scales and zeros -> [2, G, N] fp32 ``(cs, zcs)`` for :func:`field_float`'s decode."""
    f0, fs = field_float(bits)
    s, z = scales.t().float(), zeros.t().float()
    return torch.stack([s / fs, s * (f0 / fs + z)]).contiguous()


def chunk_words_for(bits: int, group_size: int) -> int | None:
    """KC: the largest of 32, 16 (and 8 for 4-bit) whose unit span divides ``group_size``."""
    halves = (32 // bits) // 4
    for kc in (32, 16, 8):
        # a unit must span >= 16 codes: it is the K extent of one tensor-core product
        if kc * halves >= 16 and group_size % (kc * halves) == 0:
            return kc
    return None


def layout_unsupported_reason(bits: int, group_size: int) -> str | None:
    """Why the kernel layout cannot hold this format, or None when it can."""
    if bits not in KERNEL_BITS:
        return f"bits={bits} (kernels implement {KERNEL_BITS})"
    if group_size <= 0 or chunk_words_for(bits, group_size) is None:
        return f"group_size={group_size} (kernels need a multiple of 16)"
    return None


def _unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """[rows, words] int32 with whole codes per word -> [rows, K] int64 codes (LSB first)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, words, PW]
    return codes.reshape(packed.shape[0], -1)[:, :k].to(torch.int64)


def _pack_prepared(codes: torch.Tensor, bits: int, chunk_words: int) -> torch.Tensor:
    """[rows, K] int64 codes -> [rows, n_chunks * KC] int32 in the prepared layout."""
    rows, k = codes.shape
    halves = (32 // bits) // 4
    chunk = chunk_words * 4 * halves
    n_chunks = -(-k // chunk)
    padded = torch.nn.functional.pad(codes, (0, n_chunks * chunk - k))
    fields = padded.reshape(rows, n_chunks, 4, chunk_words, halves)  # k_local = u*USPAN + i*H + h
    u = torch.arange(4, device=codes.device)
    h = torch.arange(halves, device=codes.device)
    shifts = (u[:, None] + 4 * h[None, :]) * bits  # [4, H]: field j = u + 4h
    words = (fields << shifts[:, None, :]).sum(dim=(2, 4))  # fields are disjoint: sum == bitwise or
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
    kc = chunk_words_for(bits, group_size)
    assert kc is not None
    n_words = -(-in_features // (kc * (32 // bits))) * kc
    steps = [packed.new_zeros(0, n_words)] + [
        _pack_prepared(_unpack_rows(packed[r : r + _ROWS_PER_STEP], bits, in_features), bits, kc)
        for r in range(0, packed.shape[0], _ROWS_PER_STEP)
    ]
    return RtnWeight(
        qweight=torch.cat(steps),
        coefs=group_coefficients(scales, zeros, bits),
        bits=bits,
        group_size=group_size,
        in_features=in_features,
        out_features=packed.shape[0],
        chunk_words=kc,
    )
