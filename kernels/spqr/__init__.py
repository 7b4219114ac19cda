"""The ``spqr`` weight format: its stored layout, pure-torch reference and (Triton) kernels."""

from __future__ import annotations

from effllm_kernels.spqr.layout import FORMAT_VERSION, STAT_FP16, SpqrTensors
from effllm_kernels.spqr.reference import dequantize, dequantize_stored, spqr_linear_reference

__all__ = ["FORMAT_VERSION", "STAT_FP16", "SpqrTensors", "dequantize", "dequantize_stored", "spqr_linear_reference"]
