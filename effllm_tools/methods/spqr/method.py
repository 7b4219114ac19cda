"""Glue for ``spqr``: recipe keys, and how it changes the model (layer-wise, calibrated).

The walk is GPTQ's (:mod:`effllm_tools.methods.gptq.method`): one decoder layer at a time through
:func:`effllm_tools.pipeline.run_layerwise`, linears in true-sequential groups ``(q, k, v), (o),
(gate, up), (down)``, each swapped at once for its :class:`~.format.SpQRLinear` so later groups and
layers see the quantized weights (official ``main.py:quantize_spqr`` with ``true_sequential``).

Defaults are the ~3.6-bit configuration of the paper's headline (arXiv 2306.03078, Table 1):
3-bit weights, 3-bit scales and zeros, beta1 = beta2 = 16, act-order, percdamp 0.01 (official
``main.py``'s default; its README recipe passes 1.0, which damps the Hessian by its mean diagonal and
weakens the error compensation: on the demo model 0.01 takes the 3-bit row from PPL 32.25 to 30.37,
BENCHMARKS.md): 3 + 6/16 + 64/256 = 3.625 bits per parameter plus
32 bits per outlier. The outlier threshold is tau = 0.7, not the README's 0.2: the criterion is
relative to the layer's own quantization error, so at 3 bits tau = 0.2 made 1.74% of the demo
model's weights outliers (4.18 bits; layers 0-2, 16 x 512 calib-mix tokens), against 0.23% at 0.5
(3.70 bits), 0.10% at 0.7 (3.66 bits) and 0.05% at 1.0 (3.64 bits). The ~4.6-bit configuration is
the README's: ``bits: 4`` with tau = 0.2 (0.09% outliers, 4.65 bits on the same layers;
``recipes/spqr-4bit.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effllm_kernels.spqr.layout import STAT_FP16
from effllm_tools.errors import BadInputError, UnsupportedError
from effllm_tools.methods.common import RestoreLayer, check_ignore_patterns, run_calibrated_layers
from effllm_tools.methods.gptq.algorithm import hessian_error
from effllm_tools.methods.gptq.method import (
    FINGERPRINT,
    group_size_for,
    make_group_step,
    make_swap_restore,
    packed_modules,
    stats_metrics,
)
from effllm_tools.methods.gptq.method import make_on_layer as gptq_make_on_layer
from effllm_tools.methods.rtn.algorithm import dequantize_codes, quantize_rtn, zero_counts
from effllm_tools.methods.spqr.algorithm import spqr_quantize
from effllm_tools.methods.spqr.format import SpQRLinear
from effllm_tools.pipeline import LayerContext
from effllm_tools.registry import MethodSpec, StageResult, register_method

# Per-linear numbers kept in ctx.artifacts (and so in the resume state):
# [spqr error, rtn error (same bits and groups, fp16 stats), damping retries, percdamp used, outliers,
# input exact zeros, of them kept].
_STATS = ".spqr_stats"
_MAX_IN_FEATURES = 65536  # outlier columns are stored as unsigned 16-bit


@dataclass
class SpQRConfig:
    """Recipe keys of the ``spqr`` stage (official names in brackets)."""

    bits: int = 3  # weight code bits [wbits]
    group_size: int = 16  # beta1: input columns per first-level group [groupsize]; <= 0: whole row
    stat_bits: int = 3  # bits of the quantized scales and zeros [qq_scale_bits = qq_zero_bits]; 16: fp16
    stat_group: int = 16  # beta2: output rows per second-level block [qq_groupsize]
    outlier_threshold: float | None = 0.7  # tau [outlier_threshold]; null or .inf: no outliers (docstring)
    simplified_outliers: bool = False  # skip the leave-one-out pass [simplified_outliers]
    act_order: bool = True  # visit (and group) columns by decreasing diag(H) [permutation_order=act_order]
    percdamp: float = 0.01  # damping relative to mean(diag H), raised x10 when Cholesky fails [percdamp]
    block_size: int = 128  # columns per lazy-batch block [blocksize]
    true_sequential: bool = True  # Hessians of later groups see the earlier groups quantized
    ignore: list[str] = field(default_factory=list)  # regexes on module names left in full precision

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BadInputError(f"spqr: bits must be between 2 and 8, got {self.bits}")
        if self.stat_bits != STAT_FP16 and not 2 <= self.stat_bits <= 8:
            raise BadInputError(f"spqr: stat_bits must be between 2 and 8, or 16 for fp16 statistics, "
                                f"got {self.stat_bits}")
        if self.stat_group < 1:
            raise BadInputError(f"spqr: stat_group must be >= 1, got {self.stat_group}")
        tau = self.outlier_threshold
        if tau is not None and (math.isnan(tau) or tau <= 0):
            raise BadInputError(f"spqr: outlier_threshold must be > 0 (or null / .inf for no outliers), got {tau}")
        if tau is not None and math.isinf(tau):
            self.outlier_threshold = None  # one spelling of "no outliers", and JSON-safe
        if not self.percdamp > 0 or math.isinf(self.percdamp):
            raise BadInputError(f"spqr: percdamp must be a finite number > 0, got {self.percdamp}")
        if self.block_size < 1:
            raise BadInputError(f"spqr: block_size must be >= 1, got {self.block_size}")
        check_ignore_patterns("spqr", self.ignore)


def quantize_linear(lin: nn.Linear, hessian: torch.Tensor, cfg: SpQRConfig) -> tuple[SpQRLinear, torch.Tensor]:
    """SpQR one linear; returns its module and [spqr error, rtn error, retries, percdamp, outliers]."""
    w = lin.weight.data
    n, k = w.shape
    if k > _MAX_IN_FEATURES:
        raise UnsupportedError(f"spqr: in_features {k} > {_MAX_IN_FEATURES} does not fit the 16-bit outlier columns")
    res = spqr_quantize(w, hessian, bits=cfg.bits, group_size=cfg.group_size, stat_bits=cfg.stat_bits,
                        stat_group=cfg.stat_group, outlier_threshold=cfg.outlier_threshold,
                        simplified_outliers=cfg.simplified_outliers, act_order=cfg.act_order,
                        percdamp=cfg.percdamp, block_size=cfg.block_size)
    gs = res.tensors.group_size
    rtn = dequantize_codes(*quantize_rtn(w.float(), cfg.bits, gs), gs)
    stats = torch.tensor([res.loss, hessian_error(w, rtn, hessian), res.retries, res.percdamp, res.tensors.nnz,
                          *zero_counts(w, res.weight)], dtype=torch.float64)
    bias = lin.bias.data if lin.bias is not None else None
    return SpQRLinear.from_tensors(res.tensors, bias), stats


_quantize_group = make_group_step("spqr", quantize_linear, _STATS)


def make_on_layer(cfg: SpQRConfig, log: Callable[[str], None] = lambda _m: None) -> Callable[[LayerContext], None]:
    """The per-layer callback for :func:`run_layerwise`: GPTQ's layer walk with SpQR's group step."""
    return gptq_make_on_layer(cfg, log, _quantize_group)


def make_restore(cfg: SpQRConfig, arch: Any) -> RestoreLayer:
    """Resume: rebuild SpQRLinear modules (outlier counts from the saved state), then load the layer."""

    def empty_module(name: str, lin: nn.Linear, state: dict[str, torch.Tensor]) -> SpQRLinear:
        n, k = lin.weight.shape
        outliers = int(state[f"{name}.outlier_val"].numel())
        return SpQRLinear(k, n, cfg.bits, group_size_for(cfg, k), cfg.stat_bits, cfg.stat_group, outliers,
                          f"{name}.perm" in state, lin.bias is not None, device=lin.weight.device)

    return make_swap_restore(arch, empty_module)


def _metrics(ctx: Any, artifacts: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Record every module's spec; the parameter-weighted exact average bits and outlier share."""
    bits = params = nnz = 0.0
    for mod, spec in packed_modules(ctx, SpQRLinear):
        size = mod.in_features * mod.out_features
        bits += spec["avg_bits"] * size
        params += size
        nnz += mod.nnz
    return stats_metrics(artifacts, _STATS, 5, avg_bits=bits / max(params, 1), outlier_share=nnz / max(params, 1))


