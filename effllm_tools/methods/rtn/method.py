"""Glue for ``rtn``: recipe keys, and how it changes the model (data-free, module by module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from effllm_tools.errors import BadInputError
from effllm_tools.methods.common import check_ignore_patterns, replace_module, target_linears
from effllm_tools.methods.rtn.algorithm import zero_counts
from effllm_tools.methods.rtn.format import RTNLinear
from effllm_tools.registry import MethodSpec, StageResult, register_method


@dataclass
class RTNConfig:
    """Recipe keys of the ``rtn`` stage."""

    bits: int = 4
    group_size: int = 128  # <= 0: one group per output row (per-channel)
    symmetric: bool = False
    stats_dtype: str = "float16"  # float16 | bfloat16 | float32
    ignore: list[str] = field(default_factory=list)  # regexes on module names left in full precision

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BadInputError(f"rtn: bits must be between 2 and 8, got {self.bits}")
        if self.stats_dtype not in ("float16", "bfloat16", "float32"):
            raise BadInputError(f"rtn: stats_dtype must be float16, bfloat16 or float32, got {self.stats_dtype!r}")
        check_ignore_patterns("rtn", self.ignore)


@torch.no_grad()
def apply_rtn(ctx: Any, cfg: RTNConfig) -> StageResult:
    """Quantize every target linear to RTN codes and swap in :class:`RTNLinear` modules."""
    targets = target_linears(ctx.model, ctx.layers_prefix, cfg.ignore)
    stored = weights = zeros_in = zeros_kept = 0
    sq_err = sq_ref = 0.0
    for name, lin in ctx.progress_iter(list(targets.items()), "rtn"):
        q = RTNLinear.from_linear(lin, cfg.bits, cfg.group_size, cfg.symmetric, cfg.stats_dtype)
        w = lin.weight.data.float()
        w_hat = q.dequantized().float()
        sq_err += float((w - w_hat).pow(2).sum())
        sq_ref += float(w.pow(2).sum())
        stored += q.storage_bits()
        z_in, z_kept = zero_counts(w, w_hat)  # pruned weights (e.g. wanda): rtn keeps them exact zeros
        zeros_in += z_in
        zeros_kept += z_kept
        weights += w.numel()
        replace_module(ctx.model, name, q.to(lin.weight.device))
        ctx.record_module(name, q.spec())
    return StageResult(
        metrics={
            "quantized_modules": len(targets),
            "avg_bits": stored / max(weights, 1),
            "weight_rel_error": (sq_err / max(sq_ref, 1e-30)) ** 0.5,
            "input_exact_zeros": zeros_in,
            "exact_zeros_kept": zeros_kept,
        }
    )


register_method(
    MethodSpec(
        name="rtn",
        verb="quantize",
        kind="weight-quant",
        summary="round-to-nearest groupwise weights, 2-8 bits (baseline)",
        config=RTNConfig,
        apply=apply_rtn,
    )
)
