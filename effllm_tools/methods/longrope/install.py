"""Install given RoPE rescale factors and an attention factor on a loaded model, in place.

transformers' rotary modules (``LlamaRotaryEmbedding`` and its Mistral / Qwen2 / Qwen3 / Gemma3
siblings) hold the inverse frequencies in a buffer and multiply cos / sin by ``attention_scaling``.
Evaluating a search candidate swaps both and restores them afterwards; nothing else in the model
changes. For Gemma3 only the global (``full_attention``) layers are rescaled: the sliding-window
layers never see distances beyond their window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from effllm_tools.errors import UnsupportedError
from effllm_tools.methods.longrope.rope import existing_rope_type, longrope_inv_freq, rope_base_and_dim
from effllm_tools.pipeline.arch import get_arch, get_submodule


def rotary_slots(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, inv_freq attribute, attention-scaling attribute) for every rotary table to rescale."""
    arch = get_arch(model)
    if arch.rotary_emb is None:
        raise UnsupportedError(f"{type(model).__name__}: the architecture table names no rotary embedding")
    rot = get_submodule(model, arch.rotary_emb)
    if hasattr(rot, "inv_freq"):
        return [(rot, "inv_freq", "attention_scaling")]
    if hasattr(rot, "full_attention_inv_freq"):  # one module holding a table per layer type (Gemma3)
        return [(rot, "full_attention_inv_freq", "full_attention_attention_scaling")]
    raise UnsupportedError(f"{type(rot).__name__} holds no inv_freq buffer this version of effllm recognises")


def check_plain_rope(model: nn.Module | Any) -> None:
    """Context extension starts from plain RoPE; an already rescaled model (or model config) is refused
    (exit 4)."""
    kind = existing_rope_type(getattr(model, "config", model))
    if kind != "default":
        raise UnsupportedError(f"the model already uses RoPE scaling of type '{kind}'; extend the base model instead")


@contextlib.contextmanager
def installed_rope(model: nn.Module, factors: Sequence[float] | torch.Tensor | None,
                   mscale: float = 1.0) -> Iterator[torch.Tensor]:
    """Within the block the model runs with ``inv_freq_i = 1/(λ_i θ^{2i/d})`` and cos/sin × ``mscale``.

    ``factors=None`` installs plain RoPE. Yields the installed inverse frequencies (fp32).
    """
    base, dim = rope_base_and_dim(model.config)
    saved = []
    try:
        for module, freq_attr, scale_attr in rotary_slots(model):
            old = getattr(module, freq_attr)
            inv_freq = longrope_inv_freq(base, dim, factors, device=old.device)
            saved.append((module, freq_attr, scale_attr, old, getattr(module, scale_attr)))
            setattr(module, freq_attr, inv_freq)  # a registered buffer name: replaces the buffer
            setattr(module, scale_attr, float(mscale))
        yield longrope_inv_freq(base, dim, factors)
    finally:
        for module, freq_attr, scale_attr, old_freq, old_scale in saved:
            setattr(module, freq_attr, old_freq)
            setattr(module, scale_attr, old_scale)


def installed_inv_freq(model: nn.Module) -> torch.Tensor:
    """The inverse frequencies the model's (global) rotary table holds now."""
    module, freq_attr, _ = rotary_slots(model)[0]
    return getattr(module, freq_attr).detach().float().cpu()


def attention_scaling_of(model: nn.Module) -> Any:
    module, _, scale_attr = rotary_slots(model)[0]
    return getattr(module, scale_attr)
