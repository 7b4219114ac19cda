"""RTN properties: exact grids, 16-bit-like settings reproduce weights, ragged groups, packing size."""

from __future__ import annotations

import pytest
import torch

from effllm_tools.methods.rtn.algorithm import average_bits, dequantize_codes, quantize_rtn


def test_weights_on_the_grid_are_reproduced_exactly():
    # Weights built on an asymmetric 4-bit g32 grid (as GGUF Q4_1 stores them) come back unchanged.
    torch.manual_seed(0)
    n, k, g = 8, 96, 32
    codes = torch.randint(0, 16, (n, k))
    codes[:, ::g] = 0
    codes[:, 1::g] = 15  # every group spans the whole grid, as min-max fitting produces
    d = torch.rand(n, k // g) * 0.1 + 0.01
    m = torch.randn(n, k // g) * 0.1
    w = (codes.float().view(n, -1, g) * d[..., None] + m[..., None]).view(n, k)
    c, s, z = quantize_rtn(w, 4, g, stats_dtype=torch.float32)
    torch.testing.assert_close(dequantize_codes(c, s, z, g), w, rtol=0, atol=1e-6)


def test_eight_bit_small_groups_are_near_lossless():
    w = torch.randn(64, 576)
    c, s, z = quantize_rtn(w, 8, 16)
    err = (dequantize_codes(c, s, z, 16) - w).norm() / w.norm()
    assert err < 5e-3


@pytest.mark.parametrize("symmetric", [False, True])
def test_error_within_half_step_and_ragged_groups(symmetric):
    w = torch.randn(16, 576)
    c, s, z = quantize_rtn(w, 4, 128, symmetric=symmetric, stats_dtype=torch.float32)
    assert s.shape == (16, 5)  # 576 = 4 * 128 + 64
    w_hat = dequantize_codes(c, s, z, 128)
    step = s.repeat_interleave(128, dim=1)[:, :576]
    assert ((w_hat - w).abs() <= step / 2 + 1e-6).all()
    if symmetric:
        assert (z == 8).all()


def test_more_bits_less_error():
    w = torch.randn(32, 256)
    errs = []
    for bits in (2, 3, 4, 6, 8):
        c, s, z = quantize_rtn(w, bits, 64)
        errs.append(float((dequantize_codes(c, s, z, 64) - w).norm()))
    assert errs == sorted(errs, reverse=True)


def test_average_bits_formula():
    assert average_bits(4, 64, 576, torch.float16) == pytest.approx(4 + 32 / 64)
    # Ragged: 576 with g128 stores 5 groups per row.
    assert average_bits(4, 128, 576, torch.float16) == pytest.approx(4 + 2 * 16 * 5 / 576)


def test_rtn_linear_module_matches_dequantized_weights():
    from effllm_tools.methods.rtn.format import RTNLinear

    lin = torch.nn.Linear(576, 40, bias=True)
    q = RTNLinear.from_linear(lin, bits=3, group_size=64, symmetric=False, stats_dtype="float16")
    x = torch.randn(5, 576)
    ref = torch.nn.functional.linear(x, q.dequantized().float(), lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    assert q.qweight.shape == (40, 576 * 3 // 32)
