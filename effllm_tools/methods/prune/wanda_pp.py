"""Glue for ``wanda++`` (Yang et al., arXiv 2503.04992): regional gradients and regional optimization.

Per decoder block, through the shared layer-wise pipeline (pruned outputs feed the next block):

1. ``||X_j||`` of every linear's inputs, one pass through the dense block (as ``wanda``);
2. if ``alpha > 0``: the regional gradient ``G`` of every linear (``regional.regional_gradients``,
   §3.1), from the dense block, backward through this one block only; the same pass keeps the
   dense block outputs as regional-optimization targets;
3. regional optimization (§3.2, Algorithm 1), ``ro_rounds`` times: prune with the score
   ``S = (alpha * G + ||X_j||) * |W|`` (per output row, or per N:M group), then RMSprop (``ro_lr``)
   steps, one per sample of ``ro_samples`` random calibration windows, on the squared error between
   the dense and the sparse block outputs with the mask held; the pruned weights are then restored
   from the running dense weights, so the next round re-prunes from scratch (a weight the update
   made more important can come back);
4. the final prune with the same score on the optimized weights.

Deviations from the unofficial code (``TTTTTTris/wandaplus``), on purpose: unstructured pruning is
per output row (theirs drops whole columns, methods.md §4), the mask is held exactly during RO
(theirs lets pruned weights drift until the next prune), and ``G`` / ``||X_j||`` are measured once on
the dense block. Regional optimization keeps fp32 master weights for the block (RMSprop steps of
~1e-6 vanish in bf16) and computes in the model's half dtype under autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from effllm_tools.errors import BadInputError
from effllm_tools.methods.common import run_calibrated_layers
from effllm_tools.methods.prune.algorithm import SparsityPattern, apply_mask_, prune_mask, wanda_pp_scores
from effllm_tools.methods.prune.method import (
    PruneConfig,
    input_sq_norms,
    layer_groups,
    prune_targets,
    sparsity_metrics,
)
from effllm_tools.methods.prune.regional import regional_gradients, regional_optimize, trainable_only
from effllm_tools.pipeline.context import first_output
from effllm_tools.registry import MethodSpec, StageResult, register_method


@dataclass
class WandaPPConfig(PruneConfig):
    """Recipe keys of the ``wanda++`` stage; defaults are the paper's (§4.1, methods.md §4)."""

    method_name: ClassVar[str] = "wanda++"

    alpha: float = 100.0  # weight of the regional gradient in the score; 0: Wanda's score
    ro_enabled: bool = True  # regional optimization on/off (off: the gradient score only)
    ro_rounds: int = 5  # prune -> optimize rounds before the final prune
    ro_samples: int = 32  # calibration windows per round (the paper: 32 of 128)
    ro_lr: float = 3e-7  # RMSprop learning rate

    def validate(self) -> None:
        super().validate()
        where = self.method_name
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise BadInputError(f"{where}: alpha must be a finite number >= 0, got {self.alpha}")
        if self.ro_rounds < 0:
            raise BadInputError(f"{where}: ro_rounds must be >= 0, got {self.ro_rounds}")
        if self.ro_samples < 1:
            raise BadInputError(f"{where}: ro_samples must be >= 1, got {self.ro_samples}")
        if not (math.isfinite(self.ro_lr) and self.ro_lr > 0):
            raise BadInputError(f"{where}: ro_lr must be a finite number > 0, got {self.ro_lr}")

    @property
    def ro(self) -> bool:
        return self.ro_enabled and self.ro_rounds > 0


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor (in tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


@dataclass
class _Precision:
    """How one block computes while Wanda++ works on it (see the module docstring)."""

    home: torch.dtype  # the block's own dtype, restored at the end
    master: bool  # fp32 master weights for RO
    autocast_dtype: torch.dtype | None  # CUDA half compute on fp32 masters

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def _precision(layer: nn.Module, device: torch.device, ro: bool) -> _Precision:
    home = next(layer.parameters()).dtype
    master = ro and home != torch.float32
    return _Precision(home, master, home if master and device.type == "cuda" else None)


def _block_call(lctx: Any, prec: _Precision) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> block(x)``; on the fp32-master path without autocast (CPU), inputs and the captured
    arguments are cast to fp32 so masks and rotary tables match the weights."""
    if not prec.master or prec.autocast_dtype is not None:
        return lctx.call
    args, kwargs = _cast_floats(lctx.layer_args, torch.float32), _cast_floats(lctx.layer_kwargs, torch.float32)

    def call(x: torch.Tensor) -> torch.Tensor:
        return first_output(lctx.layer(x.float(), *args, **kwargs))

    return call


def _score_fn(norms: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], alpha: float
              ) -> Callable[[str, torch.Tensor], torch.Tensor]:
    return lambda rel, w: wanda_pp_scores(w, norms[rel], grads.get(rel), alpha)


def _regional_optimization(lctx: Any, cfg: WandaPPConfig, pattern: SparsityPattern, weights: dict[str, nn.Parameter],
                           score: Callable[[str, torch.Tensor], torch.Tensor], targets: list[torch.Tensor],
                           call: Callable[[torch.Tensor], torch.Tensor], prec: _Precision, seed: int) -> list[float]:
    """Algorithm 1's inner loop: ``ro_rounds`` x (prune, RMSprop with the mask held). Returns the
    mean per-sample loss of the first round and of the last round."""
    running = {rel: p.detach().clone() for rel, p in weights.items()}  # dense weights, optimized where kept
    optimizer = torch.optim.RMSprop(list(weights.values()), lr=cfg.ro_lr)
    gen = torch.Generator().manual_seed(seed * 100_003 + lctx.index)
    n = min(cfg.ro_samples, lctx.num_samples)
    round_means: list[float] = []
    for _round in range(cfg.ro_rounds):
        masks = {rel: prune_mask(score(rel, running[rel]), pattern) for rel in weights}
        with torch.no_grad():
            for rel, p in weights.items():
                p.copy_(running[rel])
        picks = torch.randperm(lctx.num_samples, generator=gen)[:n].tolist()
        samples = ((lctx.input(s), targets[s].to(lctx.device)) for s in picks)
        losses = regional_optimize(call, weights, masks, samples, optimizer, autocast=prec.autocast(lctx.device))
        round_means.append(sum(losses) / len(losses))
        with torch.no_grad():
            for rel, p in weights.items():
                running[rel] = torch.where(masks[rel], running[rel], p.detach())
    with torch.no_grad():
        for rel, p in weights.items():
            p.copy_(running[rel])
    return [round_means[0], round_means[-1]]


def wanda_pp_layer_fn(targets: dict[str, nn.Linear], pattern: SparsityPattern, cfg: WandaPPConfig, seed: int,
                      ro_log: list[list[float]]) -> Callable[[Any], None]:
    """``on_layer`` for run_layerwise: Wanda++ on one decoder block (module docstring, steps 1-4)."""

    def on_layer(lctx: Any) -> None:
        norms = input_sq_norms(lctx, layer_groups(lctx, targets))
        prec = _precision(lctx.layer, lctx.device, cfg.ro)
        if prec.master:
            lctx.layer.float()
        try:
            weights = {rel: lctx.layer.get_submodule(rel).weight for rel in norms}
            call = _block_call(lctx, prec)
            grads: dict[str, torch.Tensor] = {}
            outputs: list[torch.Tensor] = []
            with trainable_only(lctx.layer, weights):
                keep = (lambda _s, y: outputs.append(lctx.store(y.to(prec.home)))) if cfg.ro else None
                if cfg.alpha > 0:
                    grads = regional_gradients(call, (lctx.input(s) for s in range(lctx.num_samples)), weights,
                                               on_output=keep, autocast=prec.autocast(lctx.device))
                elif cfg.ro:
                    with torch.no_grad(), prec.autocast(lctx.device):
                        outputs = [lctx.store(call(lctx.input(s)).to(prec.home)) for s in range(lctx.num_samples)]
                score = _score_fn(norms, grads, cfg.alpha)
                if cfg.ro:
                    ro_log.append(_regional_optimization(lctx, cfg, pattern, weights, score, outputs, call, prec, seed))
                with torch.no_grad():
                    for rel, w in weights.items():
                        apply_mask_(w.data, prune_mask(score(rel, w.data), pattern))
        finally:
            if prec.master:
                lctx.layer.to(prec.home)

    return on_layer


def apply_wanda_pp(ctx: Any, cfg: WandaPPConfig) -> StageResult:
    """Wanda++ layer by layer on the calibration windows; pruned outputs feed the next layer."""
    pattern = cfg.pattern()
    targets = prune_targets(ctx.model, ctx.layers_prefix, cfg)
    recipe = getattr(ctx, "recipe", None)
    seed = recipe.seed if recipe is not None else 0
    ro_log: list[list[float]] = []
    result = run_calibrated_layers(ctx, cfg, wanda_pp_layer_fn(targets, pattern, cfg, seed, ro_log), method="wanda++",
                                   fingerprint_extra={"seed": seed}, own_state_dir=True, offload_on_cuda=False)
    metrics = sparsity_metrics(targets, ctx.layers_prefix, pattern)
    metrics.update(calibration_tokens=int(ctx.calibration().input_ids.numel()), resumed_layers=result.resumed_from)
    if ro_log:
        # Per layer: RO's squared error per sample, mean over its first round and over its last round.
        metrics["ro_loss_first_last_per_layer"] = [[float(f"{v[0]:.6g}"), float(f"{v[-1]:.6g}")] for v in ro_log]
    return StageResult(metrics=metrics)


register_method(
    MethodSpec(
        name="wanda++",
        verb="prune",
        kind="prune",
        summary="Wanda++: regional-gradient score and regional optimization, unstructured or N:M",
        config=WandaPPConfig,
        apply=apply_wanda_pp,
        needs_calibration=True,
        paper="arXiv 2503.04992",
    )
)
