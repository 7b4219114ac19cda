"""Glue for ``spqr``: recipe keys, and how it changes the model (layer-wise, calibrated).

The walk is GPTQ's (:mod:`effllm_tools.methods.gptq.method`): one decoder layer at a time through
:func:`effllm_tools.pipeline.run_layerwise`, linears in true-sequential groups ``(q, k, v), (o),
(gate, up), (down)``, each swapped at once for its :class:`~.format.SpQRLinear` so later groups and
layers see the quantized weights (official ``main.py:quantize_spqr`` with ``true_sequential``).

Defaults are the ~3.6-bit configuration of the paper's headline (arXiv 2306.03078, Table 1):
3-bit weights, 3-bit scales and zeros, beta1 = beta2 = 16, act-order, percdamp 1.0 (the official
README recipe; ``main.py``'s bare default is 0.01): 3 + 6/16 + 64/256 = 3.625 bits per parameter plus
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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from effllm_kernels.spqr.layout import STAT_FP16
from effllm_tools.errors import BadInputError, UnsupportedError
from effllm_tools.methods.common import check_ignore_patterns, replace_module
from effllm_tools.methods.gptq.algorithm import CholeskyError, hessian_error
from effllm_tools.methods.gptq.method import layer_progress
from effllm_tools.methods.gptq.method import make_on_layer as gptq_make_on_layer
from effllm_tools.methods.rtn.algorithm import dequantize_codes, quantize_rtn
from effllm_tools.methods.spqr.algorithm import spqr_quantize
from effllm_tools.methods.spqr.format import SpQRLinear
from effllm_tools.pipeline import LayerContext, decoder_layers, make_fingerprint, run_layerwise
from effllm_tools.registry import MethodSpec, StageResult, register_method

# Per-linear numbers kept in ctx.artifacts (and so in the resume state):
# [spqr error, rtn error (same bits and groups, fp16 stats), damping retries, percdamp used, outliers].
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
    percdamp: float = 1.0  # damping relative to mean(diag H), raised x10 when Cholesky fails [percdamp]
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
    stats = torch.tensor([res.loss, hessian_error(w, rtn, hessian), res.retries, res.percdamp, res.tensors.nnz],
                         dtype=torch.float64)
    bias = lin.bias.data if lin.bias is not None else None
    return SpQRLinear.from_tensors(res.tensors, bias), stats


def _quantize_group(lctx: LayerContext, group: list[str], hessian: torch.Tensor, cfg: SpQRConfig,
                    log: Callable[[str], None]) -> None:
    for name in group:
        lin = lctx.layer.get_submodule(name)
        try:
            packed, stats = quantize_linear(lin, hessian, cfg)
        except CholeskyError as err:
            raise BadInputError(f"spqr: {lctx.name}.{name}: {err}") from None
        if stats[2] > 0:
            log(f"spqr: {lctx.name}.{name}: Cholesky failed at percdamp {cfg.percdamp:g}, "
                f"succeeded after raising it to {float(stats[3]):g}")
        replace_module(lctx.layer, name, packed)
        lctx.artifacts[name + _STATS] = stats


def make_on_layer(cfg: SpQRConfig, log: Callable[[str], None] = lambda _m: None) -> Callable[[LayerContext], None]:
    """The per-layer callback for :func:`run_layerwise`: GPTQ's layer walk with SpQR's group step."""
    return gptq_make_on_layer(cfg, log, _quantize_group)


def make_restore(cfg: SpQRConfig, arch: Any) -> Callable[[int, nn.Module, dict[str, torch.Tensor]], None]:
    """Resume: rebuild SpQRLinear modules (outlier counts from the saved state), then load the layer."""

    def restore(index: int, layer: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for name in arch.linear_names:
            lin = layer.get_submodule(name)
            if f"{name}.qweight" in state and isinstance(lin, nn.Linear):
                n, k = lin.weight.shape
                gs = k if cfg.group_size <= 0 or cfg.group_size > k else cfg.group_size
                mod = SpQRLinear(k, n, cfg.bits, gs, cfg.stat_bits, cfg.stat_group,
                                 int(state[f"{name}.outlier_val"].numel()), f"{name}.perm" in state,
                                 lin.bias is not None, device=lin.weight.device)
                replace_module(layer, name, mod)
        try:
            layer.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BadInputError(f"resume state of decoder layer {index} does not fit the model: "
                                f"{str(err).strip().splitlines()[0]}") from err

    return restore


def _metrics(ctx: Any, artifacts: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Record every module's spec; the parameter-weighted exact average bits and outlier share."""
    bits = params = nnz = 0.0
    for index, layer in enumerate(decoder_layers(ctx.model, ctx.arch)):
        for name, mod in layer.named_modules():
            if isinstance(mod, SpQRLinear):
                spec = mod.spec()
                ctx.record_module(f"{ctx.layers_prefix}.{index}.{name}", spec)
                size = mod.in_features * mod.out_features
                bits += spec["avg_bits"] * size
                params += size
                nnz += mod.nnz
    stats = [t for layer in artifacts for key, t in layer.items() if key.endswith(_STATS)]
    ratios = [float(s[0] / s[1]) for s in stats if s[1] > 0]
    return {
        "quantized_modules": len(stats),
        "avg_bits": bits / max(params, 1),
        "outlier_share": nnz / max(params, 1),
        "hessian_error_vs_rtn": sum(ratios) / max(len(ratios), 1),  # mean of tr(EHE^T) ratios
        "damping_retries": sum(int(s[2]) for s in stats),
        "max_percdamp": max((float(s[3]) for s in stats), default=0.0),
    }


def apply_spqr(ctx: Any, cfg: SpQRConfig) -> StageResult:
    """Calibrate layer by layer and replace every target linear by its SpQRLinear."""
    ids = ctx.calibration().input_ids
    device = torch.device(ctx.device)
    fingerprint = make_fingerprint(ctx.model, ids, {"method": "spqr", **asdict(cfg)})
    result = run_layerwise(
        ctx.model, ids, make_on_layer(cfg, ctx.reporter.warning), device=device,
        offload_activations=device.type == "cuda", state_dir=ctx.state_dir, resume=ctx.resume,
        fingerprint=fingerprint, restore_layer=make_restore(cfg, ctx.arch), arch=ctx.arch,
        progress=layer_progress(ctx, len(decoder_layers(ctx.model, ctx.arch)), "spqr layers"),
    )
    if result.resumed_from:
        ctx.reporter.info(f"spqr: resumed after layer {result.resumed_from - 1}")
    metrics = _metrics(ctx, result.artifacts)
    ctx.reporter.info(f"spqr: {metrics['quantized_modules']} linears, {metrics['avg_bits']:.4f} average bits, "
                      f"{metrics['outlier_share']:.3%} outliers")
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
