"""Inference-time helpers applied when effllm loads a checkpoint (``sparse24``: the 2:4 runtime)."""

from effllm_tools.runtime.sparse24 import (
    Sparse24Report,
    apply_sparse24,
    checkpoint_pattern,
    ineligible_reason,
    is_2of4,
    maybe_apply_sparse24,
    resolve_mode,
)

__all__ = ["Sparse24Report", "apply_sparse24", "checkpoint_pattern", "ineligible_reason", "is_2of4",
           "maybe_apply_sparse24", "resolve_mode"]
