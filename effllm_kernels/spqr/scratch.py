"""Per-device scratch buffers of the ``spqr`` kernels, and their reservation at load time.

The fp16x2 GEMV (:mod:`.triton_gemv16`) stages each call's activations in a small global scratch,
and every split-K launch uses the shared workspace of :mod:`effllm_kernels.splitk`. Both are kept
between calls and only grow. A buffer first allocated inside torch.compile's CUDA-graph warm-up
lands in the graph's memory pool, which cudagraph trees reject ("tensor(s) in the cudagraph pool
not tracked as outputs"; seen in the decode benchmark, where M = 1 calls happen only in the
compiled decode step): so :func:`reserve` allocates them for a layer when its kernel layout is
built (:func:`effllm_kernels.spqr.repack.repack_field`, eager, at load time), sized by the launch
heuristic for every batch size (a compiled batch-64 decode step splits K too). Torch only; the
split-K part imports triton lazily and is skipped where triton is missing.
"""

from __future__ import annotations

import torch

#: Activation rows the load-time reservation of the GEMV's activation scratch covers (the GEMVs take M <= 3).
RESERVE_ROWS = 4

_X_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def x_scratch(device: torch.device, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16x2 GEMV's activation scratch: (int32 >= 16 * units, fp32 >= 2 * units) on ``device``.

    Calls of one device must not run concurrently on two streams (like the split-K workspace).
    """
    device = torch.device(device)
    xs, sx = _X_SCRATCH.get(device, (None, None))
    if xs is None or xs.numel() < 16 * units:
        xs = torch.empty(max(16 * units, 1 << 16), dtype=torch.int32, device=device)
        sx = torch.empty(max(2 * units, 1 << 13), dtype=torch.float32, device=device)
        _X_SCRATCH[device] = (xs, sx)
    return xs, sx


def reserve(device: torch.device, meta: dict[str, int]) -> None:
    """Allocate now what any call of the layer with integer fields ``meta`` (in_features, out_features,
    bits, ...) will need: the GEMV's activation scratch for M <= RESERVE_ROWS, and the split-K
    workspace and counters of the launch heuristic at every M (``launch.split_k_need``)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return
    x_scratch(device, RESERVE_ROWS * -(-meta["in_features"] // 32))
    try:
        from effllm_kernels.splitk import SCRATCH
        from effllm_kernels.spqr.launch import split_k_need
    except ImportError:  # no triton: no kernels either
        return
    ws, tiles = split_k_need(meta, device)
    SCRATCH.get(device, ws, tiles)


def clear() -> None:
    """Drop the activation scratch (tests)."""
    _X_SCRATCH.clear()


__all__ = ["RESERVE_ROWS", "clear", "reserve", "x_scratch"]
