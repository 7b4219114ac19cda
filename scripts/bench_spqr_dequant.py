#!/usr/bin/env python
"""Time the large-batch path's dequantization of a ``spqr`` layer on one CUDA GPU (effllm_kernels/spqr/triton_dequant.py).

Per Llama shape (3-bit codes and statistics, groups of 16, 1% outliers, random layers): the dense
kernel alone (``outliers=False``), the dense kernel plus the outlier scatter (``launch.dequantize_triton``, what a call at
M >= DEQUANT_MIN_M runs before cuBLAS), CUDA-graph replay over 8 rotated layers (beyond the L2),
median of ``triton.testing.do_bench``; TB/s counts the packed bytes read plus the bf16 matrix written.

    python scripts/bench_spqr_dequant.py
"""

from __future__ import annotations

import torch
import triton

from effllm_kernels.spqr.launch import dequantize_triton
from effllm_kernels.spqr.repack import repack
from effllm_kernels.spqr.testing import random_spqr_tensors

COPIES = 8


def graph_us(calls: list) -> float:
    """Median microseconds per call of ``calls`` replayed as one CUDA graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return triton.testing.do_bench(g.replay, return_mode="median") * 1000 / len(calls)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        ts = [repack(random_spqr_tensors(n, k, 3, 16, 3, 16, 0.01, True, seed=i, device="cuda")) for i in range(COPIES)]
        moved = n * k * 2 + ts[0].storage_bytes()
        d = graph_us([lambda t=t: dequantize_triton(t, torch.bfloat16, outliers=False) for t in ts])
        full = graph_us([lambda t=t: dequantize_triton(t, torch.bfloat16) for t in ts])
        print(f"{n}x{k}: dense kernel {d:.1f} us ({moved / d / 1e6:.2f} TB/s); with the outlier scatter "
              f"{full:.1f} us ({ts[0].nnz} outliers)", flush=True)
        del ts


if __name__ == "__main__":
    main()
