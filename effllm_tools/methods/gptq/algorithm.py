"""GPTQ (Frantar et al., arXiv 2210.17323): pure tensor math, no modules, no hooks.

For a linear layer ``y = x W^T`` with ``W`` [N, K] and calibration inputs ``X`` [tokens, K], GPTQ
minimises the layer-output error ``||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) / 2`` with
``H = 2 X^T X / n`` (paper eq. 1-2). Columns are quantized one at a time (Algorithm 1); after each,
the not-yet-quantized columns absorb the error through the upper Cholesky factor of ``H^-1``
(eq. 3 rewritten with the Cholesky trick, §4 "Step 3"), lazily in blocks of ``block_size`` columns
(§4 "Step 2"). Numerics (§4, "Cholesky reformulation"): columns with ``H_jj = 0`` are dead
(``H_jj := 1``, ``W[:, j] := 0``) and ``percdamp * mean(diag H)`` is added to the diagonal; when a
Cholesky factorisation still fails, the damping is raised tenfold and retried (reported to the
caller, which logs it).

Grids are groupwise and reuse :mod:`effllm_tools.methods.rtn.algorithm` (asymmetric min-max with a
float zero, or symmetric), so GPTQ's result is stored in the existing ``rtn`` format:

- without ``act_order`` a group's grid is fitted when the pass reaches its first column, on the
  weights as updated by the error propagation so far (the reference implementation's behaviour);
- with ``act_order`` (columns visited by decreasing ``diag(H)``, the reference's "desc_act") groups
  are *static*: every group's grid is fitted on the original weights, in the original column order,
  before the pass (the reference's ``static_groups``). A column then keeps its group whatever its
  place in the visiting order, so the stored format needs no ``g_idx`` / permutation and loads with
  the plain ``rtn`` module and kernels. The price: grids do not see the propagated updates.

Grid fitting and column rounding go through a :class:`GroupGrid` object; SpQR subclasses it to fit
its own (second-level quantized) statistics per group and to keep outliers per column, using the
``d = diag(chol(H^-1))`` that :meth:`GroupGrid.begin` and :meth:`GroupGrid.quantize_column` receive;
the loss is measured on :meth:`GroupGrid.dequantized` (outliers included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm_tools.methods.rtn.algorithm import (
    dequantize_codes,
    fit_grid,
    group_count,
    is_sparse,
    quantize_to_codes,
)


class HessianAccumulator:
    """Running ``H = 2/n * sum_t x_t x_t^T`` over the rows fed so far (GPTQ ``add_batch``).

    Accumulated in fp32 as a running mean (scaled down before each add), so the magnitude stays
    that of one row's ``2 x x^T`` however many tokens arrive.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` [rows, in_features] (any float dtype)."""
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.hessian.mul_(self.rows / (self.rows + m))
        self.rows += m
        self.hessian.addmm_(x.T, x, alpha=2.0 / self.rows)


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: twice GPTQ's layer-output error (proportional to it)."""
    e = (w.float() - w_hat.float()).to(torch.float64)
    return float(((e @ hessian.to(torch.float64)) * e).sum())


class GroupGrid:
    """Groupwise grids for one weight [N, K]: fits statistics and rounds columns onto them.

    Codes, scales and zeros live in the original column order. ``fit_group(g, w)`` fits the grid of
    group ``g`` from its current weights ``w`` [N, size]; ``quantize_column(col, w, d)`` rounds
    original column ``col`` (current values ``w`` [N]) and returns the dequantized column that the
    error propagation uses. ``d`` is ``chol(H^-1)_jj`` for this column (unused here; SpQR's outlier
    criterion needs it).
    """

    def __init__(
        self, shape: tuple[int, int], bits: int, group_size: int, symmetric: bool,
        stats_dtype: torch.dtype, device: torch.device | str, keep: torch.Tensor | None = None,
    ) -> None:
        n, k = shape
        self.bits, self.group_size, self.symmetric, self.stats_dtype = bits, group_size, symmetric, stats_dtype
        g = group_count(k, group_size)
        self.codes = torch.zeros(n, k, dtype=torch.uint8, device=device)
        self.scales = torch.ones(n, g, dtype=stats_dtype, device=device)
        self.zeros = torch.zeros(n, g, dtype=stats_dtype, device=device)
        self.keep = keep  # [N, K] bool, original order: pruned weights that must stay exact zeros

    def _masked(self, w: torch.Tensor, cols: slice | int) -> torch.Tensor:
        """``w`` with the kept zeros of columns ``cols`` set back to zero (the error updates move them)."""
        return w if self.keep is None else w.masked_fill(self.keep[:, cols], 0.0)

    def fit_group(self, g: int, w: torch.Tensor) -> None:
        w = self._masked(w, slice(g * self.group_size, g * self.group_size + w.shape[1]))
        scale, zero = fit_grid(w, self.bits, w.shape[1], self.symmetric, self.stats_dtype,
                               keep_zeros=self.keep is not None)
        self.scales[:, g : g + 1] = scale
        self.zeros[:, g : g + 1] = zero

    def fit_all(self, w: torch.Tensor) -> None:
        """Static groups: every group's grid from ``w`` [N, K] in the original column order."""
        self.scales, self.zeros = fit_grid(self._masked(w, slice(None)), self.bits, self.group_size, self.symmetric,
                                           self.stats_dtype, keep_zeros=self.keep is not None)

    def begin(self, w: torch.Tensor, d: torch.Tensor) -> None:
        """Called once before the pass with ``w`` [N, K] (visiting order, dead columns zeroed) and
        ``d = diag(chol(H^-1))`` [K] in visiting order. Unused here; SpQR derives its outlier
        threshold from both and keeps ``d`` for its leave-one-out pass."""

    def dequantized(self) -> torch.Tensor:
        """The quantized weight [N, K] fp32 in the original column order (for the loss)."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.group_size)

    def quantize_column(self, col: int, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        g = col // self.group_size
        s, z = self.scales[:, g : g + 1], self.zeros[:, g : g + 1]
        w = self._masked(w[:, None], slice(col, col + 1))[:, 0]  # a kept zero rounds to code == zero: 0
        code = quantize_to_codes(w[:, None], s, z, self.bits, 1)  # [N, 1], exactly RTN's rounding
        self.codes[:, col] = code[:, 0]
        return dequantize_codes(code, s, z, 1)[:, 0]


@dataclass
class GPTQResult:
    """Codes [N, K] uint8 and scales, zeros [N, G] (stats dtype) in the ``rtn`` layout.

    ``loss``: ``tr((W - Q) H (W - Q)^T)`` on the undamped Hessian passed in. ``percdamp``: the
    relative damping that made the Cholesky factorisation succeed; ``retries``: how many times it
    was raised. ``perm``: the visiting order (None without act_order).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    loss: float
    percdamp: float
    retries: int
    perm: torch.Tensor | None = None

    def dequantized(self, group_size: int) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales, self.zeros, group_size)


