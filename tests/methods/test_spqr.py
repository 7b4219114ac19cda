"""SpQR algorithm and stored format on random tensors (arXiv 2306.03078; research/methods.md §1 CPU tests)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from effllm_kernels.packing import packed_words, unpack_codes
from effllm_kernels.spqr.layout import SpqrTensors
from effllm_kernels.spqr.reference import (
    dequantize,
    dequantize_statistics,
    dequantize_stored,
    spqr_linear_reference,
)
from effllm_tools.errors import BadInputError
from effllm_tools.methods.gptq.algorithm import gptq_quantize, hessian_error
from effllm_tools.methods.rtn.algorithm import dequantize_codes, quantize_rtn
from effllm_tools.methods.spqr.algorithm import outlier_threshold_of, spqr_quantize
from effllm_tools.methods.spqr.format import SpQRLinear
from effllm_tools.methods.spqr.method import SpQRConfig, _quantize_group
from effllm_tools.methods.spqr.stats import leave_one_out_gain, quantize_statistic
from tests.methods.test_gptq import correlated_inputs, hessian_of

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(seed: int, n: int = 40, k: int = 96, skew: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [n, k] with a few heavy entries and the Hessian of correlated, skewed inputs."""
    gen = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(n, k, generator=gen)
    w += 6 * torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) < 0.01)
    return w, hessian_of(correlated_inputs(seed, k, skew=skew))


def test_sixteen_bit_like_settings_reproduce_the_weights():
    """8-bit codes with fp16 or 8-bit statistics reproduce the layer: its output error
    tr(dW H dW^T) / tr(W H W^T) is ~1e-5 (GPTQ's compensation moves single weights by ~1%, which
    the output does not see), against ~1e-2 at 3 bits."""
    w, h = problem(0)

    def out_err(res):
        d = res.weight - w
        return float(torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T))

    for stat_bits in (16, 8):
        res = spqr_quantize(w, h, bits=8, group_size=16, stat_bits=stat_bits, stat_group=16)
        assert out_err(res) < 1e-4 and float((res.weight - w).norm() / w.norm()) < 3e-2, stat_bits
    three = spqr_quantize(w, h, bits=3, stat_bits=3, outlier_threshold=None)
    assert out_err(three) > 1e-3  # the measure is not vacuous


@pytest.mark.parametrize("k", [96, 100])  # 100: a ragged last group
def test_tau_infinity_with_fp16_statistics_is_gptq(k):
    w, h = problem(1, k=k)
    res = spqr_quantize(w, h, bits=3, group_size=16, stat_bits=16, outlier_threshold=None, act_order=False,
                        percdamp=0.01)
    ref = gptq_quantize(w, h, 3, 16, percdamp=0.01)
    t = res.tensors
    assert t.nnz == 0 and t.perm is None
    assert torch.equal(unpack_codes(t.qweight, 3, k), ref.codes)
    assert torch.equal(t.scale_q, ref.scales) and torch.equal(t.zero_q, ref.zeros)
    assert torch.equal(res.weight, ref.dequantized(16)) and res.loss == ref.loss
    # With act-order SpQR is GPTQ on the permuted problem (groups follow the visiting order).
    res = spqr_quantize(w, h, bits=3, group_size=16, stat_bits=16, outlier_threshold=None, percdamp=0.01)
    perm = torch.argsort(torch.diagonal(h), descending=True)
    assert torch.equal(res.tensors.perm.long(), perm)
    ref = gptq_quantize(w[:, perm], h[perm][:, perm], 3, 16, percdamp=0.01)
    assert torch.equal(unpack_codes(res.tensors.qweight, 3, k), ref.codes)
    assert torch.equal(res.weight[:, perm], ref.dequantized(16))


