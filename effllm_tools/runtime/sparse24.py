"""The 2:4 runtime: PyTorch semi-structured sparse weights for 2:4-pruned checkpoints on CUDA.

A checkpoint that ``effllm prune --sparsity 2:4`` wrote is dense with exact zeros; its provenance
records the pattern. When effllm loads it onto a CUDA device, :func:`apply_sparse24` converts every
eligible ``nn.Linear`` weight with ``torch.sparse.to_sparse_semi_structured`` (NVIDIA's 2:4 sparse
tensor cores through cuSPARSELt, or CUTLASS), and ``F.linear`` then runs the sparse kernel. The
compressed weight holds half the values plus 2-bit indices: 9/16 of the dense bytes.

Modes (``load(..., sparse24=...)`` or the environment variable ``EFFLLM_SPARSE24``):

- ``off``: leave every weight dense.
- ``on``: convert every eligible linear; the sparse kernel serves every call (only the compressed
  weight is kept, the dense copy is freed).
- ``dual``: keep the dense weight *and* the compressed one, and pick per call: calls with fewer
  than ``EFFLLM_SPARSE24_MIN_TOKENS`` rows (default :data:`DUAL_MIN_TOKENS`) use the dense weight,
  larger ones the sparse kernel. Costs 9/16 more memory for the converted layers; for servers that
  mix decode and long prefills.
- ``auto`` (default): :data:`AUTO_MODE` = ``off``, from the H200 measurements (see that constant):
  the 2:4 kernels are slower at decode and small-batch token counts and in eager mode.

A layer is eligible when it is an ``nn.Linear`` on CUDA, in float16 or bfloat16, with every group
of 4 consecutive input weights holding at most 2 non-zeros, and a shape the backend accepts (e.g.
rows a multiple of 32 and columns of 64 for CUTLASS fp16/bf16). Every layer left dense is logged
with the reason. ``EFFLLM_SPARSE24_BACKEND`` = ``cusparselt`` | ``cutlass`` | ``auto`` (cuSPARSELt
when PyTorch has it).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effllm_tools.errors import BadInputError

log = logging.getLogger("effllm")

MODES = ("auto", "on", "off", "dual")
BACKENDS = ("auto", "cusparselt", "cutlass")
AUTO_MODE = "off"
"""What ``auto`` means: ``off``. Measured on the H200 (torch 2.11, cuSPARSELt 0.8, bf16, CUDA graphs over
rotated weights; ``scripts/bench_sparse24.py``, BENCHMARKS.md): against dense bf16 ``F.linear`` the
2:4 kernel is 2-4x *slower* at M = 1, 16 and 128 tokens on every Llama-3-8B shape (decode and small
batches), and 1.37-1.42x faster only at M = 2048 on the 4096x4096, 14336x4096 and 4096x14336 layers
(still 0.87x on the 1024x4096 k/v layers). Without CUDA graphs the tensor subclass's Python dispatch
adds ~0.4-0.9 ms per call, slower than dense at every M. So converting by default would slow the
common case; ``on`` / ``dual`` are for compiled or graphed prefill-heavy serving."""
DUAL_MIN_TOKENS = 2048
"""``dual``: calls with at least this many rows (tokens) use the sparse kernel (the measured win)."""
_HALF = (torch.float16, torch.bfloat16)


def resolve_mode(mode: str | None = None) -> str:
    """The explicit ``mode``, else ``EFFLLM_SPARSE24``, else ``auto``, with ``auto`` resolved."""
    value = (mode or os.environ.get("EFFLLM_SPARSE24") or "auto").strip().lower()
    value = {"1": "on", "true": "on", "force": "on", "0": "off", "false": "off"}.get(value, value)
    if value not in MODES:
        raise BadInputError(f"sparse24 mode {value!r} (EFFLLM_SPARSE24 or sparse24=): use one of {', '.join(MODES)}")
    return AUTO_MODE if value == "auto" else value


def resolve_backend(backend: str | None = None) -> str:
    value = (backend or os.environ.get("EFFLLM_SPARSE24_BACKEND") or "auto").strip().lower()
    if value not in BACKENDS:
        raise BadInputError(f"sparse24 backend {value!r} (EFFLLM_SPARSE24_BACKEND): use one of {', '.join(BACKENDS)}")
    if value == "auto":
        return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    return value


def checkpoint_pattern(path: str | os.PathLike[str] | None) -> str | None:
    """The sparsity pattern the last pruning stage recorded in a checkpoint's provenance (``"2:4"``...)."""
    from effllm_tools.io.save import PROVENANCE_FILE

    if path is None or not (Path(path) / PROVENANCE_FILE).is_file():
        return None
    try:
        record = json.loads((Path(path) / PROVENANCE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    found = None
    for stage in record.get("stages", []) or []:
        pattern = (stage.get("metrics") or {}).get("sparsity_pattern")
        found = pattern or found
    return found


def is_2of4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive input weights of every row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def _backend_class(backend: str) -> type:
    return (torch.sparse.SparseSemiStructuredTensorCUTLASS if backend == "cutlass"
            else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)


def ineligible_reason(module: nn.Module, backend: str) -> str | None:
    """Why ``module`` cannot run as 2:4 on ``backend``, or None when it can."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    w = module.weight
    if not w.is_cuda:
        return f"weight on {w.device.type}, the 2:4 kernels need CUDA"
    if w.dtype not in _HALF:
        return f"dtype {str(w.dtype).removeprefix('torch.')}: the 2:4 kernels run float16/bfloat16 (load with dtype=bfloat16)"
    capability = torch.cuda.get_device_capability(w.device)
    if capability < (8, 0):
        return "GPU older than Ampere (sm80) has no sparse tensor cores"
    if backend == "cutlass" and capability[0] != 8:
        return f"PyTorch's CUTLASS 2:4 kernels run on sm8x only (this GPU: sm{capability[0]}{capability[1]}); use cusparselt"
    limits = _backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS.get(w.dtype)
    if limits is None:
        return f"{backend} does not support {w.dtype}"
    rows, cols = w.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return (f"shape {rows}x{cols}: {backend} needs rows a multiple of {limits.sparse_min_rows} and columns "
                f"of {limits.sparse_min_cols}")
    if not is_2of4(w):
        return "weight is not 2:4 (a group of 4 inputs holds more than 2 non-zeros)"
    return None


def to_semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """``weight`` (2:4, CUDA, half) compressed for ``backend``."""
    from torch.sparse import SparseSemiStructuredTensor

    saved = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = saved


class DualLinear(nn.Module):
    """``dual`` mode: a dense and a 2:4 copy of one weight; the call's row count picks the kernel."""

    def __init__(self, linear: nn.Linear, backend: str, min_tokens: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_sparse = nn.Parameter(to_semi_structured(linear.weight, backend), requires_grad=False)
        self.min_tokens = min_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        w = self.weight_sparse if tokens >= self.min_tokens else self.weight
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, sparse from {self.min_tokens} tokens"


@dataclass
class Sparse24Report:
    mode: str
    backend: str | None = None
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        if self.mode == "off":
            return "sparse24: off, weights stay dense"
        reasons = Counter(self.skipped.values())
        left = "; ".join(f"{n} x {r}" for r, n in reasons.most_common())
        return (f"sparse24 ({self.mode}, {self.backend}): {len(self.converted)} linear layers converted to 2:4"
                + (f"; {len(self.skipped)} left dense: {left}" if self.skipped else ""))


def apply_sparse24(model: nn.Module, *, mode: str | None = None, backend: str | None = None,
                   min_tokens: int | None = None, only: str | None = None) -> Sparse24Report:
    """Convert the eligible linears of ``model`` (already on CUDA) for the 2:4 kernels.

    ``only``: a name prefix (e.g. ``"model.layers"``) limiting which linears are considered; the
    default is every linear except the LM head (its weight is usually tied and never pruned).
    """
    from effllm_tools.methods.common import replace_module

    report = Sparse24Report(resolve_mode(mode))
    if report.mode == "off":
        return report
    report.backend = resolve_backend(backend)
    threshold = min_tokens or int(os.environ.get("EFFLLM_SPARSE24_MIN_TOKENS", DUAL_MIN_TOKENS))
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or (only and not name.startswith(only)) or name.endswith("lm_head"):
            continue
        reason = ineligible_reason(mod, report.backend)
        if reason is not None:
            report.skipped[name] = reason
            log.info("sparse24: %s left dense: %s", name, reason)
            continue
        if report.mode == "dual":
            replace_module(model, name, DualLinear(mod, report.backend, threshold))
        else:
            mod.weight = nn.Parameter(to_semi_structured(mod.weight, report.backend), requires_grad=False)
        report.converted.append(name)
    log.info(report.summary())
    return report


def maybe_apply_sparse24(model: nn.Module, checkpoint_dir: Any, device: str, mode: str | None = None
                         ) -> Sparse24Report | None:
    """The load hook: on CUDA, for a checkpoint whose provenance says 2:4, apply :func:`apply_sparse24`."""
    if not str(device).startswith("cuda") or checkpoint_pattern(checkpoint_dir) != "2:4":
        return None
    report = apply_sparse24(model, mode=mode)
    model._effllm_sparse24 = report  # what load did, for callers and tests
    return report
