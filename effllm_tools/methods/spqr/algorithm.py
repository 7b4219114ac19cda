"""SpQR (Dettmers et al., arXiv 2306.03078): pure tensor math on one weight and its Hessian.

SpQR is GPTQ (:func:`effllm_tools.methods.gptq.algorithm.gptq_quantize`, reused as is) with a
different grid object, :class:`SpQRGrid` (paper Algorithm 1; official ``spqr_engine.py``):

- columns are visited in act-order (decreasing ``diag(H)``, §4.1 / official ``act_order``); unlike
  our ``gptq`` method the *groups follow the visiting order*: the weight and Hessian are permuted
  first and the permutation is stored with the result (``perm``), as the official code does;
- every ``group_size`` (beta1) columns a group's grid is fitted, dynamically, on the weights as
  updated by the error propagation so far: asymmetric min-max per output row, its scales and zeros
  quantized to ``stat_bits`` over blocks of ``stat_group`` (beta2) consecutive output rows with fp16
  second-level statistics (§4.1, :mod:`.stats`);
- outliers (§4.2): with ``d = diag(chol(H^-1))`` and the threshold
  ``thr = tau * mean_j(var_n(W[n, j]) / d_j^2)``, the weights of a group whose leave-one-out gain
  exceeds ``thr`` are left out (replaced by the row mean of the others) when its grid is fitted;
  then, per column, a weight with ``((w - q) / d)^2 > thr`` is an outlier: it keeps its value, as
  its nearest code plus an fp16 correction (the stored format *adds* outliers to the dequantized
  weight; the official code stores the weight itself), and the error propagation sees that value.
  ``simplified_outliers`` skips the leave-one-out pass; ``outlier_threshold=None`` (tau = inf)
  disables outliers. With tau = inf and fp16 statistics SpQR is exactly GPTQ on the permuted weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from effllm_kernels.packing import pack_codes
from effllm_kernels.spqr.layout import STAT_FP16, SpqrTensors
from effllm_tools.methods.gptq.algorithm import GroupGrid, gptq_quantize
from effllm_tools.methods.rtn.algorithm import group_count
from effllm_tools.methods.spqr.stats import fit_group_grid, leave_one_out_gain, quantize_with


def outlier_threshold_of(w: torch.Tensor, d: torch.Tensor, tau: float | None) -> float:
    """``tau * mean_j(var_n(W[:, j]) / d_j^2)`` (official ``outlier_scale``); inf without tau."""
    if tau is None or math.isinf(tau):
        return math.inf
    var = w.float().var(dim=0, correction=1 if w.shape[0] > 1 else 0)
    return float(tau * (var / d.float().square()).mean())


class SpQRGrid(GroupGrid):
    """GPTQ's grid hook with SpQR's groups, quantized statistics and outliers (module docstring).

    Columns here are *stored* columns (the caller permuted them). ``scales`` / ``zeros`` [N, G] hold
    the first-level statistics as stored (fp32); the second-level codes and fp16 statistics, and the
    outliers (mask and fp16 corrections [N, K]), are kept for :meth:`to_tensors`.
    """

    def __init__(self, shape: tuple[int, int], bits: int, group_size: int, stat_bits: int, stat_group: int,
                 tau: float | None, simplified_outliers: bool, device: torch.device | str) -> None:
        super().__init__(shape, bits, group_size, False, torch.float32, device)
        n, k = shape
        g = group_count(k, group_size)
        self.stat_bits, self.stat_group = stat_bits, stat_group
        self.tau, self.simplified = tau, simplified_outliers
        self.threshold = math.inf
        self.d = torch.ones(k, device=device)
        quantized = stat_bits != STAT_FP16
        code_shape, blocks = (n, g), -(-n // stat_group)
        self.scale_codes = torch.zeros(code_shape, dtype=torch.uint8, device=device) if quantized else None
        self.zero_codes = torch.zeros(code_shape, dtype=torch.uint8, device=device) if quantized else None
        self.scale_stats = torch.zeros(blocks, g, 2, dtype=torch.float16, device=device) if quantized else None
        self.zero_stats = torch.zeros(blocks, g, 2, dtype=torch.float16, device=device) if quantized else None
        self.outliers = torch.zeros(n, k, dtype=torch.bool, device=device)
        self.corrections = torch.zeros(n, k, dtype=torch.float16, device=device)

    def begin(self, w: torch.Tensor, d: torch.Tensor) -> None:
        self.d = d.float().clone()
        self.threshold = outlier_threshold_of(w, d, self.tau)

    def fit_all(self, w: torch.Tensor) -> None:
        raise ValueError("SpQR fits its groups in visiting order: permute the weight, then quantize without act_order")

    def fit_group(self, g: int, w: torch.Tensor) -> None:
        """Fit group ``g`` from its current weights ``w`` [N, size], leaving likely outliers out."""
        w = w.float()
        if math.isfinite(self.threshold) and not self.simplified:
            start = g * self.group_size
            gain = leave_one_out_gain(w, self.d[start : start + w.shape[1]], self.bits)
            keep = (gain <= self.threshold).float()
            mean = (w * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
            w = w * keep + mean * (1 - keep)
        st = fit_group_grid(w, self.bits, self.stat_bits, self.stat_group)
        self.scales[:, g] = st.scale.values
        self.zeros[:, g] = st.zero.values
        if self.scale_codes is not None:
            self.scale_codes[:, g], self.zero_codes[:, g] = st.scale.codes, st.zero.codes
            self.scale_stats[:, g], self.zero_stats[:, g] = st.scale.stats, st.zero.stats

    def quantize_column(self, col: int, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        g = col // self.group_size
        codes, q = quantize_with(w.float(), self.scales[:, g], self.zeros[:, g], self.bits)
        self.codes[:, col] = codes.to(torch.uint8)
        if math.isfinite(self.threshold):
            out = ((w - q) / d).square() > self.threshold
            corr = torch.where(out, w - q, 0.0).to(torch.float16)
            self.outliers[:, col], self.corrections[:, col] = out, corr
            q = torch.where(out, q + corr.float(), q)
        return q

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] fp32 in stored column order, exactly as the reference dequantizes it."""
        gidx = torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size
        w = self.scales[:, gidx] * (self.codes.float() - self.zeros[:, gidx])
        return w + torch.where(self.outliers, self.corrections.float(), 0.0)

    def to_tensors(self, perm: torch.Tensor | None) -> SpqrTensors:
        """Pack into the stored layout of :mod:`effllm_kernels.spqr.layout`."""
        n, k = self.codes.shape
        if self.scale_codes is None:
            scale_q, zero_q = self.scales.to(torch.float16), self.zeros.to(torch.float16)
        else:
            scale_q, zero_q = pack_codes(self.scale_codes, self.stat_bits), pack_codes(self.zero_codes, self.stat_bits)
        rows, cols = self.outliers.nonzero(as_tuple=True)  # row-major: CSR order
        counts = torch.bincount(rows, minlength=n)
        rowptr = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        rowptr[1:] = torch.cumsum(counts, 0)
        cols16 = torch.where(cols >= 1 << 15, cols - (1 << 16), cols).to(torch.int16)  # unsigned in int16
        t = SpqrTensors(
            in_features=k, out_features=n, bits=self.bits, group_size=self.group_size, stat_bits=self.stat_bits,
            stat_group=self.stat_group, qweight=pack_codes(self.codes, self.bits), scale_q=scale_q, zero_q=zero_q,
            scale_stats=self.scale_stats, zero_stats=self.zero_stats, outlier_rowptr=rowptr.to(torch.int32),
            outlier_col=cols16, outlier_val=self.corrections[rows, cols],
            perm=None if perm is None else perm.to(torch.int32),
        )
        t.validate()
        return t


