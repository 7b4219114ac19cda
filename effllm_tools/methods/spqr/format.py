"""The ``spqr`` checkpoint format and the module that runs it.

Tensors per quantized linear layer ``<name>`` are the fields of
:class:`effllm_kernels.spqr.layout.SpqrTensors` (that module's docstring is the layout contract):
``<name>.qweight``, ``.scale_q``, ``.zero_q``, ``.scale_stats`` / ``.zero_stats`` (quantized
statistics only), ``.outlier_rowptr``, ``.outlier_col``, ``.outlier_val``, ``.perm`` (act-order
only), and ``.bias`` if the layer had one. ``config.json`` carries
``quantization_config.modules[<name>] = {"format": "spqr", "version", "in_features",
"out_features", "bits", "group_size", "stat_bits", "stat_group", "nnz", "perm", "bias",
"avg_bits"}``: everything needed to rebuild the module's buffers before the weights load.

On CUDA the module swaps its code and statistics buffers, in place, for the layout the kernels
read (:func:`effllm_kernels.spqr.repack.repack`: the same bytes rearranged, no second copy) when
it is moved there or first runs there, and adds a bucketed copy of its outliers for the CUDA GEMV
(a non-persistent buffer, ~4 bytes per outlier); ``state_dict`` (and so ``save_pretrained``)
unpacks them again, so a saved model is always in the stored format above, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import effllm_kernels.spqr as spqr_kernels
from effllm_kernels.packing import packed_words
from effllm_kernels.spqr.layout import FORMAT_VERSION, STAT_FP16, SpqrTensors
from effllm_kernels.spqr.reference import dequantize, spqr_linear_reference
from effllm_kernels.spqr.repack import SpqrKernelTensors, buckets_for, repack_field, unpack_field
from effllm_kernels.spqr.scratch import reserve
from effllm_tools.registry import register_format

_FP16_FIELDS = ("scale_stats", "zero_stats", "outlier_val")
#: Buffers whose layout the load-time repack changes (the others are the same in both layouts).
_REPACKED = ("qweight", "scale_q", "zero_q", "scale_stats", "zero_stats")


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
        self.kernel_layout = False  # True once the buffers hold the kernels' layout (repack_for_kernels)

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

    def _meta(self) -> dict[str, int]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "stat_bits": self.stat_bits, "stat_group": self.stat_group}

    def _fields(self) -> dict[str, torch.Tensor | None]:
        """The buffers by field name (fp16 fields kept fp16 even if a cast touched them)."""
        fields = {name: getattr(self, name) for name in SpqrTensors.TENSOR_FIELDS}
        for name in _FP16_FIELDS + (("scale_q", "zero_q") if self.stat_bits == STAT_FP16 else ()):
            if fields[name] is not None and fields[name].dtype != torch.float16:
                fields[name] = fields[name].to(torch.float16)
        return fields

    def tensors(self) -> SpqrTensors:
        """The layer in the stored layout (unpacked from the kernels' layout when repacked: a copy)."""
        fields = self._fields()
        if self.kernel_layout:
            fields = {name: unpack_field(name, v, self._meta()) for name, v in fields.items()}
        return SpqrTensors(**self._meta(), **fields)

    def layer(self) -> SpqrTensors | SpqrKernelTensors:
        """The buffers as they are: :class:`SpqrKernelTensors` (with the bucketed outliers of the CUDA
        GEMV, on CUDA) when repacked, else :class:`SpqrTensors`."""
        if self.kernel_layout:
            return SpqrKernelTensors(**self._meta(), **self._fields(),
                                     outlier_buckets=self._buffers.get("outlier_buckets"))
        return SpqrTensors(**self._meta(), **self._fields())

    def repack_for_kernels(self) -> None:
        """Swap the code and statistics buffers for the Triton kernels' layout, in place (no copy kept).

        Done automatically when the module moves to, or first runs on, a CUDA device.
        """
        if not self.kernel_layout:
            self._set_layout(True)

    def unpack_buffers(self) -> None:
        """Put the stored layout back into the buffers (the inverse of :meth:`repack_for_kernels`)."""
        if self.kernel_layout:
            self._set_layout(False)

    def _set_layout(self, kernel: bool) -> None:
        convert = repack_field if kernel else unpack_field
        for name in _REPACKED:
            if self._buffers.get(name) is not None:
                self._buffers[name] = convert(name, self._buffers[name], self._meta())
        self.kernel_layout = kernel
        self._set_buckets()

    def _set_buckets(self) -> None:
        """The CUDA GEMV's copy of the outliers (kernel layout on CUDA; else None): derived from the CSR
        outlier buffers, never saved (not in the state dict)."""
        buckets = buckets_for(SpqrTensors(**self._meta(), **self._fields())) if self.kernel_layout else None
        self.register_buffer("outlier_buckets", buckets, persistent=False)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The stored layout, whatever layout the buffers hold (so checkpoints never change format)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:
            for name in _REPACKED:
                if prefix + name in destination:
                    destination[prefix + name] = unpack_field(name, destination[prefix + name], self._meta())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self.unpack_buffers()  # a state dict always holds the stored layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        if self.qweight.is_cuda and not self.kernel_layout:
            self.repack_for_kernels()
        elif self.qweight.is_cuda:  # already repacked, moved to another GPU: its scratch, reserved there now
            reserve(self.qweight.device, self._meta())
            if self._buffers.get("outlier_buckets") is None:  # repacked on the CPU: the CUDA GEMV's copy, now
                self._set_buckets()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight.is_cuda and not self.kernel_layout and not torch.compiler.is_compiling():
            self.repack_for_kernels()  # loaded straight onto the GPU (device_map): repack on first use
        linear = getattr(spqr_kernels, "spqr_linear", None)
        if linear is None:
            return spqr_linear_reference(x, self.tensors(), self.bias)
        return linear(x, self.layer(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"stat_bits={self.stat_bits}, stat_group={self.stat_group}, nnz={self.nnz}")
