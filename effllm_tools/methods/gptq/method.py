"""Glue for ``gptq``: recipe keys, and how it changes the model (layer-wise, calibrated).

The model is walked one decoder layer at a time by :func:`effllm_tools.pipeline.run_layerwise`
(GPTQ §4 and the reference ``llama.py``). Inside a layer, the linears are taken in GPTQ's
"true sequential" order, ``(q, k, v), (o), (gate, up), (down)``: a group's Hessian is accumulated
from its inputs *after* the earlier groups were quantized, and each linear is swapped at once for
an :class:`~effllm_tools.methods.rtn.format.RTNLinear` holding its GPTQ codes, so later groups and
later layers see the quantized weights. The result is stored in the ``rtn`` format.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effllm_kernels.packing import pack_codes
from effllm_tools.errors import BadInputError
from effllm_tools.methods.common import (
    RestoreLayer,
    check_ignore_patterns,
    replace_module,
    run_calibrated_layers,
)
from effllm_tools.methods.gptq.algorithm import (
    CholeskyError,
    HessianAccumulator,
    gptq_quantize,
    hessian_error,
)
from effllm_tools.methods.rtn.algorithm import dequantize_codes, quantize_rtn, zero_counts
from effllm_tools.methods.rtn.format import RTNLinear
from effllm_tools.pipeline import LayerContext, decoder_layers
from effllm_tools.registry import MethodSpec, StageResult, register_method

# Per-linear numbers kept in ctx.artifacts (and so in the resume state): [gptq error, rtn error,
# damping retries, percdamp used, input exact zeros, of them kept].
_STATS = ".gptq_stats"
#: Resume state written before pruned inputs kept their zeros (and before the zero counts) is refused.
FINGERPRINT = {"keeps_pruned_zeros": 1}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GPTQConfig:
    """Recipe keys of the ``gptq`` stage."""

    bits: int = 4
    group_size: int = 128  # <= 0: one group per output row (per-channel)
    symmetric: bool = False
    act_order: bool = False  # visit columns by decreasing diag(H), static groups (no g_idx)
    percdamp: float = 0.01  # damping, relative to mean(diag H); raised x10 when Cholesky fails
    block_size: int = 128  # columns per lazy-batch block
    stats_dtype: str = "float16"  # float16 | bfloat16 | float32
    true_sequential: bool = True  # Hessians of later groups see the earlier groups quantized
    ignore: list[str] = field(default_factory=list)  # regexes on module names left in full precision

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BadInputError(f"gptq: bits must be between 2 and 8, got {self.bits}")
        if not self.percdamp > 0:
            raise BadInputError(f"gptq: percdamp must be > 0, got {self.percdamp}")
        if self.block_size < 1:
            raise BadInputError(f"gptq: block_size must be >= 1, got {self.block_size}")
        if self.stats_dtype not in _DTYPES:
            raise BadInputError(f"gptq: stats_dtype must be float16, bfloat16 or float32, got {self.stats_dtype!r}")
        check_ignore_patterns("gptq", self.ignore)


def group_size_for(cfg: Any, in_features: int) -> int:
    """The columns per group for ``in_features`` inputs (``group_size <= 0`` or too large: the whole row)."""
    gs = cfg.group_size
    return in_features if gs <= 0 or gs > in_features else gs


def _packed_module(lin: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   cfg: GPTQConfig) -> RTNLinear:
    """An :class:`RTNLinear` holding ``codes`` [N, K] and statistics [N, G], on ``lin``'s device."""
    n, k = lin.weight.shape
    mod = RTNLinear(k, n, cfg.bits, group_size_for(cfg, k), lin.bias is not None, cfg.stats_dtype,
                    device=lin.weight.device)
    mod.qweight.copy_(pack_codes(codes, cfg.bits))
    mod.scales.copy_(scales)
    mod.zeros.copy_(zeros)
    if lin.bias is not None:
        mod.bias = lin.bias.data.clone()
    return mod


