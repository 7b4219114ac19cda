"""What a method sees of one decoder layer during a layer-wise calibration."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effllm_tools.errors import UnsupportedError
from effllm_tools.pipeline.arch import ArchSpec, get_submodule, linear_modules
from effllm_tools.pipeline.capture import StopForward

ActivationFn = Callable[[str, torch.Tensor], None]
"""``fn(name, x)``: ``name`` relative to the layer, ``x`` of shape ``[tokens, features]``."""


def first_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or a tuple's first element)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerContext:
    """Decoder layer ``index`` on the device, with the samples that feed it.

    ``hidden_states[s]`` is sample ``s``'s input ``[1, L, hidden]`` (on the device, or on the host
    when activations are offloaded); ``layer_args`` / ``layer_kwargs`` complete the layer's call as
    the model made it (masks, position embeddings, ...). A method may modify ``layer`` in place;
    when it returns, the pipeline recomputes the layer's outputs, which feed the next layer.
    Tensors put into ``artifacts`` are saved with the layer's resume state and returned in
    :class:`~effllm_tools.pipeline.sequential.LayerwiseResult` (also after a resume).
    """

    index: int
    name: str  # e.g. "model.layers.3"
    layer: nn.Module
    arch: ArchSpec
    num_layers: int
    device: torch.device
    hidden_states: list[torch.Tensor]
    layer_args: tuple[Any, ...]
    layer_kwargs: dict[str, Any]
    offload_activations: bool = False
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.hidden_states)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The layer's captured keyword arguments (shared by all samples)."""
        return self.layer_kwargs

    def linears(self) -> dict[str, nn.Linear]:
        """This layer's linears by name, in execution order (see :func:`linear_modules`)."""
        return linear_modules(self.layer, self.arch)

    def input(self, sample: int) -> torch.Tensor:
        """Sample ``sample``'s input to this layer, ``[1, L, hidden]``, on the device."""
        return self.hidden_states[sample].to(self.device)

    def call(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the layer on ``hidden`` ``[1, L, hidden]`` with the captured arguments.

        Runs under the caller's grad mode, so ``loss(ctx.call(ctx.input(s))).backward()`` gives
        gradients with respect to the layer's weights (Wanda++'s regional gradients).
        """
        return first_output(self.layer(hidden, *self.layer_args, **self.layer_kwargs))

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` where activations live: the host when offloaded, else where it is."""
        return tensor.to("cpu") if self.offload_activations else tensor

    def forward(self) -> list[torch.Tensor]:
        """The layer's outputs ``[1, L, hidden]`` for all samples (no grad; stored like inputs)."""
        with torch.no_grad():
            return [self.store(self.call(self.input(s))) for s in range(self.num_samples)]

    def iter_outputs(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(sample, input, output)`` on the device, one sample at a time, without grad."""
        for s in range(self.num_samples):
            hidden = self.input(s)
            with torch.no_grad():
                out = self.call(hidden)
            yield s, hidden, out

    def collect_inputs(self, names: Sequence[str], fn: ActivationFn, *, stop_early: bool = True) -> None:
        """Run all samples through the layer and call ``fn(name, x)`` with each named module's input.

        ``names`` are submodule paths relative to the layer (``"self_attn.q_proj"``, see
        ``arch.linear_groups``); ``x`` is ``[tokens, in_features]`` for one sample, on the device,
        valid during the call only, so nothing big is stored (GPTQ: ``H += 2 x^T x``). With
        ``stop_early`` the forward of a sample stops once every named module has had its input,
        so collecting the attention projections does not run the MLP.
        """
        self._run_hooked(names, fn, outputs=False, stop_early=stop_early)

    def collect_outputs(self, names: Sequence[str], fn: ActivationFn, *, stop_early: bool = True) -> None:
        """Like :meth:`collect_inputs`, with each named module's output ``[tokens, out_features]``."""
        self._run_hooked(names, fn, outputs=True, stop_early=stop_early)

    def _run_hooked(self, names: Sequence[str], fn: ActivationFn, *, outputs: bool, stop_early: bool) -> None:
        names = list(dict.fromkeys(names))
        if not names:
            return
        fired: set[str] = set()
        with torch.no_grad(), _hooked(self.layer, names, fn, outputs, stop_early) as seen:
            for s in range(self.num_samples):
                seen.clear()
                try:
                    self.call(self.input(s))
                except StopForward:
                    pass
                fired |= seen
        missing = [n for n in names if n not in fired]
        if missing:
            raise UnsupportedError(f"{self.name}: modules {missing} never ran in the layer's forward")


@contextmanager
def _hooked(
    layer: nn.Module, names: list[str], fn: ActivationFn, outputs: bool, stop_early: bool
) -> Iterator[set[str]]:
    """Hooks on ``layer``'s named submodules calling ``fn``; may stop the forward once all fired.

    Yields the set of names that fired, which the caller clears before each sample.
    """
    seen: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], *out: Any) -> None:
            x = first_output(out[0]) if outputs else args[0]
            fn(name, x.reshape(-1, x.shape[-1]))
            seen.add(name)
            if stop_early and len(seen) == len(names):
                raise StopForward

        return hook

    modules = {name: get_submodule(layer, name) for name in names}
    handles = [
        m.register_forward_hook(make_hook(n)) if outputs else m.register_forward_pre_hook(make_hook(n))
        for n, m in modules.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
