"""Pruning math for ``magnitude`` and ``wanda``: sparsity patterns, scores, masks. No modules.

Wanda (Sun et al., arXiv 2306.11695, §3, Eq. 1) scores weight ``W[i, j]`` of a linear layer by
``|W[i, j]| * ||X_j||_2``, the weight's magnitude times the L2 norm of input feature ``j`` over all
calibration tokens, and compares scores *within each output row* (§3, "comparison group"): every
row loses the same number of weights. Magnitude pruning is the same with ``||X_j|| = 1`` (the paper's
baseline, here also per output row). There is no weight update: pruned weights become exact zeros.

Patterns (``parse_sparsity``):
- a ratio ``r`` in [0, 1): ``floor(r * in_features)`` weights pruned in every row;
- ``N:M``: in every group of ``M`` consecutive input weights of a row at most ``N`` stay non-zero,
  i.e. the ``M - N`` lowest scores of each group are pruned (NVIDIA's semi-structured 2:4, §4.1).
  For the paper's settings 2:4 and 4:8 this is also "prune N of every M", as its code reads them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """A parsed ``sparsity`` key: an unstructured ratio, or N non-zeros in every M (``n``, ``m`` > 0)."""

    ratio: float = 0.0
    n: int = 0  # N:M: at most n non-zeros in each group of m consecutive inputs
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def target(self) -> float:
        """The fraction of weights this pattern prunes (N:M: 1 - N/M)."""
        return 1 - self.n / self.m if self.structured else self.ratio

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"unstructured {self.ratio:g}"


def parse_sparsity(value: str | float) -> SparsityPattern:
    """``"0.5"`` / ``0.5`` -> a ratio in [0, 1); ``"2:4"`` -> N:M with 1 <= N < M.

    Raises ValueError with a one-line reason (the glue adds the key's name).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a ratio such as 0.5 or a pattern such as '2:4', got {value!r}")
    if isinstance(value, int) and value >= 1:
        # YAML 1.1 reads an unquoted 2:4 as the sexagesimal number 124.
        raise ValueError(f"got the number {value}; a ratio is in [0, 1), and N:M patterns must be quoted "
                         "in YAML ('2:4': unquoted, YAML reads 2:4 as 124)")
    text = str(value).strip()
    nm = _NM.match(text)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 1 <= n < m:
            raise ValueError(f"'{text}': N:M needs 1 <= N < M (at most N non-zeros in every M weights)")
        return SparsityPattern(n=n, m=m)
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError(f"'{text}' is neither a ratio such as 0.5 nor a pattern such as 2:4") from None
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise ValueError(f"ratio {text} is outside [0, 1)")
    return SparsityPattern(ratio=ratio)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` as fp32 [out, in]: the magnitude baseline's importance."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's ``S_ij = |W_ij| * ||X_j||_2`` (Eq. 1) as fp32 [out, in].

    ``input_sq_norms`` [in]: the sum over calibration tokens of ``x_j**2`` (see
    :func:`accumulate_sq_norms`). The official code divides by the token count first, which scales
    every score of a layer alike and changes no mask.
    """
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"norms of shape {tuple(input_sq_norms.shape)} do not match weight {tuple(weight.shape)}")
    return weight.detach().float().abs() * input_sq_norms.float().sqrt().to(weight.device)[None, :]


def accumulate_sq_norms(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add ``sum_t x[t, j]**2`` of activations ``x`` [tokens, in] to ``total`` [in] (fp32)."""
    sq = x.detach().float().pow(2).sum(dim=0)
    return sq if total is None else total + sq


def prune_mask(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Boolean [out, in], True where a weight is pruned; lowest scores go first within each row.

    Ties are broken by column order (stable sort), so the mask is deterministic.
    """
    rows, cols = scores.shape
    if pattern.structured:
        if cols % pattern.m:
            raise ValueError(f"{cols} input features are not a multiple of M={pattern.m} for {pattern.describe()}")
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)  # [out, in/M, M]
        order = torch.sort(groups, dim=-1, stable=True).indices[..., : pattern.m - pattern.n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
        return mask.reshape(rows, cols)
    k = int(math.floor(pattern.ratio * cols))
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if k:
        order = torch.sort(scores, dim=-1, stable=True).indices[:, :k]
        mask.scatter_(-1, order, True)
    return mask


@torch.no_grad()
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Set the pruned weights to exact zeros in place (the weight stays dense)."""
    weight.masked_fill_(mask.to(weight.device), 0)


def zero_count(weight: torch.Tensor) -> int:
    """The number of exact zeros in ``weight``."""
    return int((weight == 0).sum())


def wanda_pp_scores(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, grad_rms: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """Wanda++'s regional-gradient score ``S_ij = (alpha * G_ij + ||X_j||_2) * |W_ij|`` (arXiv 2503.04992,
    §3.1, Eq. 4) as fp32 [out, in].

    ``grad_rms`` [out, in]: ``G``, the RMS over calibration samples of the gradient of the decoder
    block's output L2 norm with respect to ``W`` (see ``regional.regional_gradients``); ``None`` or
    ``alpha = 0`` gives Wanda's score exactly. ``input_sq_norms`` as in :func:`wanda_scores` (the sum
    over all calibration tokens, as the paper's and Wanda's ``||X_j||``).
    """
    norms = input_sq_norms.float().sqrt().to(weight.device)[None, :]
    if grad_rms is None or alpha == 0:
        return weight.detach().float().abs() * norms
    if grad_rms.shape != weight.shape:
        raise ValueError(f"gradient of shape {tuple(grad_rms.shape)} does not match weight {tuple(weight.shape)}")
    return (alpha * grad_rms.float().to(weight.device) + norms) * weight.detach().float().abs()
