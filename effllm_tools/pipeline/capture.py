"""Capture what every decoder layer is called with, for the calibration samples.

The model's own forward is run with each decoder layer replaced by a recorder that stores the
exact positional and keyword arguments of its call and hands its input on unchanged. Nothing about
the call is hard-coded: masks, position embeddings, position ids, cache arguments and whatever else
the installed transformers passes (names change across versions: ``past_key_values`` became
``cache``, ``position_embeddings`` appeared) are recorded as the model passed them, per layer, so
Gemma3's sliding-window layers keep their own mask and local rope while its global layers keep
theirs. A hook on the final norm stops the forward, so the vocabulary logits are never computed.

Only the modules outside the decoder layers (embedding, rotary embedding, final norm) visit the
device; the layers stay where they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effllm_tools.errors import BadInputError, UnsupportedError
from effllm_tools.pipeline.arch import ArchSpec, decoder_layers, get_arch, get_submodule


class StopForward(Exception):
    """Raised from a hook to end a forward early; caught by the pipeline, never seen by users."""


@dataclass
class CapturedInputs:
    """What the decoder layers are called with.

    ``hidden_states[s]`` is sample ``s``'s input to the first layer, ``[1, L, hidden]``, on the
    device (or on the host when activations are offloaded). ``layer_args[i]`` / ``layer_kwargs[i]``
    are the remaining arguments of layer ``i``'s call, exactly as the model passed them (tensors on
    the device). They are shared by all samples: every row of the calibration ids has the same
    length and no padding, so masks and positions do not depend on the sample.
    """

    hidden_states: list[torch.Tensor]
    layer_args: list[tuple[Any, ...]]
    layer_kwargs: list[dict[str, Any]]


class _Recording:
    """Shared state of the recorders during one capture."""

    def __init__(self, num_layers: int, offload: bool) -> None:
        self.num_layers = num_layers
        self.offload = offload
        self.record_calls = True  # only the first sample's calls are kept
        self.keep_hidden = True
        self.hidden: list[torch.Tensor] = []
        self.calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.shape: torch.Size | None = None


class _LayerRecorder(nn.Module):
    """Stands in for decoder layer ``index``: records its call, returns the input unchanged."""

    def __init__(self, layer: nn.Module, index: int, recording: _Recording) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)  # not a submodule: the layer is not touched
        self.index = index
        self.recording = recording

    def __getattr__(self, name: str) -> Any:
        # Model forwards may read layer attributes (e.g. ``decoder_layer.attention_type``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        rec = self.recording
        hidden, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        _check_hidden(rec, self.index, hidden)
        if self.index == 0 and rec.keep_hidden:
            hidden_copy = hidden.detach()
            rec.hidden.append(hidden_copy.to("cpu") if rec.offload else hidden_copy)
        if not rec.record_calls:
            raise StopForward
        rec.calls[self.index] = (args, dict(kwargs))
        return hidden


def _check_hidden(rec: _Recording, index: int, hidden: Any) -> None:
    """Decoder layers must return a tensor (transformers >= 5); older ones returned tuples."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise UnsupportedError(
            f"decoder layer {index} was called with hidden states of an unexpected form; "
            "this transformers version is not supported (need >= 5.17)"
        )
    if index == 0:
        rec.shape = hidden.shape
    elif hidden.shape != rec.shape:
        raise UnsupportedError(
            f"decoder layer {index} got hidden states of shape {tuple(hidden.shape)} instead of "
            f"{tuple(rec.shape or ())}; this transformers version is not supported (need >= 5.17)"
        )


def _module_device(module: nn.Module) -> torch.device | None:
    """Device of the module's first parameter or buffer; None for a module without tensors."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def non_layer_modules(model: nn.Module, arch: ArchSpec) -> list[nn.Module]:
    """Modules the forward runs before and after the decoder layers, without lm_head.

    The siblings of every module on the path to ``arch.layers`` (embedding, rotary embedding,
    final norm for the supported families).
    """
    parts = arch.layers.split(".")
    found: list[nn.Module] = []
    node = model
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        for name, child in node.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if name != part and full != arch.lm_head:
                found.append(child)
        node = getattr(node, part)
    return found


@contextmanager
def modules_on(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the duration, then back where each was."""
    homes = [_module_device(m) for m in modules]
    try:
        for module, home in zip(modules, homes, strict=True):
            if home is not None:
                module.to(device)
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            if home is not None:
                module.to(home)


@contextmanager
def _recorders(layers: nn.ModuleList, recording: _Recording) -> Iterator[None]:
    """Swap every decoder layer for a recorder, and the originals back afterwards."""
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _LayerRecorder(layer, i, recording)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _raise_stop(_module: nn.Module, _args: tuple[Any, ...]) -> None:
    raise StopForward


def check_calib_ids(calib_ids: torch.Tensor) -> torch.Tensor:
    """Validate calibration token ids: an integer tensor ``[n, L]`` with n, L >= 1."""
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2:
        raise BadInputError("calibration ids must be a 2-D tensor [samples, tokens]")
    if calib_ids.is_floating_point() or calib_ids.is_complex() or calib_ids.numel() == 0:
        raise BadInputError(
            f"calibration ids must be non-empty integer token ids, got {calib_ids.dtype} "
            f"of shape {tuple(calib_ids.shape)}"
        )
    return calib_ids.long()


def capture_layer_inputs(
    model: nn.Module,
    calib_ids: torch.Tensor,
    *,
    arch: ArchSpec | None = None,
    device: str | torch.device = "cpu",
    offload_activations: bool = False,
    kwargs_only: bool = False,
) -> CapturedInputs:
    """Record each decoder layer's call for the calibration samples.

    Args:
        model: a ``*ForCausalLM`` of a family in the architecture table; layers stay where they are.
        calib_ids: token ids ``[n, L]``.
        device: where the embedding runs and the captured tensors live.
        offload_activations: keep the hidden states on the host (moved to the device when used).
        kwargs_only: record the layer calls from the first sample only (``hidden_states`` empty),
            as a resumed run needs.

    Returns:
        :class:`CapturedInputs`: first-layer hidden states ``[1, L, hidden]`` per sample and each
        layer's remaining call arguments.
    """
    arch = arch or get_arch(model)
    ids = check_calib_ids(calib_ids)
    device = torch.device(device)
    layers = decoder_layers(model, arch)
    recording = _Recording(len(layers), offload=offload_activations)
    recording.keep_hidden = not kwargs_only
    norm = get_submodule(model, arch.final_norm)
    stop_hook = norm.register_forward_pre_hook(_raise_stop)
    try:
        with modules_on(non_layer_modules(model, arch), device), _recorders(layers, recording):
            with torch.no_grad():
                for s in range(1 if kwargs_only else ids.shape[0]):
                    recording.record_calls = s == 0
                    try:
                        model(input_ids=ids[s : s + 1].to(device), use_cache=False)
                    except StopForward:
                        pass
    finally:
        stop_hook.remove()
    if len(recording.calls) != len(layers):
        raise UnsupportedError(
            f"{type(model).__name__}'s forward called {len(recording.calls)} of its "
            f"{len(layers)} decoder layers; it cannot be calibrated layer by layer"
        )
    calls = [recording.calls[i] for i in range(len(layers))]
    return CapturedInputs(
        hidden_states=recording.hidden,
        layer_args=[args for args, _ in calls],
        layer_kwargs=[kwargs for _, kwargs in calls],
    )
