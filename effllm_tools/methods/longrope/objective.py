"""Search objectives: needle-driven perplexity (LongRoPE2 §3.1) and plain long-document perplexity (v1).

Both return the mean negative log-likelihood (lower is better; ``exp`` of it is the perplexity) of a
fixed set of documents under the RoPE factors installed on the model. Documents are built once per
search from a seeded RNG, so every candidate sees the same tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from effllm_tools.data.needles import Haystack, NeedleDocument, long_document, needle_document
from effllm_tools.methods.longrope.install import installed_rope

CE_CHUNK = 4096  # rows of logits turned to fp32 at a time


def _logits_tail(model: Any, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions [keep, V]; only those are projected when supported."""
    try:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
    except TypeError:  # a transformers without logits_to_keep
        out = model(input_ids=ids, use_cache=False)
    return out.logits[0, -keep:]


@torch.inference_mode()
def answer_nll(model: Any, docs: Sequence[NeedleDocument], device: Any) -> float:
    """Mean NLL over the answer tokens of ``docs`` (the needle-driven objective)."""
    total, count = 0.0, 0
    for doc in docs:
        ids = doc.input_ids[None].to(device)
        first = min(doc.answer_positions) - 1  # the logit at position p predicts token p + 1
        keep = ids.shape[1] - first
        logits = _logits_tail(model, ids, keep)
        rows = torch.tensor([p - 1 - first for p in doc.answer_positions], device=logits.device)
        targets = ids[0, doc.answer_positions].to(logits.device)
        total += float(F.cross_entropy(logits[rows].float(), targets, reduction="sum"))
        count += len(doc.answer_positions)
    return total / max(count, 1)


@torch.inference_mode()
def document_nll(model: Any, docs: Sequence[torch.Tensor], device: Any) -> float:
    """Mean NLL over every predicted token of ``docs`` (LongRoPE v1's perplexity objective)."""
    total, count = 0.0, 0
    for doc in docs:
        ids = doc[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0]  # [L, V]
        targets = ids[0, 1:].to(logits.device)
        for a in range(0, targets.numel(), CE_CHUNK):
            b = min(a + CE_CHUNK, targets.numel())
            total += float(F.cross_entropy(logits[a:b].float(), targets[a:b], reduction="sum"))
        count += targets.numel()
        del logits
    return total / max(count, 1)


def make_objective(model: Any, hay: Haystack, *, kind: str, lengths: Sequence[int], samples: int, needles: int,
                   mscale: float, seed: int, device: Any) -> tuple[Callable[[list[float]], float], dict[str, Any]]:
    """``objective(factors)`` for the search, and a description of its documents for provenance.

    The ``samples`` documents cycle through ``lengths`` (one length or several).
    """
    rng = random.Random(seed)
    per_doc = [int(lengths[i % len(lengths)]) for i in range(samples)]
    shown: int | list[int] = per_doc[0] if len(lengths) == 1 else per_doc
    if kind == "needle":
        ndocs = [needle_document(hay, n, needles, rng) for n in per_doc]
        meta = {"objective": "needle-driven answer NLL", "documents": samples, "length": shown,
                "needles_per_document": needles, "answer_tokens": sum(len(d.answer_positions) for d in ndocs)}

        def objective(factors: list[float]) -> float:
            with installed_rope(model, factors, mscale):
                return answer_nll(model, ndocs, device)
    else:
        pdocs = [long_document(hay, n, rng) for n in per_doc]
        meta = {"objective": "document NLL", "documents": samples, "length": shown}

        def objective(factors: list[float]) -> float:
            with installed_rope(model, factors, mscale):
                return document_nll(model, pdocs, device)

    return objective, {**meta, "dataset": hay.meta}
