"""The ``rtn`` checkpoint format and the module that runs it.

Tensors per quantized linear layer ``<name>``:
- ``<name>.qweight`` int32 [out, ceil(in*bits/32)]: codes, dense LSB-first bit stream per row
  (``effllm_kernels.packing``; 4-bit codes take half a byte each, 3-bit codes 3/8 of a byte);
- ``<name>.scales``, ``<name>.zeros`` [out, ceil(in/group_size)] in the statistics dtype;
- ``<name>.bias`` if the layer had one.
``config.json`` carries ``quantization_config = {"quant_method": "effllm", "modules": {<name>:
{"format": "rtn", "bits", "group_size", "in_features", "out_features", "bias", "stats_dtype"}}}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effllm_kernels.packing import pack_codes, packed_words
from effllm_kernels.rtn import RtnWeight, prepare_rtn_weight, rtn_linear, triton_unsupported_reason
from effllm_kernels.rtn.reference import dequantize
from effllm_tools.methods.rtn.algorithm import group_count, quantize_rtn
from effllm_tools.registry import register_format

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@register_format("rtn")
class RTNLinear(nn.Module):
    """A linear layer whose weight is stored as packed ``bits``-bit codes with groupwise statistics."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        stats_dtype: str = "float16",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.stats_dtype = bits, group_size, stats_dtype
        sd = _DTYPES[stats_dtype]
        g = group_count(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=sd, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, g, dtype=sd, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool, stats_dtype: str
    ) -> RTNLinear:
        w = linear.weight.data
        k = w.shape[1]
        gs = k if group_size <= 0 or group_size > k else group_size
        codes, scales, zeros = quantize_rtn(w, bits, gs, symmetric, _DTYPES[stats_dtype])
        mod = cls(k, w.shape[0], bits, gs, linear.bias is not None, stats_dtype, device=w.device)
        mod.qweight.copy_(pack_codes(codes, bits))
        mod.scales.copy_(scales)
        mod.zeros.copy_(zeros)
        if linear.bias is not None:
            mod.bias = linear.bias.data.clone()
        return mod

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> RTNLinear:
        return cls(
            spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
            spec.get("bias", False), spec.get("stats_dtype", "float16"), device=device,
        )

    def spec(self) -> dict[str, Any]:
        return {
            "format": "rtn", "bits": self.bits, "group_size": self.group_size,
            "in_features": self.in_features, "out_features": self.out_features,
            "bias": self.bias is not None, "stats_dtype": self.stats_dtype,
        }

    def storage_bits(self) -> int:
        """Bits this layer stores (codes + statistics), bias excluded."""
        return (self.qweight.numel() * 32 + (self.scales.numel() + self.zeros.numel()) * self.scales.element_size() * 8)

    def dequantized(self) -> torch.Tensor:
        """The dense [out, in] fp32 weight this layer computes with."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features)

    def _kernel_weight(self, x: torch.Tensor) -> RtnWeight | None:
        """The weight in the Triton kernels' layout, converted once per device (CUDA only)."""
        if not x.is_cuda or triton_unsupported_reason(x, self.bits, self.group_size) is not None:
            return None
        cached = getattr(self, "_prepared", None)
        if cached is None or cached.qweight.device != self.qweight.device:
            cached = prepare_rtn_weight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                        self.in_features)
            self._prepared = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rtn_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features,
                          self.bias, prepared=self._kernel_weight(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