def quantize_linear(lin: nn.Linear, hessian: torch.Tensor, cfg: GPTQConfig) -> tuple[RTNLinear, torch.Tensor]:
    """GPTQ one linear; returns its packed module and [gptq error, rtn error, retries, percdamp]."""
    w = lin.weight.data
    gs = group_size_for(cfg, w.shape[1])
    sd = _DTYPES[cfg.stats_dtype]
    res = gptq_quantize(w, hessian, cfg.bits, gs, symmetric=cfg.symmetric, stats_dtype=sd,
                        percdamp=cfg.percdamp, block_size=cfg.block_size, act_order=cfg.act_order)
    rtn = dequantize_codes(*quantize_rtn(w.float(), cfg.bits, gs, cfg.symmetric, sd), gs)
    stats = torch.tensor([res.loss, hessian_error(w, rtn, hessian), res.retries, res.percdamp,
                          *zero_counts(w, res.dequantized(gs))], dtype=torch.float64)
    return _packed_module(lin, res.codes, res.scales, res.zeros, cfg), stats


def layer_hessians(lctx: LayerContext, readers: list[str]) -> dict[str, torch.Tensor]:
    """One Hessian per name in ``readers`` (each the first kept linear of a group), one pass."""
    accs: dict[str, HessianAccumulator] = {}

    def add(name: str, x: torch.Tensor) -> None:
        if name not in accs:
            accs[name] = HessianAccumulator(x.shape[-1], device=x.device)
        accs[name].add(x)

    lctx.collect_inputs(readers, add)
    return {name: acc.hessian for name, acc in accs.items()}


def layer_groups(lctx: LayerContext, cfg: Any) -> list[list[str]]:
    """The layer's linear groups minus the modules ``cfg.ignore`` matches (names relative to the layer)."""
    groups = []
    for group in lctx.arch.linear_groups:
        kept = [n for n in group if not any(re.search(p, f"{lctx.name}.{n}") for p in cfg.ignore)]
        if kept:
            groups.append(kept)
    return groups


QuantizeLinear = Callable[[nn.Linear, torch.Tensor, Any], tuple[nn.Module, torch.Tensor]]
"""``quantize(lin, hessian, cfg)``: one linear's packed module and its statistics
[error, rtn error, damping retries, percdamp used, ...]."""
GroupStep = Callable[[LayerContext, list[str], torch.Tensor, Any, Callable[[str], None]], None]


def make_group_step(method: str, quantize: QuantizeLinear, stats_key: str) -> GroupStep:
    """``quantize_group(lctx, group, hessian, cfg, log)`` for :func:`make_on_layer`.

    Each linear of ``group`` is quantized with the group's shared Hessian (its inputs are the same)
    and swapped at once for its packed module, so the next group's inputs see it (GPTQ §4, the
    reference's ``true_sequential``); its statistics go to ``lctx.artifacts[name + stats_key]``.
    A failed Cholesky factorization even after raising the damping is a bad input (exit 2).
    """

    def quantize_group(lctx: LayerContext, group: list[str], hessian: torch.Tensor, cfg: Any,
                       log: Callable[[str], None]) -> None:
        for name in group:
            lin = lctx.layer.get_submodule(name)
            try:
                packed, stats = quantize(lin, hessian, cfg)
            except CholeskyError as err:
                raise BadInputError(f"{method}: {lctx.name}.{name}: {err}") from None
            if stats[2] > 0:
                log(f"{method}: {lctx.name}.{name}: Cholesky failed at percdamp {cfg.percdamp:g}, "
                    f"succeeded after raising it to {float(stats[3]):g}")
            replace_module(lctx.layer, name, packed)
            lctx.artifacts[name + stats_key] = stats

    return quantize_group


_quantize_group = make_group_step("gptq", quantize_linear, _STATS)


def make_on_layer(cfg: Any, log: Callable[[str], None] = lambda _m: None,
                  quantize_group: GroupStep | None = None) -> Callable[[LayerContext], None]:
    """The per-layer callback for :func:`run_layerwise` (true-sequential or all groups at once).

    ``quantize_group(lctx, group, hessian, cfg, log)`` quantizes one group of linears sharing their
    inputs; default GPTQ's. SpQR passes its own and reuses this walk.
    """
    quantize = quantize_group or _quantize_group

    def on_layer(lctx: LayerContext) -> None:
        with torch.no_grad():
            groups = layer_groups(lctx, cfg)
            if cfg.true_sequential:
                for group in groups:
                    quantize(lctx, group, layer_hessians(lctx, group[:1])[group[0]], cfg, log)
            else:
                hessians = layer_hessians(lctx, [g[0] for g in groups])
                for group in groups:
                    quantize(lctx, group, hessians[group[0]], cfg, log)

    return on_layer


EmptyModule = Callable[[str, nn.Linear, dict[str, torch.Tensor]], nn.Module]
"""``empty_module(name, lin, state)``: the packed module that takes ``lin``'s place on resume."""


