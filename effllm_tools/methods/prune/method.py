"""Glue for ``magnitude`` and ``wanda``: recipe keys, model walking, measured sparsity.

``magnitude`` is data-free: it walks the decoder linears directly. ``wanda`` (arXiv 2306.11695,
Algorithm 1 and the official ``lib/prune.py:prune_wanda``) walks the decoder layers with the shared
calibration pipeline: for each layer it accumulates every linear's input norms over all calibration
tokens in one pass through the still dense layer, prunes all the layer's linears, and the pruned
layer's outputs feed the next layer. The output is a dense checkpoint with exact zeros (no
``quantization_config``), loadable by plain transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from effllm_tools.errors import BadInputError
from effllm_tools.methods.common import check_ignore_patterns, run_calibrated_layers, target_linears
from effllm_tools.methods.prune.algorithm import (
    SparsityPattern,
    accumulate_sq_norms,
    apply_mask_,
    magnitude_scores,
    parse_sparsity,
    prune_mask,
    wanda_scores,
    zero_count,
)
from effllm_tools.registry import MethodSpec, StageResult, register_method


@dataclass
class PruneConfig:
    """Recipe keys shared by the pruning stages."""

    method_name: ClassVar[str] = "prune"

    sparsity: str | float = "0.5"  # a ratio in [0, 1) such as "0.5", or "N:M" such as "2:4"
    ignore: list[str] = field(default_factory=list)  # regexes on module names left dense

    def pattern(self) -> SparsityPattern:
        try:
            return parse_sparsity(self.sparsity)
        except ValueError as err:
            raise BadInputError(f"{self.method_name}: sparsity: {err}") from None

    def validate(self) -> None:
        self.pattern()
        check_ignore_patterns(self.method_name, self.ignore)


@dataclass
class MagnitudeConfig(PruneConfig):
    """Recipe keys of the ``magnitude`` stage (data-free)."""

    method_name: ClassVar[str] = "magnitude"


@dataclass
class WandaConfig(PruneConfig):
    """Recipe keys of the ``wanda`` stage (the calibration keys are the recipe's ``calibration``)."""

    method_name: ClassVar[str] = "wanda"


def prune_targets(model: nn.Module, layers_prefix: str, cfg: PruneConfig) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, minus the ignored names; checks N:M divisibility."""
    pattern = cfg.pattern()
    found = target_linears(model, layers_prefix, cfg.ignore)
    for name, mod in found.items():
        if pattern.structured and mod.in_features % pattern.m:
            raise BadInputError(f"{cfg.method_name}: sparsity {pattern.describe()}: {name} has "
                                f"{mod.in_features} input features, not a multiple of {pattern.m} "
                                f"(leave it dense with the 'ignore' key)")
    return found


def sparsity_metrics(targets: dict[str, nn.Linear], layers_prefix: str, pattern: SparsityPattern) -> dict[str, Any]:
    """Measured fraction of exact zeros: overall, per linear type (``q_proj``...), per decoder layer."""
    tallies: dict[str, dict[str, list[int]]] = {"type": {}, "layer": {}}
    for name, lin in targets.items():
        zeros, total = zero_count(lin.weight), lin.weight.numel()
        layer = name[len(layers_prefix) + 1:].split(".", 1)[0]
        for kind, key in (("type", name.rsplit(".", 1)[-1]), ("layer", layer)):
            tally = tallies[kind].setdefault(key, [0, 0])
            tally[0] += zeros
            tally[1] += total
    zeros = sum(z for z, _ in tallies["type"].values())
    total = sum(t for _, t in tallies["type"].values())

    def frac(zt: list[int]) -> float:
        return round(zt[0] / max(zt[1], 1), 6)

    layers = sorted(tallies["layer"], key=lambda s: int(s) if s.isdigit() else s)
    return {
        "sparsity_pattern": pattern.describe(),
        "pruned_modules": len(targets),
        "weight_sparsity": round(zeros / max(total, 1), 6),
        "weight_sparsity_by_type": {k: frac(v) for k, v in tallies["type"].items()},
        "weight_sparsity_per_layer": [frac(tallies["layer"][k]) for k in layers],
    }


@torch.no_grad()
def prune_linear_(lin: nn.Linear, scores: torch.Tensor, pattern: SparsityPattern) -> None:
    """Zero the lowest-scoring weights of ``lin`` in place, row by row."""
    apply_mask_(lin.weight.data, prune_mask(scores, pattern))


@torch.no_grad()
def apply_magnitude(ctx: Any, cfg: MagnitudeConfig) -> StageResult:
    """Magnitude pruning, per output row, of every target linear (no data)."""
    pattern = cfg.pattern()
    targets = prune_targets(ctx.model, ctx.layers_prefix, cfg)
    for _name, lin in ctx.progress_iter(list(targets.items()), "magnitude"):
        prune_linear_(lin, magnitude_scores(lin.weight.data.to(ctx.device)), pattern)
    return StageResult(metrics=sparsity_metrics(targets, ctx.layers_prefix, pattern))


def layer_groups(lctx: Any, targets: dict[str, nn.Linear]) -> list[list[str]]:
    """This layer's target linears (names relative to the layer) in groups that share one input."""
    names = {rel for rel in lctx.linears() if f"{lctx.name}.{rel}" in targets}
    groups = [[n for n in group if n in names] for group in lctx.arch.linear_groups]
    return [g for g in groups if g]


def input_sq_norms(lctx: Any, groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """Per-linear ``sum_t x_j**2`` over every calibration token, by one pass through the (dense) layer;
    the linears of a group share their input (q, k, v), (gate, up)."""
    norms: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:  # x: [tokens, in_features], one sample
        norms[name] = accumulate_sq_norms(norms.get(name), x)

    lctx.collect_inputs([g[0] for g in groups], add)
    return {rel: norms[group[0]] for group in groups for rel in group}


def wanda_layer_fn(targets: dict[str, nn.Linear], pattern: SparsityPattern) -> Callable[[Any], None]:
    """``on_layer`` for run_layerwise: Wanda on one decoder layer (official code's order)."""

    def on_layer(lctx: Any) -> None:
        norms = input_sq_norms(lctx, layer_groups(lctx, targets))
        with torch.no_grad():
            for rel, sq in norms.items():
                lin = lctx.layer.get_submodule(rel)
                prune_linear_(lin, wanda_scores(lin.weight.data, sq), pattern)

    return on_layer


def apply_wanda(ctx: Any, cfg: WandaConfig) -> StageResult:
    """Wanda, layer by layer on the calibration windows; pruned outputs feed the next layer."""
    pattern = cfg.pattern()
    targets = prune_targets(ctx.model, ctx.layers_prefix, cfg)
    result = run_calibrated_layers(ctx, cfg, wanda_layer_fn(targets, pattern), method="wanda", own_state_dir=True,
                                   offload_on_cuda=False)
    metrics = sparsity_metrics(targets, ctx.layers_prefix, pattern)
    metrics.update(calibration_tokens=int(ctx.calibration().input_ids.numel()), resumed_layers=result.resumed_from)
    return StageResult(metrics=metrics)


register_method(
    MethodSpec(
        name="magnitude",
        verb="prune",
        kind="prune",
        summary="magnitude pruning per output row, unstructured or N:M (baseline, data-free)",
        config=MagnitudeConfig,
        apply=apply_magnitude,
    )
)

register_method(
    MethodSpec(
        name="wanda",
        verb="prune",
        kind="prune",
        summary="Wanda: |W| x input-activation norm per output row, unstructured or N:M",
        config=WandaConfig,
        apply=apply_wanda,
        needs_calibration=True,
        paper="arXiv 2306.11695",
    )
)