def apply_spqr(ctx: Any, cfg: SpQRConfig) -> StageResult:
    """Calibrate layer by layer and replace every target linear by its SpQRLinear."""
    result = run_calibrated_layers(ctx, cfg, make_on_layer(cfg, ctx.reporter.warning), method="spqr",
                                   restore_layer=make_restore(cfg, ctx.arch), fingerprint_extra=FINGERPRINT)
    metrics = _metrics(ctx, result.artifacts)
    ctx.reporter.info(f"spqr: {metrics['quantized_modules']} linears, {metrics['avg_bits']:.4f} average bits, "
                      f"{metrics['outlier_share']:.3%} outliers")
    zeros, kept = metrics["input_exact_zeros"], metrics["exact_zeros_kept"]
    if kept < zeros:  # zero_counts counts the pruned linears only
        ctx.reporter.warning(f"spqr: the input was pruned ({zeros} exact zeros) and spqr keeps only {kept} of them "
                             "(its quantized zero points cannot represent 0 exactly); gptq and rtn keep them")
    return StageResult(metrics=metrics)


register_method(
    MethodSpec(
        name="spqr",
        verb="quantize",
        kind="weight-quant",
        summary="SpQR: small groups, quantized statistics, fp16 outliers (~3.6 bits)",
        config=SpQRConfig,
        apply=apply_spqr,
        needs_calibration=True,
        paper="arXiv 2306.03078",
    )
)
