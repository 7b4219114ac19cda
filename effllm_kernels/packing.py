"""Dense bit packing of unsigned integer codes, shared by the weight formats.

Layout (the on-disk format of effllm's packed weights): each row of ``codes`` ([rows, K],
values in [0, 2**bits)) becomes one LSB-first bit stream of ``K * bits`` bits stored in int32
words, ``ceil(K * bits / 32)`` words per row. Code ``k`` of a row starts at bit ``k * bits``
of the stream; bit ``j`` of the stream is bit ``j % 32`` of word ``j // 32``. For bits that
divide 32 (1, 2, 4, 8) word ``w`` therefore holds codes ``w*32/bits ... (w+1)*32/bits - 1``,
the lowest code in the lowest bits; 3-, 5-, 6- and 7-bit codes straddle words and no bit is
wasted (a 3-bit K=576 row takes 54 words, not 64).
"""

from __future__ import annotations

import torch


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words one row of ``k`` codes of ``bits`` bits occupies."""
    return (k * bits + 31) // 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, K] integer codes in [0, 2**bits) -> [rows, ceil(K*bits/32)] int32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    nwords = packed_words(k, bits)
    # Bit b of code k lands at stream position k*bits + b.
    shifts = torch.arange(bits, device=c.device)
    bit_values = (c.unsqueeze(-1) >> shifts) & 1  # [rows, K, bits]
    stream = bit_values.reshape(rows, k * bits)
    pad = nwords * 32 - k * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(rows, nwords, 32)
    weights = torch.ones(32, dtype=torch.int64, device=c.device) << torch.arange(32, device=c.device)
    words = (stream * weights).sum(-1)  # [rows, nwords] in [0, 2**32)
    # Reinterpret as signed int32 (two's complement), which safetensors stores as I32.
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: [rows, words] int32 -> [rows, K] uint8 codes."""
    rows, nwords = packed.shape
    if nwords != packed_words(k, bits):
        raise ValueError(f"{nwords} words cannot hold {k} codes of {bits} bits")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    stream = (w.unsqueeze(-1) >> torch.arange(32, device=w.device)) & 1  # [rows, nwords, 32]
    stream = stream.reshape(rows, nwords * 32)[:, : k * bits].reshape(rows, k, bits)
    weights = torch.ones(bits, dtype=torch.int64, device=w.device) << torch.arange(bits, device=w.device)
    return (stream * weights).sum(-1).to(torch.uint8)
