"""The ``spqr`` checkpoint format and the module that runs it.

Tensors per quantized linear layer ``<name>`` are the fields of
:class:`effllm_kernels.spqr.layout.SpqrTensors` (that module's docstring is the layout contract):
``<name>.qweight``, ``.scale_q``, ``.zero_q``, ``.scale_stats`` / ``.zero_stats`` (quantized
statistics only), ``.outlier_rowptr``, ``.outlier_col``, ``.outlier_val``, ``.perm`` (act-order
only), and ``.bias`` if the layer had one. ``config.json`` carries
``quantization_config.modules[<name>] = {"format": "spqr", "version", "in_features",
"out_features", "bits", "group_size", "stat_bits", "stat_group", "nnz", "perm", "bias",
"avg_bits"}``: everything needed to rebuild the module's buffers before the weights load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import effllm_kernels.spqr as spqr_kernels
from effllm_kernels.packing import packed_words
from effllm_kernels.spqr.layout import FORMAT_VERSION, STAT_FP16, SpqrTensors
from effllm_kernels.spqr.reference import dequantize, spqr_linear_reference
from effllm_tools.registry import register_format

_FP16_FIELDS = ("scale_stats", "zero_stats", "outlier_val")


@register_format("spqr")
class SpQRLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in the ``spqr`` layout (buffers named as SpqrTensors fields)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, stat_bits: int,
                 stat_group: int, nnz: int = 0, perm: bool = False, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.stat_bits, self.stat_group = bits, group_size, stat_bits, stat_group
        n, k = out_features, in_features
        g, blocks = -(-k // group_size), -(-n // stat_group)

        def buf(name: str, shape: tuple[int, ...] | None, dtype: torch.dtype) -> None:
            self.register_buffer(name, None if shape is None else torch.zeros(shape, dtype=dtype, device=device))

        buf("qweight", (n, packed_words(k, bits)), torch.int32)
        if stat_bits == STAT_FP16:
            buf("scale_q", (n, g), torch.float16)
            buf("zero_q", (n, g), torch.float16)
            buf("scale_stats", None, torch.float16)
            buf("zero_stats", None, torch.float16)
        else:
            buf("scale_q", (n, packed_words(g, stat_bits)), torch.int32)
            buf("zero_q", (n, packed_words(g, stat_bits)), torch.int32)
            buf("scale_stats", (blocks, g, 2), torch.float16)
            buf("zero_stats", (blocks, g, 2), torch.float16)
        buf("outlier_rowptr", (n + 1,), torch.int32)
        buf("outlier_col", (nnz,), torch.int16)
        buf("outlier_val", (nnz,), torch.float16)
        buf("perm", (k,) if perm else None, torch.int32)
        buf("bias", (n,) if bias else None, torch.float32)

    @classmethod
    def from_tensors(cls, t: SpqrTensors, bias: torch.Tensor | None = None) -> SpQRLinear:
        """A module holding ``t`` (validated), on ``t``'s device."""
        t.validate()
        mod = cls(t.in_features, t.out_features, t.bits, t.group_size, t.stat_bits, t.stat_group, t.nnz,
                  t.perm is not None, bias is not None, device="meta")
        for name, value in t.tensors().items():
            setattr(mod, name, value.clone())
        if bias is not None:
            mod.bias = bias.detach().clone()
        return mod

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> SpQRLinear:
        if int(spec.get("version", FORMAT_VERSION)) != FORMAT_VERSION:
            from effllm_tools.errors import UnsupportedError

            raise UnsupportedError(f"spqr format version {spec.get('version')} is not supported "
                                   f"(this effllm reads version {FORMAT_VERSION})")
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["stat_bits"],
                   spec["stat_group"], spec.get("nnz", 0), spec.get("perm", False), spec.get("bias", False),
                   device=device)

    def tensors(self) -> SpqrTensors:
        """The buffers as :class:`SpqrTensors` (fp16 fields kept fp16 even if a cast touched them)."""
        fields = {name: getattr(self, name) for name in SpqrTensors.TENSOR_FIELDS}
        for name in _FP16_FIELDS + (("scale_q", "zero_q") if self.stat_bits == STAT_FP16 else ()):
            if fields[name] is not None and fields[name].dtype != torch.float16:
                fields[name] = fields[name].to(torch.float16)
        meta = {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "stat_bits": self.stat_bits, "stat_group": self.stat_group}
        return SpqrTensors(**meta, **fields)

    @property
    def nnz(self) -> int:
        return int(self.outlier_val.numel())

    def average_bits(self) -> float:
        """Exact bits per parameter of codes, statistics and outliers (``SpqrTensors.average_bits``)."""
        return self.tensors().average_bits()

    def spec(self) -> dict[str, Any]:
        return {
            "format": "spqr", "version": FORMAT_VERSION, "in_features": self.in_features,
            "out_features": self.out_features, "bits": self.bits, "group_size": self.group_size,
            "stat_bits": self.stat_bits, "stat_group": self.stat_group, "nnz": self.nnz,
            "perm": self.perm is not None, "bias": self.bias is not None, "avg_bits": self.average_bits(),
        }

    def dequantized(self) -> torch.Tensor:
        """The dense [out, in] fp32 weight this layer computes with (original column order)."""
        return dequantize(self.tensors())

    def _apply(self, fn: Any, recurse: bool = True) -> SpQRLinear:
        """Device moves apply; dtype casts (``model.half()``, ``.to(bfloat16)``) leave the packed
        fields alone (only the bias follows), so no cast can corrupt the stored layout."""
        for name, value in self._buffers.items():
            if value is None:
                continue
            moved = fn(value)
            self._buffers[name] = moved if name == "bias" or moved.dtype == value.dtype else value.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = getattr(spqr_kernels, "spqr_linear", None) or spqr_linear_reference
        return linear(x, self.tensors(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"stat_bits={self.stat_bits}, stat_group={self.stat_group}, nnz={self.nnz}")
