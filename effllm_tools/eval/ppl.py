"""Perplexity by the compression papers' protocol (research/methods.md §7), and KL to a base model.

The text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (remainder
dropped). Each window is evaluated on its own (positions restart, no shared cache).
PPL = exp(sum of NLL over predicted tokens / number of predicted tokens); each window predicts
``seqlen - 1`` tokens. KL(base || model) is averaged over the same predicted positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from effllm_tools.reporting import Reporter


@dataclass
class PplResult:
    ppl: float
    nll_sum: float
    predicted_tokens: int
    windows: int
    kld: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits  # [b, L, V]


@torch.inference_mode()
def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL per window: logits [b, L, V], ids [b, L] -> [b] (fp32 math)."""
    b, n, v = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(b, n - 1).sum(-1)


@torch.inference_mode()
def window_kld(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Summed KL(base || model) over predicted positions per window -> [b]."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    lq = F.log_softmax(base_logits[:, :-1].float(), dim=-1)
    return (lq.exp() * (lq - lp)).sum(-1).sum(-1)


@torch.inference_mode()
def evaluate_ppl(model: Any, windows: torch.Tensor, *, batch_size: int = 1, device: str = "cpu",
                 base_model: Any = None, reporter: Reporter | None = None) -> PplResult:
    """Perplexity of ``model`` over ``windows`` [n, L]; with ``base_model`` also the mean KL."""
    reporter = reporter or Reporter()
    n, seqlen = windows.shape
    nll_total = 0.0
    kld_total = 0.0
    batches = [windows[i : i + batch_size] for i in range(0, n, batch_size)]
    for batch in reporter.progress_iter(batches, "eval-ppl", total=len(batches)):
        ids = batch.to(device)
        logits = _logits(model, ids)
        nll_total += float(window_nll(logits, ids).double().sum())
        if base_model is not None:
            base_logits = _logits(base_model, ids)
            kld_total += float(window_kld(logits, base_logits).double().sum())
        del logits
    predicted = n * (seqlen - 1)
    return PplResult(
        ppl=math.exp(nll_total / predicted),
        nll_sum=nll_total,
        predicted_tokens=predicted,
        windows=n,
        kld=kld_total / predicted if base_model is not None else None,
    )
