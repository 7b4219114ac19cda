#!/usr/bin/env python
"""Benchmark the ``rtn`` Triton dequantize-matmul against bf16 ``F.linear`` on one CUDA GPU.

Protocol (scripts/README.md; research/performance.md section 6): every case is first checked
against an fp64 reference; then CUDA-graph replay over rotated copies of all inputs (weights,
scales, activations) totalling >= ``--rotate-mb`` (default 480 MB, 8x the H200's 60 MB L2), median
of 20 replays, done twice (median 1, median 2); ``triton.testing.do_bench`` (L2 flushed before
each call, one input set) as the secondary number; eager per-call latency (``--eager-calls``
back-to-back calls, synchronize, wall time / calls: host launch cost included) as the third; bf16
``F.linear`` timed the same way in the same run. Prints a markdown table (and writes it under ``$OUT`` when that is set).

    python scripts/bench_rtn_matmul.py                  # the default table
    python scripts/bench_rtn_matmul.py --sweep          # also time alternative kernel configs
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import triton
from bench_harness import CEILING_TBS, Timing, copies_for, eager_us, emit, graph_medians, header, time_dense

from effllm_kernels.rtn import prepare_rtn_weight
from effllm_kernels.rtn.launch import KernelConfig, pick_config, rtn_matmul_triton
from effllm_kernels.rtn.prepare import RtnWeight
from effllm_kernels.rtn.reference import dequantize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def random_weight(n: int, k: int, bits: int, g: int, dtype: torch.dtype, gen: torch.Generator):
    """A random stored-format weight on the GPU: every int32 bit pattern is a valid code word."""
    packed = torch.randint(-(2**31), 2**31, (n, k * bits // 32), dtype=torch.int32, device="cuda", generator=gen)
    groups = -(-k // g)
    scales = (torch.rand(n, groups, device="cuda", generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = (torch.rand(n, groups, device="cuda", generator=gen) * ((1 << bits) - 1)).to(dtype)
    return packed, scales, zeros


@dataclass
class Reference:
    """The dense weight of one case: fp64 (the reference) and in the activation dtype (torch's math)."""

    w64: torch.Tensor
    w_dtype: torch.Tensor

    @classmethod
    def of(cls, fmt: tuple, dtype: torch.dtype) -> Reference:
        packed, scales, zeros, bits, g, k = fmt
        w64 = dequantize(packed, scales, zeros, bits, g, k).double()  # fp32 math, exact here
        return cls(w64, dequantize(packed, scales, zeros, bits, g, k).to(dtype))


def check_case(ref: Reference, w: RtnWeight, m: int, dtype: torch.dtype, gen: torch.Generator,
               config: KernelConfig | None = None) -> tuple[float, float]:
    """(kernel error, torch-in-dtype error), both relative to an fp64 reference, on fresh inputs."""
    x = torch.randn(m, w.in_features, device="cuda", generator=gen).to(dtype)
    exact = x.double() @ ref.w64.t()
    y = torch.full((m, w.out_features), float("nan"), dtype=dtype, device="cuda")
    rtn_matmul_triton(x, w, None, config, out=y)

    def err(t: torch.Tensor) -> float:
        return float("inf") if not torch.isfinite(t).all() else ((t.double() - exact).norm() / exact.norm()).item()

    return err(y), err(torch.nn.functional.linear(x, ref.w_dtype))


def time_kernel(weights: list[RtnWeight], xs: list[torch.Tensor], config: KernelConfig | None,
                quick: bool = False, eager_calls: int = 1000) -> Timing:
    calls = [lambda w=w, x=x: rtn_matmul_triton(x, w, None, config) for w, x in zip(weights, xs, strict=False)]
    w0, x0 = weights[0], xs[0]
    moved = w0.qweight.nbytes + w0.coefs.nbytes + x0.nbytes + x0.shape[0] * w0.out_features * x0.element_size()
    if quick:
        return Timing(*graph_medians(calls, reps=10, rounds=1, work_ms=1.0) * 2, float("nan"), moved)
    m1, m2 = graph_medians(calls)
    db = triton.testing.do_bench(calls[0], return_mode="median") * 1000
    return Timing(m1, m2, db, moved, eager_us(calls[0], eager_calls))


def sweep_configs(m: int, w: RtnWeight) -> list[KernelConfig]:
    """Alternative configurations around the heuristic, for tuning (``--sweep``)."""
    out = [pick_config(m, w, torch.device("cuda"))]
    if m == 1:
        out += [KernelConfig("gemv", 1, bn, s, nw, st) for bn, nw, st in
                ((16, 4, 4), (32, 4, 4), (32, 8, 4), (64, 4, 3), (64, 8, 4), (16, 2, 6)) for s in (1, 2, 4)]
        out.append(KernelConfig("gemv", 1, 16, 1, 1, 4))  # the previous heuristic's shape
    elif m <= 64:
        bm = triton.next_power_of_2(max(16, m))
        for bn, nw, st in ((64, 4, 3), (128, 4, 3), (128, 8, 4)):
            for s in (1, 2, 4):
                for pair in ((False, True) if w.bits == 4 else (False,)):
                    out.append(KernelConfig("mma", bm, bn, s, nw, st, pair))
    else:
        for bm, bn, nw, st in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 3),
                               (128, 256, 8, 3)):
            for s in (1, 2):
                out.append(KernelConfig("mma", bm, bn, s, nw, st))
    seen: list[KernelConfig] = []
    return [c for c in out if not (c in seen or seen.append(c))]