@dataclass
class SpQRResult:
    """``tensors``: the stored layer; ``weight``: what it dequantizes to, fp32 [N, K] in the original
    column order; ``loss``: ``tr((W - Q) H (W - Q)^T)``; ``percdamp`` / ``retries``: the damping that
    made the Cholesky factorisation succeed and how many times it was raised."""

    tensors: SpqrTensors
    weight: torch.Tensor
    loss: float
    percdamp: float
    retries: int

    @property
    def outlier_share(self) -> float:
        return self.tensors.nnz / max(self.weight.numel(), 1)


def act_order_permutation(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing ``diag(H)`` (official ``get_permutation_order(..., "act_order")``)."""
    return torch.argsort(torch.diagonal(hessian), descending=True)


@torch.no_grad()
def spqr_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int = 3,
    group_size: int = 16,
    stat_bits: int = 3,
    stat_group: int = 16,
    outlier_threshold: float | None = 0.7,
    simplified_outliers: bool = False,
    act_order: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    max_retries: int = 4,
) -> SpQRResult:
    """SpQR-quantize ``weight`` [N, K] given ``hessian`` [K, K] (module docstring).

    ``group_size`` <= 0 or > K means one group per row; ``stat_bits`` 16 keeps fp16 statistics.
    """
    n, k = weight.shape
    gs = k if group_size <= 0 or group_size > k else group_size
    h = hessian.detach().to(weight.device, torch.float32)
    perm = act_order_permutation(h) if act_order else None
    w_s = weight.detach().float() if perm is None else weight.detach().float()[:, perm]
    h_s = h if perm is None else h[perm][:, perm]
    grid = SpQRGrid((n, k), bits, gs, stat_bits, stat_group, outlier_threshold, simplified_outliers, weight.device)
    res = gptq_quantize(w_s, h_s, bits, gs, percdamp=percdamp, block_size=block_size, max_retries=max_retries,
                        grid=grid)
    tensors = grid.to_tensors(perm)
    w_hat = grid.dequantized()
    if perm is not None:
        w_hat = w_hat[:, torch.argsort(perm)]
    return SpQRResult(tensors, w_hat, res.loss, res.percdamp, res.retries)