class CholeskyError(RuntimeError):
    """H stayed not positive definite after every damping retry."""


def inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float, max_retries: int = 4
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, the damping and retry count.

    ``percdamp`` is multiplied by 10 after each failed factorisation, ``max_retries`` times at most.
    """
    k = hessian.shape[0]
    mean_diag = float(torch.diagonal(hessian).mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(k, dtype=hessian.dtype, device=hessian.device)
    for attempt in range(max_retries + 1):
        damp = percdamp * 10**attempt
        lower, info = torch.linalg.cholesky_ex(hessian + damp * scale * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp, attempt
    raise CholeskyError(
        f"the Hessian is not positive definite even with percdamp {percdamp * 10**max_retries:g}; "
        "use more calibration data or a larger percdamp"
    )


def _gptq_pass(w: torch.Tensor, hinv: torch.Tensor, grid: GroupGrid, order: torch.Tensor,
               static: bool, block_size: int) -> None:
    """Algorithm 1 on ``w`` [N, K] (columns already in visiting ``order``), updating it in place.

    Within a block the remaining columns are updated per column (rank-1); columns after the
    block get the block's accumulated error at once (the "lazy batch" update, §4 Step 2).
    """
    k = w.shape[1]
    gs = grid.group_size
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        err = torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype, device=w.device)
        for j in range(i1, i2):
            if not static and j % gs == 0:  # dynamic groups: the group lies within this block
                grid.fit_group(j // gs, w[:, j : j + gs])
            d = hinv[j, j]
            q = grid.quantize_column(int(order[j]), w[:, j], d)
            e = (w[:, j] - q) / d
            w[:, j + 1 : i2].addr_(e, hinv[j, j + 1 : i2], alpha=-1.0)
            err[:, j - i1] = e
        w[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1.0)


def _aligned_block(block_size: int, group_size: int, k: int) -> int:
    """A block size with which every group starts at a block start or lies inside one block.

    A group's grid is fitted at its first column; columns of later blocks only receive the lazy
    update at the end of the current block, so a group reaching past it would see stale weights.
    """
    if group_size >= k or block_size % group_size == 0 or group_size % block_size == 0:
        return block_size
    return block_size // group_size * group_size if group_size < block_size else group_size


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    stats_dtype: torch.dtype = torch.float16,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    max_retries: int = 4,
    grid: GroupGrid | None = None,
    keep_zeros: bool | None = None,
) -> GPTQResult:
    """GPTQ-quantize ``weight`` [N, K] given ``hessian`` [K, K] (see the module docstring).

    ``group_size`` <= 0 or > K means one group per row. Without act_order the block size is
    adjusted (:func:`_aligned_block`) so every grid is fitted on fully updated weights.
    ``grid`` replaces the default :class:`GroupGrid` (it must use the same group size).
    ``keep_zeros``: the exact zeros of ``weight`` stay exact zeros (a pruned layer keeps its mask, as in
    SparseGPT's joint quantization: their rounding error is the whole updated value, propagated like any
    other column's); None turns it on for sparse weights (``rtn.algorithm.is_sparse``), the default grid only.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    n, k = weight.shape
    gs = k if group_size <= 0 or group_size > k else group_size
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(w.device, torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if keep_zeros and grid is not None:
        raise ValueError("keep_zeros works with the default grid only")
    if keep_zeros is None:
        keep_zeros = grid is None and is_sparse(weight)
    keep = (weight == 0).to(w.device) if keep_zeros else None
    grid = grid or GroupGrid((n, k), bits, gs, symmetric, stats_dtype, w.device, keep)
    if act_order:
        grid.fit_all(w)  # static groups on the original order (module docstring)
        perm = torch.argsort(torch.diagonal(h), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
        block_size = _aligned_block(block_size, gs, k)
    upper, damp, retries = inverse_hessian_cholesky(h[perm][:, perm], percdamp, max_retries)
    w_visit = w[:, perm].contiguous()
    grid.begin(w_visit, torch.diagonal(upper))
    _gptq_pass(w_visit, upper, grid, perm, static=act_order, block_size=block_size)
    w_hat = grid.dequantized()
    loss = hessian_error(weight, w_hat, hessian.to(w.device))
    return GPTQResult(grid.codes, grid.scales, grid.zeros, loss, damp, retries, perm if act_order else None)
