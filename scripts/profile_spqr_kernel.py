#!/usr/bin/env python
"""Run one spqr linear (the launch heuristic's kernel) a few times, for a profiler to capture.

Meant to run under Nsight Compute on the GPU machine (``scripts/gpu/spqr_ncu.sh``): a random repacked
3/3/16/16 layer with 1% outliers and an act-order permutation (``effllm_kernels.spqr.testing``), bf16
activations, ``--warmup`` calls (compilation, scratch) then ``--calls`` calls; prints the config.

    python scripts/profile_spqr_kernel.py --n 14336 --k 4096 --m 16 [--bits 3]
"""

from __future__ import annotations

import argparse

import torch

from effllm_kernels.spqr.launch import _cached_config, spqr_matmul_triton
from effllm_kernels.spqr.repack import repack
from effllm_kernels.spqr.testing import random_spqr_tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.01)
    args = ap.parse_args()
    t = repack(random_spqr_tensors(args.n, args.k, args.bits, 16, 3, 16, args.density, True, seed=1, device="cuda"))
    x = torch.randn(args.m, args.k, device="cuda").bfloat16()
    cfg = _cached_config(args.m, tuple(t.meta().items()), x.device, x.dtype)
    print(f"{args.n}x{args.k} M={args.m} w{args.bits}: {cfg}", flush=True)
    for _ in range(args.warmup + args.calls):
        spqr_matmul_triton(x, t)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
