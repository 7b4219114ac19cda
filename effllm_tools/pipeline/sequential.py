"""Walk the decoder layers one at a time (DESIGN.md, "Calibration pipeline").

For each layer: move it to the device, let the method act on it (``on_layer(ctx)``), recompute its
outputs with the modified layer (they feed the next layer), move it back. The device then holds one
layer, the captured call arguments and one sample's activations, plus the hidden states unless
they are offloaded to the host. With a ``state_dir`` every finished layer is saved, so a crashed or
interrupted run resumes at the next layer (ecosystem.md A4.3).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from effllm_tools.errors import BadInputError
from effllm_tools.pipeline.arch import ArchSpec, decoder_layers, get_arch
from effllm_tools.pipeline.capture import CapturedInputs, capture_layer_inputs, check_calib_ids
from effllm_tools.pipeline.context import LayerContext
from effllm_tools.pipeline.state import LayerwiseState, ResumePoint

OnLayer = Callable[[LayerContext], None]
RestoreLayer = Callable[[int, nn.Module, dict[str, torch.Tensor]], None]
"""``restore(index, layer, state_dict)``: put a finished layer's saved weights back on resume."""


class RichLikeProgress(Protocol):
    def add_task(self, description: str, *args: Any, **kwargs: Any) -> Any: ...
    def update(self, task_id: Any, *args: Any, **kwargs: Any) -> None: ...


ProgressArg = Callable[[int, int], None] | RichLikeProgress | None


@dataclass
class LayerwiseResult:
    """The outcome of :func:`run_layerwise`.

    ``hidden_states[s]`` is the last decoder layer's output ``[1, L, hidden]`` for sample ``s``
    (before the final norm; on the device, or the host when offloaded). ``artifacts[i]`` holds what
    the method left in ``ctx.artifacts`` for layer ``i``, as CPU tensors (also for resumed layers).
    """

    num_layers: int
    resumed_from: int  # layers taken from the resume state (0: none)
    hidden_states: list[torch.Tensor]
    artifacts: list[dict[str, torch.Tensor]]


@dataclass
class _Options:
    device: torch.device
    offload: bool


def _progress_callback(progress: ProgressArg, total: int) -> Callable[[int], None]:
    """``report(done)`` for a ``progress(done, total)`` callable or a rich ``Progress``."""
    if progress is None:
        return lambda done: None
    if hasattr(progress, "add_task") and hasattr(progress, "update"):
        task = progress.add_task("calibrating layers", total=total)
        return lambda done: progress.update(task, completed=done)
    return lambda done: progress(done, total)  # type: ignore[operator]


