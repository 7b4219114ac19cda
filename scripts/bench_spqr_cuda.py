#!/usr/bin/env python
"""The CUDA GEMV of ``spqr`` layers (effllm_kernels/spqr/cuda_gemv.py) against the Triton fp16x2 GEMV and bf16
``F.linear`` in one run, by the protocol of bench_spqr_matmul.py: every case is first checked against an
fp64 reference on fresh inputs ("ok": error at most twice torch-bf16's), then timed by CUDA-graph replay
over rotated input copies >= 480 MB, median of 20 replays, twice (the better median is reported).

    python scripts/bench_spqr_cuda.py                        # Llama-3-8B shapes, M = 1, the heuristic
    python scripts/bench_spqr_cuda.py --ms 1,2,3 --configs "8:2:2:4:2.0:8,4:2:4:4:4.0:8"
        # also CUDA launches warps:units:min_blocks:max_steps:per_sm:out_batch (CudaGemvConfig fields)
    python scripts/bench_spqr_cuda.py --ms 2,4,8,16 --configs "mma:32:2:2.0:2,mma:16:2:4.0:1:4,mma:64:2:1.0:1:4:3"
        # the CUDA tensor-core kernel: mma:units:min_blocks:per_sm:prefetch:out_batch[:stages]
        # (CudaMmaConfig fields; stages >= 2: the cp.async shared ring instead of the register one)
    python scripts/bench_spqr_cuda.py --ms 2,4 --configs "mma:16:2:4.0:1:4" --no-triton   # shorter: no Triton row
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from bench_harness import copies_for, graph_medians

from effllm_kernels.spqr import cuda_gemv, cuda_mma, repack, spqr_linear_reference, unpack
from effllm_kernels.spqr.launch import KernelConfig, _cached_config, pick_config, spqr_matmul_triton
from effllm_kernels.spqr.testing import random_spqr_tensors


def rel_err(v: torch.Tensor, exact: torch.Tensor) -> float:
    return float("inf") if not torch.isfinite(v).all() else ((v.double() - exact).norm() / exact.norm()).item()


def parse_config(spec: str) -> KernelConfig:
    f = spec.split(":")
    if f[0] == "mma":  # mma:units:min_blocks:per_sm:prefetch:out_batch[:stages] (CudaMmaConfig fields)
        c = cuda_mma.CudaMmaConfig(*(float(v) if i == 2 else int(v) for i, v in enumerate(f[1:])))
        return KernelConfig("cuda_mma", 16, cuda_gemv.ROWS, 4, cuda_mma=c)
    c = cuda_gemv.CudaGemvConfig(*(float(v) if i == 4 else int(v) for i, v in enumerate(f)))
    return KernelConfig("cuda", 1, cuda_gemv.ROWS, c.units, num_warps=c.warps, cuda=c)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336,1024x4096")
    ap.add_argument("--ms", default="1")
    ap.add_argument("--configs", default="", help="extra CUDA launches to time (see the module docstring)")
    ap.add_argument("--formats", default="3:3:0.01", help="bits:stat_bits:outlier density, comma separated")
    ap.add_argument("--rotate-mb", type=int, default=480)
    ap.add_argument("--no-triton", action="store_true",
                    help="skip the Triton fallback's row (a shorter A/B call of the CUDA kernels)")
    args = ap.parse_args()
    torch.manual_seed(0)
    specs = [s for s in args.configs.split(",") if s]
    rows = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    for fmt in args.formats.split(","):
        bits, sb, dens = fmt.split(":")
        for shape in args.shapes.split(","):
            n, k = map(int, shape.split("x"))

            def layer(seed: int, n=n, k=k, bits=int(bits), sb=int(sb), dens=float(dens)):
                return repack(random_spqr_tensors(n, k, bits=bits, stat_bits=sb, outlier_density=dens, device="cuda",
                                                  seed=seed))

            kt0 = layer(1)
            per_set = unpack(kt0).storage_bytes()
            kts = [kt0] + [layer(s) for s in range(2, copies_for(per_set, args.rotate_mb) + 1)]
            dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                     for _ in range(copies_for(n * k * 2, args.rotate_mb))]
            for m in map(int, args.ms.split(",")):
                xs = [torch.randn(m, k, device="cuda").bfloat16() for _ in range(len(kts))]
                exact = spqr_linear_reference(xs[0].double(), unpack(kts[0]))
                e_bf16 = rel_err(spqr_linear_reference(xs[0], unpack(kts[0])), exact)
                t_dense = min(graph_medians([lambda w=w, x=x: torch.nn.functional.linear(x, w)
                                             for w, x in zip(dense, xs, strict=False)]))
                rows.append(f"| {fmt} | {n}x{k} | {m} | bf16 F.linear | {t_dense:.1f} | 1.00 | | {e_bf16:.2e} |")
                heur = _cached_config(m, tuple(kt0.meta().items()), xs[0].device, xs[0].dtype)
                triton = pick_config(m, kt0, xs[0].device, xs[0].dtype, cuda=False)
                cases = [("heuristic: " + heur.path, None)]
                if not args.no_triton:
                    cases.append((f"Triton ({triton.path})", triton))
                cases += [(f"cuda {s}", parse_config(s)) for s in specs]
                for name, cfg in cases:
                    calls = [lambda t=t, x=x, cfg=cfg: spqr_matmul_triton(x, t, None, cfg)
                             for t, x in zip(kts, xs, strict=False)]
                    e = rel_err(calls[0](), exact)
                    tm = min(graph_medians(calls))
                    ok = "ok" if e <= 2 * max(e_bf16, 1e-4) else "BAD"
                    rows.append(f"| {fmt} | {n}x{k} | {m} | {name} | {tm:.1f} | {t_dense / tm:.2f} | "
                                f"{(per_set + xs[0].nbytes) / tm / 1e6:.2f} | {e:.2e} {ok} |")
                print("\n".join(rows[-1 - len(cases):]), flush=True)
    text = ("| format | N x K | M | kernel | us | vs bf16 | TB/s | rel. error |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows))
    print("\n" + text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_spqr_cuda.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
