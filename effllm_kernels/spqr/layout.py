"""The ``spqr`` weight format as stored in safetensors: the contract between the SpQR method and
its kernels (SpQR, arXiv 2306.03078, §4.1-4.2).

One linear layer ``y = x W^T`` with ``W`` [N, K] is stored in *stored column order*: stored
column ``j`` holds original column ``perm[j]`` (act-order permutation; identity when ``perm`` is
None), so ``y = x[..., perm] @ W_s^T`` with

    W_s[n, j] = scale[n, g] * (code[n, j] - zero[n, g]) + outlier[n, j],   g = j // group_size

- ``code`` [N, K]: ``bits``-bit unsigned codes, dense LSB-first bit streams per row
  (:mod:`effllm_kernels.packing`), ``qweight`` [N, packed_words(K, bits)] int32.
- first-level statistics per (row n, group g), G = ceil(K / group_size) groups (the last may be
  shorter): ``scale`` and ``zero`` (zero in code units, may be non-integer).
  With ``stat_bits`` < 16 they are themselves quantized (§4.1 "bilevel quantization"): per group g
  and per block of ``stat_group`` consecutive output rows b = n // stat_group,
      scale[n, g] = scale_stats[b, g, 0] * (scale_code[n, g] - scale_stats[b, g, 1])
      zero[n, g]  = zero_stats[b, g, 0]  * (zero_code[n, g]  - zero_stats[b, g, 1])
  where ``scale_q`` / ``zero_q`` hold the ``stat_bits``-bit codes packed per row
  ([N, packed_words(G, stat_bits)] int32) and ``scale_stats`` / ``zero_stats`` are fp16
  [ceil(N / stat_group), G, 2] (step, zero-point). With ``stat_bits`` == 16, ``scale_q`` and
  ``zero_q`` are the fp16 values [N, G] and the ``*_stats`` tensors are None.
- outliers (§4.2): CSR over rows in stored column order: ``outlier_rowptr`` [N+1] int32,
  ``outlier_col`` [nnz] int16 read as unsigned 16-bit (so K <= 65536), ``outlier_val`` [nnz] fp16
  *added* to the dequantized weight at (row, stored column).

Average bits per parameter (paper §4.1; official ``get_average_number_of_bits``), counted from the
tensors themselves so ragged groups and blocks are exact:
    (N*K*bits + N*G*(bits_s + bits_z) + blocks*G*64 + nnz*32) / (N*K)
which for 3-bit weights, 3-bit statistics and 16/16 groups without outliers is 3 + 6/16 + 64/256
= 3.625. The permutation and row pointers are metadata (32/N and 32/K bits per parameter).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from effllm_kernels.packing import packed_words

FORMAT_VERSION = 1
STAT_FP16 = 16


class LayerFields:
    """What both layouts of one layer share (:class:`SpqrTensors` here, ``SpqrKernelTensors`` in
    :mod:`.repack`): the integer fields, the tensor names and the helpers over them."""

    TENSOR_FIELDS = ("qweight", "scale_q", "zero_q", "scale_stats", "zero_stats",
                     "outlier_rowptr", "outlier_col", "outlier_val", "perm")
    INT_FIELDS = ("in_features", "out_features", "bits", "group_size", "stat_bits", "stat_group")
    in_features: int
    out_features: int
    group_size: int
    stat_group: int
    outlier_val: torch.Tensor

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def n_blocks(self) -> int:
        return -(-self.out_features // self.stat_group)

    @property
    def nnz(self) -> int:
        return int(self.outlier_val.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (None fields left out)."""
        return {name: getattr(self, name) for name in self.TENSOR_FIELDS if getattr(self, name) is not None}

    def meta(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in self.INT_FIELDS}

    def storage_bytes(self) -> int:
        """Bytes the tensors occupy (for the stored layout: what safetensors writes, headers aside)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> Any:
        """A copy with every tensor on ``device`` (same class)."""
        out = type(self)(**{f.name: getattr(self, f.name) for f in fields(self)})  # type: ignore[arg-type]
        for name in self.TENSOR_FIELDS:
            t = getattr(out, name)
            if t is not None:
                setattr(out, name, t.to(device))
        return out


@dataclass
class SpqrTensors(LayerFields):
    """The tensors and integers of one SpQR-quantized linear layer (see the module docstring)."""

    in_features: int  # K
    out_features: int  # N
    bits: int  # weight code bits, 2..8
    group_size: int  # beta1: input columns per first-level group
    stat_bits: int  # bits of quantized scales and zeros (2..8), or 16 for fp16 statistics
    stat_group: int  # beta2: output rows per second-level block
    qweight: torch.Tensor  # int32 [N, packed_words(K, bits)]
    scale_q: torch.Tensor  # int32 [N, packed_words(G, stat_bits)], or fp16 [N, G] when stat_bits == 16
    zero_q: torch.Tensor  # same as scale_q
    scale_stats: torch.Tensor | None  # fp16 [ceil(N / stat_group), G, 2] (step, zero-point), None for fp16 stats
    zero_stats: torch.Tensor | None  # same
    outlier_rowptr: torch.Tensor  # int32 [N + 1]
    outlier_col: torch.Tensor  # int16 [nnz], unsigned stored column
    outlier_val: torch.Tensor  # fp16 [nnz]
    perm: torch.Tensor | None = None  # int32 [K]: stored column j is original column perm[j]

    @classmethod
    def from_parts(cls, meta: dict[str, int], tensors: dict[str, torch.Tensor]) -> SpqrTensors:
        names = {f.name for f in fields(cls)}
        kwargs: dict = {k: int(v) for k, v in meta.items() if k in cls.INT_FIELDS}
        kwargs.update({k: tensors.get(k) for k in cls.TENSOR_FIELDS if k in names})
        t = cls(**kwargs)
        t.validate()
        return t

    def average_bits(self) -> float:
        """Exact average bits per parameter of weights, statistics and outliers (module docstring)."""
        n, k, g = self.out_features, self.in_features, self.n_groups
        stat = STAT_FP16 if self.stat_bits == STAT_FP16 else self.stat_bits
        second = 0 if self.stat_bits == STAT_FP16 else self.n_blocks * g * 64
        total = n * k * self.bits + n * g * 2 * stat + second + self.nnz * 32
        return total / (n * k)

    def validate(self) -> None:
        """Raise ValueError when shapes or dtypes break the contract (corrupt or foreign checkpoint)."""
        n, k, g = self.out_features, self.in_features, self.n_groups
        if not 2 <= self.bits <= 8:
            raise ValueError(f"spqr: weight bits {self.bits} not in 2..8")
        if self.stat_bits != STAT_FP16 and not 2 <= self.stat_bits <= 8:
            raise ValueError(f"spqr: statistic bits {self.stat_bits} not in 2..8 or 16")
        if k > 65536:
            raise ValueError(f"spqr: in_features {k} > 65536 does not fit 16-bit outlier columns")
        expect = {
            "qweight": ((n, packed_words(k, self.bits)), torch.int32),
            "outlier_rowptr": ((n + 1,), torch.int32),
            "outlier_col": ((self.nnz,), torch.int16),
            "outlier_val": ((self.nnz,), torch.float16),
        }
        if self.stat_bits == STAT_FP16:
            expect["scale_q"] = ((n, g), torch.float16)
            expect["zero_q"] = ((n, g), torch.float16)
        else:
            for name in ("scale_q", "zero_q"):
                expect[name] = ((n, packed_words(g, self.stat_bits)), torch.int32)
            for name in ("scale_stats", "zero_stats"):
                expect[name] = ((self.n_blocks, g, 2), torch.float16)
        if self.perm is not None:
            expect["perm"] = ((k,), torch.int32)
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise ValueError(f"spqr: tensor {name} should be {shape} {dtype}, got {got}")