def describe(c: KernelConfig) -> str:
    tag = f"{c.path} BM{c.block_m} BN{c.block_n} split{c.split_k} w{c.num_warps} s{c.num_stages}"
    return tag + (" pair" if c.pair else "")


def bench_shape(n: int, k: int, bits: int, args: argparse.Namespace, gen: torch.Generator,
                rows: list[str], sweep_rows: list[str]) -> None:
    dtype, g = DTYPES[args.dtype], args.group_size
    fmt0 = (*random_weight(n, k, bits, g, dtype, gen), bits, g, k)
    w0, ref = prepare_rtn_weight(*fmt0), Reference.of(fmt0, dtype)
    set_bytes = w0.qweight.nbytes + w0.coefs.nbytes
    weights = [w0] + [prepare_rtn_weight(*random_weight(n, k, bits, g, dtype, gen), bits, g, k)
                      for _ in range(copies_for(set_bytes, args.rotate_mb) - 1)]
    dense = [torch.randn(n, k, device="cuda", generator=gen, dtype=dtype)
             for _ in range(copies_for(n * k * 2, args.rotate_mb))]
    for m in args.m:
        cfg = pick_config(m, w0, torch.device("cuda"))
        e_kernel, e_torch = check_case(ref, w0, m, dtype, gen)
        ok = "ok" if e_kernel <= 2 * e_torch else "FAIL"
        xs = [torch.randn(m, k, device="cuda", generator=gen).to(dtype) for _ in range(max(len(weights), len(dense)))]
        t = time_kernel(weights, xs, None, eager_calls=args.eager_calls)
        d = time_dense(dense, xs, eager_calls=args.eager_calls)
        tbs = t.bytes / t.best / 1e6
        rows.append(
            f"| {n}x{k} | {m} | {bits} | {t.median1:.1f} / {t.median2:.1f} | {tbs:.2f} ({100 * tbs / CEILING_TBS:.0f}%) "
            f"| {d.median1:.1f} / {d.median2:.1f} | **{d.best / t.best:.2f}x** | {t.do_bench:.1f} vs {d.do_bench:.1f} "
            f"| {t.eager:.1f} vs {d.eager:.1f} "
            f"| {e_kernel:.1e} vs {e_torch:.1e} {ok} | {describe(cfg)} |"
        )
        print(rows[-1], flush=True)
        if args.sweep and (not args.sweep_shapes or f"{n}x{k}" in args.sweep_shapes.split(",")):
            for c in sweep_configs(m, w0):
                ek, et = check_case(ref, w0, m, dtype, gen, c)
                ts = time_kernel(weights, xs, c, quick=True)
                sweep_rows.append(f"| {n}x{k} | {m} | {bits} | {describe(c)} | {ts.best:.1f} | "
                                  f"{d.best / ts.best:.2f}x | {'ok' if ek <= 2 * et else 'FAIL'} |")
                print(sweep_rows[-1], flush=True)
    del weights, dense, ref
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336", help="NxK (out x in) list")
    ap.add_argument("--m", default="1,16,128", help="activation rows")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rotate-mb", type=int, default=480)
    ap.add_argument("--sweep", action="store_true", help="also time alternative kernel configurations")
    ap.add_argument("--sweep-shapes", default="", help="NxK list the sweep is limited to (default: all)")
    ap.add_argument("--eager-calls", type=int, default=1000, help="calls of the eager per-call loop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.m = [int(v) for v in args.m.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    rows: list[str] = []
    sweep_rows: list[str] = []
    print(header(args), flush=True)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for bits in (int(b) for b in args.bits.split(",")):
            bench_shape(n, k, bits, args, gen, rows, sweep_rows)
    table = "\n".join([
        "| N x K | M | bits | rtn us (median 1 / 2) | rtn TB/s (% of 4.2) | bf16 us (median 1 / 2) | speedup "
        "| do_bench us rtn vs bf16 | eager us/call rtn vs bf16 | rel. error kernel vs torch-bf16 | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    text = header(args) + "\n\n" + table + "\n"
    emit(text, sweep_rows, "bits", "bench_rtn_matmul.md")


if __name__ == "__main__":
    main()
