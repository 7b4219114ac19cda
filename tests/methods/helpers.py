"""Helpers shared by the method tests: a stand-in for the runner's StageContext, random token ids,
KL divergence between two models, and the crash-then-resume round trip of a layer-wise stage."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from effllm_tools.pipeline import get_arch, make_fingerprint, run_layerwise
from effllm_tools.reporting import Reporter
from tests.tiny_models import VOCAB


def stage_ctx(model: nn.Module, ids: torch.Tensor | None, state_dir: Path | None = None,
              resume: bool = False) -> Any:
    """The parts of runner.StageContext that the method stages use. ``.logs`` collects the info lines;
    ``.progress`` the progress bars' events as the CLI draws them (``"open LABEL"``, one ``"advance"``
    per item after it is done, ``"close"``)."""
    from effllm_tools.runner import layers_prefix_of

    modules: dict[str, dict] = {}
    logs: list[str] = []
    progress: list[str] = []
    reporter = Reporter()
    reporter.info = logs.append  # type: ignore[method-assign]

    def progress_iter(items: list, label: str) -> Iterator[Any]:
        progress.append(f"open {label}")
        for item in items:
            yield item
            progress.append("advance")
        progress.append("close")

    arch = get_arch(model)
    return SimpleNamespace(
        logs=logs, progress=progress, model=model, arch=arch, layers_prefix=layers_prefix_of(model, arch),
        device="cpu", reporter=reporter, progress_iter=progress_iter, modules=modules,
        record_module=modules.__setitem__, calibration=lambda: SimpleNamespace(input_ids=ids),
        state_dir=state_dir, resume=resume,
    )


def random_ids(seed: int, n: int, length: int = 32) -> torch.Tensor:
    """Token ids ``[n, length]`` below the tiny models' vocabulary."""
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def kl_to(base: nn.Module, model: nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(base || model) of the next-token distributions on ``ids``."""
    with torch.no_grad():
        p = torch.log_softmax(base(ids).logits.float(), -1)
        q = torch.log_softmax(model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def straight_and_resumed(base: nn.Module, ids: torch.Tensor, cfg: Any, method: str, apply: Callable[..., Any],
                         make_on_layer: Callable[[Any], Callable[..., None]], state_dir: Path,
                         crash_at: int = 2, own_state_dir: bool = False, fingerprint_extra: dict | None = None,
                         ) -> tuple[nn.Module, nn.Module, Any, dict[str, Any]]:
    """Run stage ``method`` on two copies of ``base``: straight through, and in a run that crashes
    (KeyboardInterrupt) at layer ``crash_at`` with its state saved in ``state_dir`` (``state_dir /
    method`` for a stage with ``own_state_dir``), then resumes from that state through ``apply``.
    ``fingerprint_extra``: what the method adds to the resume fingerprint (``run_calibrated_layers``).
    Returns both models, the resumed run's context and its metrics."""
    straight = copy.deepcopy(base)
    apply(stage_ctx(straight, ids), cfg)
    crashed = copy.deepcopy(base)
    on_layer = make_on_layer(cfg)

    def crash(lctx: Any) -> None:
        if lctx.index == crash_at:
            raise KeyboardInterrupt
        on_layer(lctx)

    fingerprint = make_fingerprint(crashed, ids, {"method": method, **(fingerprint_extra or {}), **cfg.__dict__})
    with pytest.raises(KeyboardInterrupt):
        run_layerwise(crashed, ids, crash, state_dir=state_dir / method if own_state_dir else state_dir,
                      fingerprint=fingerprint)
    resumed = copy.deepcopy(base)
    ctx = stage_ctx(resumed, ids, state_dir=state_dir, resume=True)
    metrics = apply(ctx, cfg).metrics
    return straight, resumed, ctx, metrics


def assert_same_packed_modules(a: nn.Module, b: nn.Module, cls: type[nn.Module]) -> int:
    """Every ``cls`` module of ``a`` stands at the same place in ``b`` with equal tensors; returns their count."""
    count = 0
    for (name, x), y in zip(a.named_modules(), b.modules(), strict=True):
        if isinstance(x, cls):
            assert isinstance(y, cls), name
            got = y.state_dict()
            for key, value in x.state_dict().items():
                assert torch.equal(value, got[key]), (name, key)
            count += 1
    return count
