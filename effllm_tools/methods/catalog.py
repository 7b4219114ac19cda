"""Every method effllm knows, built or planned. Importing this module registers them."""

from __future__ import annotations

from effllm_tools.methods.gptq import method as _gptq  # noqa: F401  (registers "gptq")
from effllm_tools.methods.prune import method as _prune  # noqa: F401  (registers "magnitude", "wanda")
from effllm_tools.methods.rtn import method as _rtn  # noqa: F401  (registers "rtn")
from effllm_tools.registry import MethodSpec, register_method

# Planned methods: listed so users see the roadmap, refused with exit 4 until built.
_PLANNED = [
    ("spqr", "quantize", "weight-quant", "SpQR: small groups, quantized statistics, fp16 outliers", "arXiv 2306.03078"),
    ("quarot", "quantize", "rotate", "QuaRot Hadamard rotations (W4A4KV4)", "arXiv 2404.00456"),
    ("aqua-kv", "quantize-kv", "kv-quant", "AQUA-KV predictive KV-cache quantization", "arXiv 2501.19392"),
    ("wanda++", "prune", "prune", "Wanda++: regional gradients and regional optimization", "arXiv 2503.04992"),
    ("longrope2", "extend-context", "extend-context", "LongRoPE2 needle-driven RoPE rescaling", "arXiv 2502.20082"),
    ("longrope", "extend-context", "extend-context", "LongRoPE v1 evolutionary search", "arXiv 2402.13753"),
    ("pi", "extend-context", "extend-context", "position interpolation (linear)", "arXiv 2306.15595"),
    ("ntk", "extend-context", "extend-context", "NTK-aware RoPE scaling", ""),
    ("yarn", "extend-context", "extend-context", "YaRN RoPE scaling", "arXiv 2309.00071"),
    ("seer", "sparsify-attn", "sparsify-attn", "SeerAttention block-sparse attention gates", "arXiv 2410.13276"),
]

for _name, _verb, _kind, _summary, _paper in _PLANNED:
    register_method(MethodSpec(_name, _verb, _kind, _summary, available=False, paper=_paper))
