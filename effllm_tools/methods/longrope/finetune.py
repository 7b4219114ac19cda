"""Mixed context-window fine-tuning (LongRoPE2 §3.3), optional after the search.

Short windows (the original context) run with the short factors (ones: the original RoPE), long
windows with the searched long factors; both with the attention factor written into the config, so
training sees exactly what transformers computes at inference. The paper trains 10B tokens (3B short
/ 7B long); ``tokens`` sets the budget here, ``short_fraction`` the short share. Simplifications:
contiguous windows of real text (no per-document masks), constant learning rate, AdamW.

accelerate places the model and optimizer (one device; several GPUs through ``accelerate launch``,
which this code does not exercise), so the same loop runs on the CPU for tiny budgets in tests.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from effllm_tools.data.needles import Haystack, long_document
from effllm_tools.methods.longrope.install import installed_rope
from effllm_tools.reporting import Reporter


def window_plan(tokens: int, short_len: int, long_len: int, short_fraction: float, rng: random.Random) -> list[str]:
    """The shuffled order of ``short`` / ``long`` windows that spends about ``tokens`` tokens."""
    n_short = round(tokens * short_fraction / short_len)
    n_long = round(tokens * (1 - short_fraction) / long_len)
    if tokens > 0 and n_short + n_long == 0:
        n_long = 1
    plan = ["short"] * n_short + ["long"] * n_long
    rng.shuffle(plan)
    return plan


def mixed_window_finetune(model: Any, hay: Haystack, *, long_factors: list[float], mscale: float, short_len: int,
                          long_len: int, tokens: int, lr: float, short_fraction: float, seed: int, device: str,
                          reporter: Reporter) -> dict[str, Any]:
    """Train ``model`` in place; returns the loss curve and token counts."""
    from accelerate import Accelerator

    rng = random.Random(seed)
    plan = window_plan(tokens, short_len, long_len, short_fraction, rng)
    accelerator = Accelerator(cpu=device == "cpu")
    model.train()
    checkpointing = long_len > 4096 and hasattr(model, "gradient_checkpointing_enable")
    if checkpointing:  # long windows: trade compute for activation memory
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    losses: dict[str, list[float]] = {"short": [], "long": []}
    for kind in reporter.progress_iter(plan, "mixed-window fine-tuning", total=len(plan)):
        length = short_len if kind == "short" else long_len
        ids = long_document(hay, length, rng)[None].to(accelerator.device)
        with installed_rope(model, None if kind == "short" else long_factors, mscale):
            loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"fine-tuning diverged (loss {value}); lower finetune_lr")
        losses[kind].append(round(value, 5))
    if checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return {"finetune_windows": {k: len(v) for k, v in losses.items()},
            "finetune_tokens_used": len(losses["short"]) * short_len + len(losses["long"]) * long_len,
            "finetune_loss": losses}
