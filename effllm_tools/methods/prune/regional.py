"""Wanda++'s two block-level procedures (arXiv 2503.04992, §3.1 and §3.2), on one decoder block.

Both take the block as a callable ``call(x) -> y`` (``x``, ``y``: ``[1, L, hidden]``) and the block's
prunable weights as parameters, so they run on any module (a real decoder layer in the pipeline, a
small MLP in tests). Gradients flow through this one block only, never through the model: memory
stays at one block plus one sample's activations.

- **Regional gradients** (§3.1, Eq. 3): ``G = sqrt(mean_s (d ||f_l(X_s)||_2 / dW)^2)``, the RMS over
  calibration samples of the gradient of the block output's L2 norm.
- **Regional optimization** (§3.2, Eq. 5): with the pruning mask held fixed, RMSprop steps on
  ``sum ||f_l(X_s; W_dense) - f_l(X_s; W_sparse)||^2``, one step per sample of a small subset.
  The pruned weights' gradients are zeroed and the mask is re-applied after every step, so pruned
  weights stay exact zeros (RMSprop with a zero gradient would leave them alone anyway; the
  re-application makes "exact" independent of the optimizer's arithmetic).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

BlockCall = Callable[[torch.Tensor], torch.Tensor]


def regional_gradients(
    call: BlockCall,
    inputs: Iterable[torch.Tensor],
    weights: dict[str, nn.Parameter],
    *,
    on_output: Callable[[int, torch.Tensor], None] | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, torch.Tensor]:
    """``G`` [out, in] fp32 per weight: RMS over samples of ``d ||call(x)||_2 / dW`` (Eq. 3).

    ``on_output(s, y)`` receives each sample's (detached) block output, so a caller can keep the
    dense outputs for regional optimization without a second forward pass.
    """
    sq = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in weights.items()}
    count = 0
    for s, x in enumerate(inputs):
        for p in weights.values():
            p.grad = None
        with autocast or contextlib.nullcontext():
            y = call(x)
        if on_output is not None:
            on_output(s, y.detach())
        y.float().norm().backward()  # the block's own loss: the L2 norm of its whole output
        for name, p in weights.items():
            sq[name].add_(p.grad.float().pow(2))
        count += 1
    for p in weights.values():
        p.grad = None
    if count == 0:
        raise ValueError("regional gradients need at least one calibration sample")
    return {name: total.div_(count).sqrt_() for name, total in sq.items()}


@torch.no_grad()
def hold_mask_(weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """Set every pruned weight (mask True) to an exact zero."""
    for name, p in weights.items():
        p.masked_fill_(masks[name], 0)


def regional_optimize(
    call: BlockCall,
    weights: dict[str, nn.Parameter],
    masks: dict[str, torch.Tensor],
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
) -> list[float]:
    """One RO pass (Eq. 5): for each ``(x, dense_output)`` one optimizer step on the summed squared
    error of the sparse block's output, with the mask held. Returns each step's loss (before it).

    The sum (not the mean) keeps the gradients well above RMSprop's ``eps`` for small weights, as
    in the paper's code.
    """
    hold_mask_(weights, masks)
    losses = []
    for x, target in samples:
        optimizer.zero_grad(set_to_none=True)
        with autocast or contextlib.nullcontext():
            y = call(x)
        loss = (y.float() - target.float()).pow(2).sum()
        loss.backward()
        with torch.no_grad():
            for name, p in weights.items():
                p.grad.masked_fill_(masks[name], 0)
        optimizer.step()
        hold_mask_(weights, masks)
        losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def block_sq_error(call: BlockCall, samples: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``sum_s ||call(x_s) - y_s||^2``: the regional objective, without gradients (tests, metrics)."""
    return float(sum((call(x).float() - y.float()).pow(2).sum() for x, y in samples))


@contextlib.contextmanager
def trainable_only(module: nn.Module, weights: dict[str, nn.Parameter]) -> Iterator[None]:
    """Within the block, let autograd track ``weights`` only (norms, biases stay frozen); restore after."""
    keep = {id(p) for p in weights.values()}
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
