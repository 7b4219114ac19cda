"""Helpers every method shares: which linears a stage touches, swapping modules, checking keys, and
running a calibrated stage layer by layer."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from effllm_tools.errors import BadInputError
from effllm_tools.pipeline import (
    LayerContext,
    LayerwiseResult,
    decoder_layers,
    make_fingerprint,
    run_layerwise,
)
from effllm_tools.reporting import format_duration

RestoreLayer = Callable[[int, nn.Module, dict[str, torch.Tensor]], None]


def check_ignore_patterns(method: str, patterns: list[str]) -> None:
    """The ``ignore`` recipe key: every entry must compile as a regex (exit 2 naming it otherwise)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise BadInputError(f"{method}: ignore pattern {pattern!r} is not a valid regex: {err}") from None


def target_linears(model: nn.Module, layers_prefix: str, ignore: list[str]) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, minus the ignored names."""
    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith(layers_prefix + "."):
            if not any(re.search(p, name) for p in ignore):
                found[name] = mod
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def layer_progress(ctx: Any, total: int, label: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback for :func:`run_layerwise`, drawn through ``ctx.progress_iter``
    over ``total`` layers (the bar opens at once, shows the finished layers and closes after the last)."""
    bar = iter(ctx.progress_iter(list(range(total)), label))
    next(bar, None)
    shown = [0]
    since = [time.perf_counter(), 0]  # the clock and the layers done when this process started timing

    def report(done: int, _total: int) -> None:
        if done <= shown[0]:
            return
        first = shown[0]
        while shown[0] < done:
            next(bar, None)
            shown[0] += 1
        if first == 0 and done > 1:  # layers restored from a resume state: time from here on
            since[:] = [time.perf_counter(), done]
            return
        elapsed = time.perf_counter() - since[0]
        left = elapsed / (done - since[1]) * (total - done)
        ctx.reporter.progress_note(f"{label}: {done}/{total}, {format_duration(elapsed)} elapsed, "
                                   f"about {format_duration(left)} left")

    return report


def run_calibrated_layers(
    ctx: Any,
    cfg: Any,
    on_layer: Callable[[LayerContext], None],
    *,
    method: str,
    fingerprint_extra: dict[str, Any] | None = None,
    restore_layer: RestoreLayer | None = None,
    own_state_dir: bool = False,
    offload_on_cuda: bool = True,
) -> LayerwiseResult:
    """Run ``on_layer`` over the decoder layers on the recipe's calibration windows (DESIGN.md,
    "Calibration pipeline"), with a progress bar over the layers and the run's resume state.

    The resume fingerprint covers ``method``, ``fingerprint_extra`` and every field of the dataclass
    ``cfg``. ``own_state_dir`` keeps the state in ``ctx.state_dir / method`` rather than
    ``ctx.state_dir``; ``offload_on_cuda`` keeps hidden states on the host when running on CUDA.
    """
    ids = ctx.calibration().input_ids  # [n, seqlen]
    device = torch.device(ctx.device)
    state_dir = ctx.state_dir / method if own_state_dir and ctx.state_dir is not None else ctx.state_dir
    fingerprint = make_fingerprint(ctx.model, ids, {"method": method, **(fingerprint_extra or {}), **asdict(cfg)})
    result = run_layerwise(
        ctx.model, ids, on_layer, device=device, offload_activations=offload_on_cuda and device.type == "cuda",
        state_dir=state_dir, resume=ctx.resume, fingerprint=fingerprint, restore_layer=restore_layer,
        progress=layer_progress(ctx, len(decoder_layers(ctx.model, ctx.arch)), f"{method} layers"), arch=ctx.arch,
    )
    if result.resumed_from:
        ctx.reporter.info(f"{method}: resumed after layer {result.resumed_from - 1}")
    return result