def _default_restore(index: int, layer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    try:
        layer.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise BadInputError(
            f"resume state of decoder layer {index} does not fit the model: {first_line}"
        ) from err


def _layer_home(layer: nn.Module) -> torch.device:
    for tensor in layer.parameters():
        return tensor.device
    return torch.device("cpu")


def _free_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _process_layer(
    index: int, model: nn.Module, arch: ArchSpec, captured: CapturedInputs, on_layer: OnLayer, opts: _Options
) -> LayerContext:
    """Run ``on_layer`` on layer ``index`` on the device; overwrite the hidden states with its outputs."""
    layers = decoder_layers(model, arch)
    layer = layers[index]
    home = _layer_home(layer)
    layer.to(opts.device)
    ctx = LayerContext(
        index=index,
        name=f"{arch.layers}.{index}",
        layer=layer,
        arch=arch,
        num_layers=len(layers),
        device=opts.device,
        hidden_states=captured.hidden_states,
        layer_args=captured.layer_args[index],
        layer_kwargs=captured.layer_kwargs[index],
        offload_activations=opts.offload,
    )
    try:
        on_layer(ctx)
        with torch.no_grad():  # the modified layer's outputs feed the next layer
            for s in range(ctx.num_samples):
                captured.hidden_states[s] = ctx.store(ctx.call(ctx.input(s)))
    finally:
        layer.to(home)
        _free_device_cache(opts.device)
    return ctx


def _open_state(
    state_dir: str | os.PathLike[str] | None,
    fingerprint: str | None,
    resume: bool,
    model: nn.Module,
    arch: ArchSpec,
    num_samples: int,
    restore: RestoreLayer,
) -> tuple[LayerwiseState | None, ResumePoint | None]:
    """The run's resume state, and the point to continue from with finished layers' weights
    loaded into the model (None: start at layer 0, with this pipeline's old files cleared)."""
    if state_dir is None:
        return None, None
    if not fingerprint:
        raise ValueError("run_layerwise: a state_dir needs a fingerprint (see make_fingerprint)")
    layers = decoder_layers(model, arch)
    state = LayerwiseState(state_dir, fingerprint, len(layers))
    point = state.load(num_samples) if resume else None
    if point is None:
        state.clear()
        return state, None
    for index, tensors in enumerate(point.layer_tensors):
        restore(index, layers[index], tensors)
    return state, point


def _first_inputs(
    model: nn.Module, ids: torch.Tensor, arch: ArchSpec, opts: _Options, point: ResumePoint | None
) -> CapturedInputs:
    """The layer calls, and the hidden states feeding the first layer still to do."""
    captured = capture_layer_inputs(
        model, ids, arch=arch, device=opts.device, offload_activations=opts.offload, kwargs_only=bool(point)
    )
    if point is not None:
        captured.hidden_states = [h if opts.offload else h.to(opts.device) for h in point.hidden_states]
    return captured


def run_layerwise(
    model: nn.Module,
    calib_ids: torch.Tensor,
    on_layer: OnLayer,
    *,
    device: str | torch.device = "cpu",
    offload_activations: bool = False,
    state_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    fingerprint: str | None = None,
    progress: ProgressArg = None,
    restore_layer: RestoreLayer | None = None,
    arch: ArchSpec | None = None,
) -> LayerwiseResult:
    """Calibrate ``model`` layer by layer on the token ids ``calib_ids`` ``[n, L]``.

    Args:
        on_layer: called once per decoder layer with a :class:`LayerContext`; may modify
            ``ctx.layer`` in place. Runs with grad enabled (the pipeline's own passes do not).
        device: where each layer runs; layers return to their own device afterwards.
        offload_activations: keep hidden states on the host between uses.
        state_dir: save each finished layer there (atomically) for ``resume``; needs ``fingerprint``.
        resume: continue from ``state_dir`` when it holds a state with the same fingerprint.
        fingerprint: identifies model + data + method config (see :func:`make_fingerprint`).
        progress: ``progress(done, total)`` after each layer, or a rich ``Progress``.
        restore_layer: puts a finished layer's saved state_dict back on resume (default:
            ``load_state_dict(strict=True)``); for methods that swap modules.

    Raises:
        UnsupportedError: architecture not in the table. BadInputError: bad ids, or a resume state
        that belongs to another run.
    """
    arch = arch or get_arch(model)
    ids = check_calib_ids(calib_ids)
    opts = _Options(torch.device(device), offload_activations)
    num_layers = len(decoder_layers(model, arch))
    restore = restore_layer or _default_restore
    state, point = _open_state(state_dir, fingerprint, resume, model, arch, ids.shape[0], restore)
    start = point.finished_layers if point else 0
    captured = _first_inputs(model, ids, arch, opts, point)
    artifacts: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    artifacts[:start] = point.artifacts if point else []
    report = _progress_callback(progress, num_layers)
    report(start)
    for index in range(start, num_layers):
        ctx = _process_layer(index, model, arch, captured, on_layer, opts)
        artifacts[index] = {key: t.detach().to("cpu") for key, t in ctx.artifacts.items()}
        if state is not None:
            layer_state = decoder_layers(model, arch)[index].state_dict()
            state.save(index, layer_state, artifacts[index], captured.hidden_states)
        report(index + 1)
    return LayerwiseResult(num_layers, start, captured.hidden_states, artifacts)