def make_swap_restore(arch: Any, empty_module: EmptyModule) -> RestoreLayer:
    """Resume: where the saved layer holds packed weights (``{name}.qweight``), swap the linear for
    ``empty_module(name, lin, state)`` (a packed module of the right shapes), then load the state."""

    def restore(index: int, layer: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for name in arch.linear_names:
            lin = layer.get_submodule(name)
            if f"{name}.qweight" in state and isinstance(lin, nn.Linear):
                replace_module(layer, name, empty_module(name, lin, state))
        try:
            layer.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BadInputError(f"resume state of decoder layer {index} does not fit the model: "
                                f"{str(err).strip().splitlines()[0]}") from err

    return restore


def make_restore(cfg: GPTQConfig, arch: Any) -> RestoreLayer:
    """Resume: swap in RTNLinear modules where the saved layer has packed weights, then load it."""

    def empty_module(_name: str, lin: nn.Linear, _state: dict[str, torch.Tensor]) -> RTNLinear:
        n, k = lin.weight.shape
        ones = torch.ones(n, -(-k // group_size_for(cfg, k)))
        return _packed_module(lin, torch.zeros(n, k, dtype=torch.uint8), ones, ones, cfg)

    return make_swap_restore(arch, empty_module)


def packed_modules(ctx: Any, cls: type[nn.Module]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Every ``cls`` module inside the decoder layers with its format spec, recorded in ``ctx``."""
    for index, layer in enumerate(decoder_layers(ctx.model, ctx.arch)):
        for name, mod in layer.named_modules():
            if isinstance(mod, cls):
                spec = mod.spec()
                ctx.record_module(f"{ctx.layers_prefix}.{index}.{name}", spec)
                yield mod, spec


def stats_metrics(artifacts: list[dict[str, torch.Tensor]], stats_key: str, zeros_at: int,
                  **measures: float) -> dict[str, Any]:
    """The stage's metrics from the per-linear statistics [error, rtn error, retries, percdamp, ...]:
    ``quantized_modules``, then ``measures`` (e.g. ``avg_bits``), then the mean ratio of the Hessian
    errors ``tr(E H E^T)`` (GPTQ eq. 1) to RTN's, the damping retries, the largest percdamp used, and the
    input's exact zeros and how many were kept (:func:`zero_counts`, at ``zeros_at`` and the next entry)."""
    stats = [t for layer in artifacts for key, t in layer.items() if key.endswith(stats_key)]
    ratios = [float(s[0] / s[1]) for s in stats if s[1] > 0]
    return {
        "quantized_modules": len(stats),
        **measures,
        "hessian_error_vs_rtn": sum(ratios) / max(len(ratios), 1),
        "damping_retries": sum(int(s[2]) for s in stats),
        "max_percdamp": max((float(s[3]) for s in stats), default=0.0),
        "input_exact_zeros": sum(int(s[zeros_at]) for s in stats if len(s) > zeros_at + 1),  # (older states: none)
        "exact_zeros_kept": sum(int(s[zeros_at + 1]) for s in stats if len(s) > zeros_at + 1),
    }


def _metrics(ctx: Any, artifacts: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Record every packed module's spec; sum storage and the per-linear GPTQ statistics."""
    stored = weights = 0
    for mod, _spec in packed_modules(ctx, RTNLinear):
        stored += mod.storage_bits()
        weights += mod.in_features * mod.out_features
    return stats_metrics(artifacts, _STATS, 4, avg_bits=stored / max(weights, 1))


def apply_gptq(ctx: Any, cfg: GPTQConfig) -> StageResult:
    """Calibrate layer by layer and replace every target linear by its GPTQ-quantized RTNLinear."""
    result = run_calibrated_layers(ctx, cfg, make_on_layer(cfg, ctx.reporter.warning), method="gptq",
                                   restore_layer=make_restore(cfg, ctx.arch), fingerprint_extra=FINGERPRINT)
    return StageResult(metrics=_metrics(ctx, result.artifacts))


register_method(
    MethodSpec(
        name="gptq",
        verb="quantize",
        kind="weight-quant",
        summary="GPTQ: Hessian-aware groupwise weights, 2-8 bits, stored as rtn",
        config=GPTQConfig,
        apply=apply_gptq,
        needs_calibration=True,
        paper="arXiv 2210.17323",
    )
)
