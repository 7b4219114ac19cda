"""Tiny random decoder-only models of every supported family (fp32, eval mode), shared by tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128
SEQ_LEN = 16  # longer than the sliding windows below, so sliding masks differ from causal ones
NUM_SAMPLES = 3

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,  # larger than the default so every layer visibly changes its input
)


def _gemma3_config() -> PretrainedConfig:
    return Gemma3TextConfig(
        **_COMMON,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=6),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "gemma3": _gemma3_config,
}
ARCH_NAMES = list(CONFIGS)


def build_model(name: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    """A tiny random ``*ForCausalLM`` of family ``name``, fp32, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attn)
    return model.float().eval()
