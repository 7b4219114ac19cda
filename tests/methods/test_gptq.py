"""GPTQ core properties (arXiv 2210.17323; research/methods.md §1 CPU tests) on random tensors."""

from __future__ import annotations

import pytest
import torch

from effllm_tools.methods.gptq.algorithm import (
    CholeskyError,
    GroupGrid,
    HessianAccumulator,
    gptq_quantize,
    hessian_error,
    inverse_hessian_cholesky,
)
from effllm_tools.methods.rtn.algorithm import dequantize_codes, quantize_rtn

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(seed: int, k: int, rows: int = 1024, skew: float = 1.0) -> torch.Tensor:
    """[rows, k] activations with correlated features and per-feature scales exp(skew * N(0,1))."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 * 2 + torch.eye(k)
    scale = torch.exp(skew * torch.randn(k, generator=gen))
    return (torch.randn(rows, k, generator=gen) @ mix) * scale


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(300):
        acc.add(chunk)
    return acc.hessian


def rtn_weights(w: torch.Tensor, bits: int, gs: int, symmetric: bool = False) -> torch.Tensor:
    return dequantize_codes(*quantize_rtn(w, bits, gs, symmetric), gs)


def test_hessian_is_running_mean_of_2xxT():
    x = correlated_inputs(0, 48, rows=700)
    torch.testing.assert_close(hessian_of(x), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_rtn_exactly(symmetric, act_order):
    # H = I: chol(H^-1) is diagonal, nothing propagates, so GPTQ rounds every weight to its RTN code.
    w = torch.randn(24, 100)  # ragged: 100 = 3 * 32 + 4
    res = gptq_quantize(w, torch.eye(100), 3, 32, symmetric=symmetric, act_order=act_order)
    codes, scales, zeros = quantize_rtn(w, 3, 32, symmetric)
    assert torch.equal(res.codes, codes)
    assert torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros)
    assert res.retries == 0 and res.percdamp == 0.01


@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_the_same_grid(act_order):
    for seed in range(4):
        x = correlated_inputs(seed, 96)
        h = hessian_of(x)
        w = torch.randn(32, 96, generator=torch.Generator().manual_seed(100 + seed))
        res = gptq_quantize(w, h, 3, 32, act_order=act_order)
        assert res.loss == pytest.approx(hessian_error(w, res.dequantized(32), h))
        assert res.loss < 0.9 * hessian_error(w, rtn_weights(w, 3, 32), h), seed


def test_eight_bit_small_groups_are_near_lossless():
    w = torch.randn(64, 256)
    res = gptq_quantize(w, hessian_of(correlated_inputs(1, 256)), 8, 16)
    assert float((res.dequantized(16) - w).norm() / w.norm()) < 1e-2


def test_act_order_static_groups_same_format_lower_loss():
    wins = 0
    for seed in range(5):
        h = hessian_of(correlated_inputs(seed, 128, skew=1.5))
        w = torch.randn(32, 128, generator=torch.Generator().manual_seed(seed))
        plain = gptq_quantize(w, h, 3, 32)
        ordered = gptq_quantize(w, h, 3, 32, act_order=True)
        assert ordered.codes.shape == plain.codes.shape == (32, 128)
        assert ordered.scales.shape == plain.scales.shape == (32, 4)
        assert torch.equal(torch.sort(ordered.perm).values, torch.arange(128))
        # Static groups: the grid is RTN's, fitted on the original weights and order.
        _, rtn_scales, _ = quantize_rtn(w, 3, 32)
        assert torch.equal(ordered.scales, rtn_scales)
        wins += ordered.loss <= plain.loss
    assert wins >= 4


def test_damping_retry_on_an_indefinite_hessian():
    x = torch.randn(20, 64)  # 20 rows < 64 features: singular
    h = 2 * x.T @ x / 20
    h -= 0.03 * torch.diagonal(h).mean() * torch.eye(64)  # and slightly indefinite
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(h + 0.01 * torch.diagonal(h).mean() * torch.eye(64))
    res = gptq_quantize(torch.randn(16, 64), h, 4, 32)
    assert res.retries >= 1 and res.percdamp > 0.01
    assert torch.isfinite(res.scales.float()).all() and res.codes.max() <= 15
    with pytest.raises(CholeskyError):
        inverse_hessian_cholesky(-1e4 * torch.eye(8), 0.01, max_retries=2)


def test_dead_columns_are_zeroed_not_nan():
    x = correlated_inputs(2, 64)
    x[:, 5] = 0  # a feature that never fires: H_55 = 0
    w = torch.randn(8, 64)
    res = gptq_quantize(w, hessian_of(x), 4, 32)
    w_hat = res.dequantized(32)
    assert torch.isfinite(w_hat).all()
    assert (w_hat[:, 5].abs() <= res.scales[:, 0].float() / 2 + 1e-6).all()  # rounded zero


def test_grid_hook_sees_each_group_once_with_updated_weights():
    calls: list[int] = []

    class Counting(GroupGrid):
        def fit_group(self, g: int, w: torch.Tensor) -> None:
            calls.append(g)
            super().fit_group(g, w)

    w = torch.randn(8, 100)
    grid = Counting((8, 100), 4, 24, False, torch.float16, "cpu")
    res = gptq_quantize(w, hessian_of(correlated_inputs(3, 100)), 4, 24, grid=grid, block_size=128)
    assert calls == [0, 1, 2, 3, 4] and res.codes is grid.codes


def two_four(w: torch.Tensor) -> torch.Tensor:
    """``w`` pruned 2:4 by magnitude (a Wanda-style mask) along the input dimension."""
    g = w.reshape(w.shape[0], -1, 4)
    drop = g.abs().argsort(-1)[..., :2]
    return g.scatter(-1, drop, 0.0).reshape(w.shape)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_a_pruned_weight_stays_pruned(symmetric, act_order):
    """A sparse weight (e.g. after 2:4 Wanda) keeps every exact zero (SparseGPT-style: the mask is fixed
    and the zeroed weights' updates are propagated), still beats RTN with the same zeros, and a dense
    weight is quantized exactly as without the option."""
    x = correlated_inputs(3, 96)
    h = hessian_of(x)
    w = two_four(torch.randn(32, 96, generator=torch.Generator().manual_seed(7)))
    res = gptq_quantize(w, h, 3, 32, symmetric=symmetric, act_order=act_order)
    w_hat = res.dequantized(32)
    assert torch.equal(w_hat[w == 0], torch.zeros(int((w == 0).sum())))
    rtn = dequantize_codes(*quantize_rtn(w, 3, 32, symmetric), 32)  # rtn keeps the zeros too
    assert torch.equal(rtn[w == 0], torch.zeros(int((w == 0).sum())))
    assert res.loss < hessian_error(w, rtn, h)
    filled = gptq_quantize(w, h, 3, 32, symmetric=symmetric, act_order=act_order, keep_zeros=False)
    assert int((filled.dequantized(32)[w == 0] != 0).sum()) > 0  # without it GPTQ fills them in
    dense = torch.randn(32, 96, generator=torch.Generator().manual_seed(8))
    dense[0, :20] = 0.0  # incidental zeros (0.65% < SPARSE_SHARE): not a pruning mask, quantized as before
    auto = gptq_quantize(dense, h, 3, 32, symmetric=symmetric, act_order=act_order)
    off = gptq_quantize(dense, h, 3, 32, symmetric=symmetric, act_order=act_order, keep_zeros=False)
    assert torch.equal(auto.codes, off.codes) and torch.equal(auto.zeros, off.zeros)


def test_zero_counts_see_pruned_weights_only():
    from effllm_tools.methods.rtn.algorithm import zero_counts

    w = two_four(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
    kept = w.clone()
    kept[0, w[0] == 0] = 1.0  # one row's zeros filled in
    assert zero_counts(w, w) == (256, 256) and zero_counts(w, kept) == (256, 224)
    dense = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    dense[0, 0] = 0.0  # 1 of 512 zeros: incidental
    assert zero_counts(dense, torch.ones_like(dense)) == (0, 0)
