"""Every method effllm knows, built or planned. Importing this module registers them."""

from __future__ import annotations

from effllm_tools.methods.gptq import method as _gptq  # noqa: F401  (registers "gptq")
from effllm_tools.methods.longrope import method as _longrope  # noqa: F401  (longrope2, longrope, pi, ntk, yarn)
from effllm_tools.methods.prune import method as _prune  # noqa: F401  (registers "magnitude", "wanda")
from effllm_tools.methods.prune import wanda_pp as _wanda_pp  # noqa: F401  (registers "wanda++")
from effllm_tools.methods.rtn import method as _rtn  # noqa: F401  (registers "rtn")
from effllm_tools.methods.spqr import method as _spqr  # noqa: F401  (registers "spqr")
from effllm_tools.registry import MethodSpec, register_method

# Planned methods: listed so users see the roadmap, refused with exit 4 until built.
_PLANNED = [
    ("quarot", "quantize", "rotate", "QuaRot Hadamard rotations (W4A4KV4)", "arXiv 2404.00456"),
    ("aqua-kv", "quantize-kv", "kv-quant", "AQUA-KV predictive KV-cache quantization", "arXiv 2501.19392"),
    ("seer", "sparsify-attn", "sparsify-attn", "SeerAttention block-sparse attention gates", "arXiv 2410.13276"),
]

for _name, _verb, _kind, _summary, _paper in _PLANNED:
    register_method(MethodSpec(_name, _verb, _kind, _summary, available=False, paper=_paper))
