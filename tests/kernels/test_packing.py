"""The dense LSB-first bit packing shared by the weight formats (``effllm_kernels.packing``)."""

from __future__ import annotations

import pytest
import torch

from effllm_kernels.packing import pack_codes, packed_words, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 7, 33, 101])
def test_pack_unpack_roundtrip_is_bit_exact(bits: int, k: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (5, k), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, packed_words(k, bits)) == (5, -(-k * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, k), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_a_dense_lsb_first_stream(bits: int) -> None:
    """Bit j of the row's stream is bit j % 32 of word j // 32; code k starts at bit k * bits."""
    k = 37
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (1, k), generator=gen)
    words = pack_codes(codes, bits)[0].tolist()
    stream = [(words[j // 32] >> (j % 32)) & 1 for j in range(k * bits)]
    expect = [(int(c) >> b) & 1 for c in codes[0] for b in range(bits)]
    assert stream == expect
    tail = packed_words(k, bits) * 32 - k * bits  # padding bits of the last word are zero
    assert all((words[-1] >> (32 - t)) & 1 == 0 for t in range(1, tail + 1))


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[0]]), 9)
