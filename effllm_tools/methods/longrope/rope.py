"""RoPE rescaling math shared by LongRoPE2, LongRoPE v1 and the PI / NTK / YaRN baselines.

Pure tensor math, no model walking. Notation (LongRoPE2, arXiv 2502.20082, §2 and §3.2):

- ``d`` the rotary dimension, ``θ`` the RoPE base, ``L`` the original context, ``s = L' / L`` the
  extension ratio;
- pair ``i`` (``0 <= i < d/2``) rotates with ``inv_freq_i = 1 / (λ_i θ^{2i/d})``; its period is
  ``2π θ^{2i/d}``;
- the theoretical critical dimension is the first pair whose period exceeds ``L`` (these pairs never
  saw a full rotation in pre-training); LongRoPE2 requires ``λ_i >= s`` at and above the (real)
  critical dimension and fills the lower pairs NTK-style;
- the attention factor ("mscale") of the ``longrope`` type is ``sqrt(1 + ln s / ln L)`` (the v1 "su"
  rule, also transformers' default for ``longrope``); YaRN's is ``0.1 ln s + 1``.

The inverse frequencies are computed exactly as transformers' ``_compute_longrope_parameters`` does,
so the factors a search evaluates are bit for bit the ones a loaded checkpoint uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from effllm_tools.errors import UnsupportedError


def rope_params_of(config: Any) -> dict[str, Any]:
    """The (global-attention) RoPE parameter dict of a transformers config, old or new layout."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # Gemma3: only the global layers see long distances
    return dict(params or {})


def rope_base_and_dim(config: Any) -> tuple[float, int]:
    """(θ, rotary dimension d) of the model's global attention layers."""
    params = rope_params_of(config)
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    if base is None:
        raise UnsupportedError(f"{type(config).__name__} has no rope_theta: not a RoPE model")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return float(base), int(head_dim * partial)


def existing_rope_type(config: Any) -> str:
    params = rope_params_of(config)
    return str(params.get("rope_type", params.get("type", "default")) or "default")


def longrope_inv_freq(base: float, dim: int, factors: Sequence[float] | torch.Tensor | None = None,
                      device: Any = None) -> torch.Tensor:
    """``1 / (λ_i θ^{2i/d})`` in fp32, the same expression transformers evaluates for ``longrope``.

    ``factors=None`` means all ones (plain RoPE; bit for bit the default inverse frequencies).
    """
    if factors is None:
        ext = torch.ones(dim // 2, dtype=torch.float32, device=device)
    else:
        ext = torch.as_tensor(factors, dtype=torch.float32, device=device)
    if ext.shape != (dim // 2,):
        raise ValueError(f"expected {dim // 2} rescale factors (rotary dim {dim}), got {tuple(ext.shape)}")
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext * base**shape)


def su_mscale(scale: float, original_length: int) -> float:
    """LongRoPE's attention factor ``sqrt(1 + ln s / ln L)`` (1 for ``s <= 1``)."""
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(scale) / math.log(original_length))


def yarn_mscale(scale: float) -> float:
    """YaRN's attention factor ``0.1 ln s + 1`` (arXiv 2309.00071 eq. 22)."""
    return 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0


def resolve_mscale(rule: str | float, scale: float, original_length: int) -> float:
    """A recipe's ``mscale`` key: ``su``, ``yarn``, ``none`` (1.0) or a finite number > 0."""
    if isinstance(rule, int | float) and not isinstance(rule, bool):
        if not math.isfinite(rule) or rule <= 0:
            raise ValueError(f"mscale must be su, yarn, none or a finite number > 0, got {rule!r}")
        return float(rule)
    table = {"su": lambda: su_mscale(scale, original_length), "yarn": lambda: yarn_mscale(scale), "none": lambda: 1.0}
    if rule not in table:
        raise ValueError(f"mscale must be su, yarn, none or a number, got {rule!r}")
    return float(table[rule]())


def critical_dim(base: float, dim: int, original_length: int) -> int:
    """First pair index ``i`` whose period ``2π θ^{2i/d}`` exceeds ``L`` (``d/2`` if none does)."""
    for i in range(dim // 2):
        if 2 * math.pi * base ** (2 * i / dim) > original_length:
            return i
    return dim // 2


def ntk_factors(scale: float, dim: int) -> list[float]:
    """Static NTK-aware scaling (base ``θ s^{d/(d-2)}``) written as per-pair factors ``s^{2i/(d-2)}``.

    ``1/((θ s^{d/(d-2)})^{2i/d}) = 1/(s^{2i/(d-2)} θ^{2i/d})``: exact, pair 0 unscaled, the last pair ``s``.
    """
    return [float(scale ** (2 * i / (dim - 2))) for i in range(dim // 2)]


def fill_lower_dims(upper_at_rcd: float, rcd: int) -> list[float]:
    """LongRoPE2's NTK-style lower pairs: ``λ_i = λ_rcd^{i/rcd}`` for ``i < rcd``.

    A geometric ramp from 1 at pair 0 to the critical pair's factor; it is what the released
    LLaMA3-8B LongRoPE2 factors hold below their critical dimension (ratio 1.0979 = 21.81^(1/33)).
    """
    return [float(upper_at_rcd ** (i / rcd)) for i in range(rcd)] if rcd > 0 else []


def longrope_parameters(base: float, long_factor: Sequence[float], original_length: int, target_length: int,
                        attention_factor: float) -> dict[str, Any]:
    """The ``longrope`` RoPE dict transformers reads (short factors are ones: the original RoPE)."""
    n = len(long_factor)
    return {
        "rope_type": "longrope",
        "rope_theta": base,
        "long_factor": [float(x) for x in long_factor],
        "short_factor": [1.0] * n,
        "factor": float(target_length / original_length),
        "original_max_position_embeddings": int(original_length),
        "attention_factor": float(attention_factor),
    }


def write_rope_config(config: Any, params: dict[str, Any], target_length: int) -> None:
    """Install ``params`` as the model's RoPE scaling and raise ``max_position_embeddings``.

    transformers 5 keeps RoPE settings in ``config.rope_parameters`` (written as ``rope_parameters``;
    nested by layer type for Gemma3, where only ``full_attention`` is rescaled); transformers 4 in
    ``config.rope_scaling``. Either way the saved config.json loads in plain transformers.
    """
    if hasattr(config, "rope_parameters") and config.rope_parameters is not None:
        current = config.rope_parameters
        if isinstance(current, dict) and isinstance(current.get("full_attention"), dict):
            current["full_attention"] = dict(params)
        else:
            config.rope_parameters = dict(params)
    else:  # transformers 4.x
        legacy = {k: v for k, v in params.items() if k != "rope_theta"}
        config.rope_scaling = legacy
        if "original_max_position_embeddings" in params:
            config.original_max_position_embeddings = params["original_max_position_embeddings"]
    config.max_position_embeddings = int(target_length)