CONFIGS = [  # bits, group_size, stat_bits, stat_group, tau, act_order, n, k
    (3, 16, 3, 16, 0.2, True, 40, 96),
    (2, 8, 3, 64, 0.1, False, 70, 100),  # ragged groups and a ragged second-level block
    (4, 16, 16, 16, 0.5, True, 33, 80),  # fp16 statistics
    (3, 32, 2, 7, None, True, 21, 77),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_stored_tensors_dequantize_bit_exactly(cfg, tmp_path):
    bits, gs, sb, sg, tau, act_order, n, k = cfg
    w, h = problem(2, n, k)
    res = spqr_quantize(w, h, bits=bits, group_size=gs, stat_bits=sb, stat_group=sg, outlier_threshold=tau,
                        act_order=act_order)
    t = res.tensors
    t.validate()
    assert t.qweight.shape == (n, packed_words(k, bits))  # dense bit stream: 3-bit codes are not bytes
    assert torch.equal(dequantize(t), res.weight)
    assert res.loss == pytest.approx(hessian_error(w, res.weight, h), rel=1e-6)
    # Through the module and safetensors and back.
    bias = torch.randn(n)
    mod = SpQRLinear.from_tensors(t, bias)
    save_file(mod.state_dict(), str(tmp_path / "m.safetensors"))
    again = SpQRLinear.from_spec(mod.spec(), device="cpu")
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    assert torch.equal(again.dequantized(), res.weight)
    x = torch.randn(5, k)
    torch.testing.assert_close(again(x), x @ res.weight.T + bias, rtol=1e-5, atol=1e-5)
    assert again.spec()["avg_bits"] == t.average_bits()


def test_permutation_round_trips():
    w, h = problem(3, skew=2.0)
    res = spqr_quantize(w, h, outlier_threshold=0.2)
    t = res.tensors
    perm = t.perm.long()
    assert torch.equal(torch.sort(perm).values, torch.arange(w.shape[1]))
    assert not torch.equal(perm, torch.arange(w.shape[1]))
    assert torch.equal(dequantize(t)[:, perm], dequantize_stored(t))
    assert torch.equal(dequantize(t)[:, perm][:, torch.argsort(perm)], dequantize(t))
    x = torch.randn(4, w.shape[1])
    torch.testing.assert_close(spqr_linear_reference(x, t), x @ res.weight.T, rtol=1e-5, atol=1e-5)
    assert float((res.weight - w).norm() / w.norm()) < 0.3  # columns landed back where they belong


def test_bit_formula_and_bytes():
    w, h = problem(4, n=64, k=128)
    res = spqr_quantize(w, h, bits=3, group_size=16, stat_bits=3, stat_group=16, outlier_threshold=None)
    assert res.tensors.average_bits() == 3.625
    res = spqr_quantize(w, h, bits=3, group_size=16, stat_bits=3, stat_group=16, outlier_threshold=0.2)
    t = res.tensors
    assert t.nnz > 0 and t.average_bits() == pytest.approx(3.625 + 32 * res.outlier_share, abs=1e-12)
    assert SpQRLinear.from_tensors(t).average_bits() == t.average_bits()
    # Bytes stored = the counted bits + metadata: row pointers, permutation, word padding of packed rows.
    n, k, g = 64, 128, 8
    padding = n * (packed_words(k, 3) * 32 - k * 3) + 2 * n * (packed_words(g, 3) * 32 - g * 3)
    metadata = (n + 1) * 32 + k * 32 + padding
    assert t.storage_bytes() * 8 == t.average_bits() * n * k + metadata
    fp16 = spqr_quantize(w, h, bits=4, stat_bits=16, outlier_threshold=None).tensors
    assert fp16.average_bits() == 4 + 32 / 16 and fp16.scale_stats is None


def test_outlier_share_grows_as_tau_falls():
    w, h = problem(5, n=48, k=128)
    shares, losses = [], []
    for tau in (None, 4.0, 1.0, 0.25, 0.05):
        res = spqr_quantize(w, h, outlier_threshold=tau)
        shares.append(res.outlier_share)
        losses.append(res.loss)
    assert shares[0] == 0 and all(a < b for a, b in zip(shares, shares[1:], strict=False)), shares
    assert losses[-1] < 0.5 * losses[0], losses
    simplified = spqr_quantize(w, h, outlier_threshold=0.25, simplified_outliers=True)
    assert simplified.outlier_share > 0 and torch.equal(dequantize(simplified.tensors), simplified.weight)


def test_planted_outliers_are_found_and_kept():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(32, 64, generator=gen) * 0.1
    rows, cols = torch.arange(0, 32, 4), torch.randint(0, 64, (8,), generator=gen)
    w[rows, cols] = 5.0
    res = spqr_quantize(w, torch.eye(64), outlier_threshold=1.0, act_order=False)
    t = res.tensors
    dense = torch.zeros(32, 64, dtype=torch.bool)
    counts = (t.outlier_rowptr[1:] - t.outlier_rowptr[:-1]).long()
    dense[torch.repeat_interleave(torch.arange(32), counts), t.outlier_col.long() & 0xFFFF] = True
    assert dense[rows, cols].all()
    assert float((res.weight[rows, cols] - 5.0).abs().max()) < 5e-3  # an fp16 correction keeps its value
    assert t.nnz <= 3 * len(rows)


def test_threshold_is_tau_times_mean_normalised_variance():
    w = torch.randn(16, 8)
    d = torch.rand(8) + 0.5
    expect = 0.3 * float((w.var(dim=0) / d.square()).mean())
    assert outlier_threshold_of(w, d, 0.3) == pytest.approx(expect)
    assert math.isinf(outlier_threshold_of(w, d, None)) and math.isinf(outlier_threshold_of(w, d, math.inf))


def _brute_minmax_error(x: torch.Tensor, d: torch.Tensor, bits: int) -> float:
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / (2**bits - 1) or 1.0
    q = torch.clamp(torch.round(x / scale - lo / scale), 0, 2**bits - 1)
    return float((((q + lo / scale) * scale - x) / d).square().sum())


def test_leave_one_out_gain_matches_brute_force():
    gen = torch.Generator().manual_seed(7)
    w, d = torch.randn(5, 9, generator=gen), torch.rand(9, generator=gen) + 0.5
    gain = leave_one_out_gain(w, d, 3)
    for r in range(5):
        base = _brute_minmax_error(w[r], d, 3)
        for j in range(9):
            keep = [i for i in range(9) if i != j]
            assert float(gain[r, j]) == pytest.approx(base - _brute_minmax_error(w[r, keep], d[keep], 3), abs=1e-4)


def test_second_level_statistics_match_the_reference_dequantization():
    gen = torch.Generator().manual_seed(8)
    v = torch.rand(37, generator=gen) * 0.1 + 0.01  # 37 rows: a ragged block of 5
    sl = quantize_statistic(v, 3, 16)
    assert sl.codes.max() <= 7 and sl.stats.shape == (3, 2) and sl.stats.dtype == torch.float16
    block = torch.arange(37) // 16
    st = sl.stats.float()[block]
    assert torch.equal(sl.values, st[:, 0] * (sl.codes.float() - st[:, 1]))
    assert float((sl.values - v).abs().max()) <= float(sl.stats[:, 0].float().max()) / 2 * 1.01
    flat = quantize_statistic(torch.full((16,), 0.25), 3, 16)  # a constant block stays exact and finite
    assert torch.isfinite(flat.stats.float()).all() and torch.allclose(flat.values, torch.full((16,), 0.25), rtol=1e-3)
    # The whole first level, as SpqrTensors hold it, against the reference's decoding.
    w, h = problem(9, n=40, k=64)
    t = spqr_quantize(w, h, stat_bits=3, outlier_threshold=None, act_order=False).tensors
    scale, zero = dequantize_statistics(t)
    codes = unpack_codes(t.qweight, 3, 64).float()
    gidx = torch.arange(64) // 16
    assert torch.equal(scale[:, gidx] * (codes - zero[:, gidx]), dequantize_stored(t))
    assert (scale > 0).all()


def test_beats_rtn_on_the_hessian_weighted_error():
    wins = 0
    for seed in range(4):
        w, h = problem(10 + seed, n=32, k=96)
        res = spqr_quantize(w, h, bits=3, stat_bits=3, outlier_threshold=None)
        rtn = dequantize_codes(*quantize_rtn(w, 3, 16), 16)  # the same grid family with fp16 statistics
        wins += res.loss < hessian_error(w, rtn, h)
    assert wins >= 3


def test_damping_retry_is_logged():
    x = torch.randn(20, 64)  # fewer samples than features: singular, then made indefinite
    h = 2 * x.T @ x / 20
    h -= 0.03 * torch.diagonal(h).mean() * torch.eye(64)
    layer = nn.Module()
    layer.lin = nn.Linear(64, 16)
    logs: list[str] = []
    lctx = SimpleNamespace(layer=layer, name="model.layers.0", artifacts={})
    _quantize_group(lctx, ["lin"], h, SpQRConfig(percdamp=0.01), logs.append)
    assert isinstance(layer.lin, SpQRLinear) and lctx.artifacts["lin.spqr_stats"][2] >= 1
    assert len(logs) == 1 and "Cholesky failed at percdamp 0.01" in logs[0] and "model.layers.0.lin" in logs[0]
    assert torch.isfinite(layer.lin.dequantized()).all()


@pytest.mark.parametrize("key,value,needle", [
    ("bits", 1, "bits"), ("stat_bits", 12, "stat_bits"), ("stat_group", 0, "stat_group"),
    ("outlier_threshold", -0.5, "outlier_threshold"), ("outlier_threshold", float("nan"), "outlier_threshold"),
    ("percdamp", 0.0, "percdamp"), ("block_size", 0, "block_size"), ("ignore", ["("], "regex"),
])
def test_bad_values_are_refused(key, value, needle):
    with pytest.raises(BadInputError, match=needle):
        SpQRConfig(**{key: value}).validate()


def test_infinite_tau_means_no_outliers():
    cfg = SpQRConfig(outlier_threshold=math.inf)
    cfg.validate()
    assert cfg.outlier_threshold is None


def test_from_tensors_refuses_a_broken_layout():
    w, h = problem(11, n=16, k=32)
    t = spqr_quantize(w, h).tensors
    broken = SpqrTensors(**{**t.meta(), **t.tensors(), "qweight": t.qweight[:, :-1]})
    with pytest.raises(ValueError, match="qweight"):
        SpQRLinear.from_tensors(broken)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantizes_on_cuda_bit_exactly():
    w, h = problem(12, n=256, k=512)
    res = spqr_quantize(w.cuda(), h.cuda())
    assert res.tensors.qweight.is_cuda and torch.equal(dequantize(res.tensors), res.weight)
    cpu = spqr_quantize(w, h)
    assert abs(res.loss - cpu.loss) < 0.05 * cpu.loss
    mod = SpQRLinear.from_tensors(res.tensors).cuda()
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(mod(x).float(), x.float() @ res.weight.T, rtol=2e-2, atol=2e-1)
