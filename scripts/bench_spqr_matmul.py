#!/usr/bin/env python
"""Benchmark the ``spqr`` Triton linear layer against bf16 ``F.linear`` on one CUDA GPU.

Protocol (scripts/README.md; the harness of bench_harness.py, shared with bench_rtn_matmul.py;
research/performance.md §6):
each case is checked first against an fp64 reference on fresh inputs (kernel error vs torch-bf16
error, "ok" within 2x); then CUDA-graph replay over rotated copies of every input (random SpqrTensors:
codes, statistics, outliers, permutation, repacked once as a loaded module does; activations; bf16
weights for the baseline) totalling
>= ``--rotate-mb`` (default 480 MB, 8x the 60 MB L2), median of 20 replays, twice; do_bench (L2
flushed, eager launch) and the eager per-call latency as secondary numbers. TB/s counts the stored
bytes of the SpQR layer (codes, statistics, outliers, permutation, row pointers) plus x and y.

    python scripts/bench_spqr_matmul.py               # 3-bit/3-bit stats/16/16/1% outliers, + a 4-bit row
    python scripts/bench_spqr_matmul.py --sweep       # also time the candidate configurations (tuning)
    python scripts/bench_spqr_matmul.py --sweep --sweep-paths mma16 --formats "3:3:16,64"  # fp16 tensor cores

With ``--sweep`` every candidate of :func:`sweep_configs` is first compiled and checked in parallel
worker processes (``--workers``; Triton's disk cache then serves the timing process), then each is
checked and timed (quick graph replay) per case; the table row of a case times its fastest
candidate (named in the config column), which is what ``launch.pick_config`` should encode.
"""

from __future__ import annotations

import argparse
import multiprocessing
from dataclasses import fields, replace

import torch
import triton
from bench_harness import CEILING_TBS, Timing, copies_for, eager_us, emit, graph_medians, header, time_dense

from effllm_kernels.spqr import SpqrKernelTensors, SpqrTensors, repack, spqr_linear_reference, unpack
from effllm_kernels.spqr.launch import (
    KernelConfig,
    gemv16_unsupported_reason,
    mma16_unsupported_reason,
    pick_config,
    spqr_matmul_triton,
    with_split,
)
from effllm_kernels.spqr.testing import random_spqr_tensors


def check_case(kt: SpqrKernelTensors, m: int, dtype: torch.dtype,
               config: KernelConfig | None) -> tuple[float, float]:
    """(kernel error, torch-in-dtype error) relative to an fp64 reference, on fresh inputs."""
    t = unpack(kt)
    x = torch.randn(m, t.in_features, device="cuda").to(dtype)
    exact = spqr_linear_reference(x.double(), t)
    y = torch.full((m, t.out_features), float("nan"), dtype=dtype, device="cuda")
    spqr_matmul_triton(x, kt, None, config, out=y)

    def err(v: torch.Tensor) -> float:
        return float("inf") if not torch.isfinite(v).all() else ((v.double() - exact).norm() / exact.norm()).item()

    return err(y), err(spqr_linear_reference(x, t))


def time_kernel(ts: list[SpqrKernelTensors], xs: list[torch.Tensor], config: KernelConfig | None,
                quick: bool = False, eager_calls: int = 1000) -> Timing:
    calls = [lambda t=t, x=x: spqr_matmul_triton(x, t, None, config) for t, x in zip(ts, xs, strict=False)]
    x0 = xs[0]
    moved = ts[0].storage_bytes() + x0.nbytes + x0.shape[0] * ts[0].out_features * x0.element_size()
    if quick:
        return Timing(*graph_medians(calls, reps=10, rounds=1, work_ms=1.0) * 2, float("nan"), moved)
    m1, m2 = graph_medians(calls)
    db = triton.testing.do_bench(calls[0], return_mode="median") * 1000
    return Timing(m1, m2, db, moved, eager_us(calls[0], eager_calls))


#: Candidates (block_n, units, num_warps, num_stages[, host_perm]) per path (GEMV) or activation tile (mma).
GEMV_CANDIDATES = [(128, 2, 2, 2), (128, 2, 2, 3), (128, 2, 2, 4), (128, 1, 1, 2), (64, 2, 1, 2), (128, 4, 4, 2),
                   (256, 2, 4, 2)]
#: fp16x2 GEMV candidates (block_n, units, num_warps, rows per thread, prefetch depth, outliers first, unroll).
GEMV16_CANDIDATES = [(256, 2, 4, 4, 2, False, 1), (256, 2, 4, 4, 1, False, 1), (256, 2, 4, 4, 2, True, 1),
                     (128, 4, 4, 4, 2, False, 1), (256, 2, 4, 4, 1, False, 2),
                     # fewer rows per program: narrow layers (k/v projections, 1024 x 4096) get more programs
                     (128, 2, 2, 4, 2, True, 1), (64, 2, 1, 4, 2, True, 1), (128, 4, 4, 4, 2, True, 1),
                     # the 03:31 round's best on 14336 x 4096 (20.8 us, an earlier revision of the kernel)
                     (512, 1, 4, 4, 1, False, 1), (256, 2, 4, 4, 1, True, 1)]
MMA_CANDIDATES = [(128, 2, 4, 3), (128, 2, 4, 2), (256, 2, 8, 2), (128, 4, 4, 3), (64, 2, 4, 3), (256, 2, 8, 3)]
#: fp16 tensor-core candidates (effllm_kernels/spqr/triton_mma16.py; bf16 / fp16 activations, 2-4 bits, groups of 16):
#: (block_n, units, num_warps, num_stages, rows per thread, prefetch depth, x cast on the host).
MMA16_CANDIDATES = [(128, 2, 4, 1, 4, 1, True), (128, 2, 4, 1, 4, 1, False), (128, 4, 4, 1, 4, 1, True),
                    (256, 2, 8, 1, 4, 1, True), (128, 2, 4, 1, 4, 0, True), (128, 2, 4, 2, 4, 0, True),
                    (256, 4, 8, 1, 4, 1, True)]

#: Dequantize-then-cuBLAS candidates (effllm_kernels/spqr/triton_dequant.py): (block_n, units, num_warps).
DEQUANT_CANDIDATES = [(64, 4, 4), (128, 2, 4), (32, 4, 2)]


def sweep_configs(m: int, t: SpqrTensors | SpqrKernelTensors, paths: str = "all",
                  splits: str = "auto,double,half") -> list[KernelConfig]:
    """The heuristic, then each candidate at its automatic K split, twice and half that (``--sweep``;
    ``paths``: "all" or a comma list of paths to try, e.g. "mma16"; ``splits``: which of the three)."""
    dev = torch.device("cuda")
    out = [pick_config(m, t, dev)]
    if paths.startswith("variants:"):  # the heuristic's configuration with fields overridden
        return out + [replace(out[0], **v) for v in parse_variants(paths.split(":", 1)[1])]
    if m == 1 and gemv16_unsupported_reason(torch.bfloat16, t) is None:
        bases = [KernelConfig("gemv16", 1, bn, c, 1, nw, 1, rows=r, prefetch=pf, outliers_first=of, unroll=un)
                 for bn, c, nw, r, pf, of, un in GEMV16_CANDIDATES]
    elif m == 1:
        bases = [KernelConfig("gemv", 1, bn, c, 1, nw, st, *hp) for bn, c, nw, st, *hp in GEMV_CANDIDATES]
    else:
        bm = min(64, max(16, triton.next_power_of_2(m)))
        bases = [KernelConfig("mma", bm, bn, c, 1, nw, st) for bn, c, nw, st in MMA_CANDIDATES]
        if mma16_unsupported_reason(torch.bfloat16, t, 4, bm) is None:
            bases += [KernelConfig("mma16", bm, bn, c, 1, nw, st, rows=r, prefetch=pf, host_cast=hc)
                      for bn, c, nw, st, r, pf, hc in MMA16_CANDIDATES]
        bases += [KernelConfig("dequant", 1, bn, c, num_warps=nw) for bn, c, nw in DEQUANT_CANDIDATES]
    if paths != "all":
        bases = [b for b in bases if b.path in paths.split(",")]
    for base in bases:
        auto = with_split(base, m, t, dev)
        cands = {"auto": auto, "double": replace(auto, split_k=min(64, 2 * auto.split_k)),
                 "half": replace(auto, split_k=max(1, auto.split_k // 2))}
        out += [cands[name] for name in splits.split(",")]
    seen: list[KernelConfig] = []
    return [c for c in out if not (c in seen or seen.append(c))]


def parse_variants(spec: str) -> list[dict]:
    """"rows=2,prefetch=2;outliers_first=1" -> [{"rows": 2, "prefetch": 2}, {"outliers_first": True}] (KernelConfig fields)."""
    types = {f.name: f.type for f in fields(KernelConfig)}
    out = []
    for item in filter(None, spec.split(";")):
        v: dict = {}
        for kv in item.split(","):
            key, val = kv.split("=")
            v[key] = (val not in ("0", "false")) if "bool" in str(types[key]) else int(val)
        out.append(v)
    return out


def _precompile_one(job: tuple) -> str:
    n, k, bits, sb, m, cfg = job
    t = repack(random_spqr_tensors(n, k, bits, 16, sb, 16, 0.01, True, seed=1, device="cuda"))
    ek, et = check_case(t, m, torch.bfloat16, cfg)
    return f"{describe(cfg)} w{bits}s{sb} m{m}: {'ok' if ek <= 2 * et else 'FAIL'} ({ek:.1e} vs {et:.1e})"


def precompile(jobs: list[tuple], workers: int) -> None:
    """Compile (and check) every configuration in ``workers`` processes; Triton's disk cache keeps them."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for line in pool.imap_unordered(_precompile_one, jobs):
            print("precompiled", line, flush=True)


def describe(c: KernelConfig) -> str:
    tag = f"{c.path} BM{c.block_m} BN{c.block_n} C{c.units} split{c.split_k} w{c.num_warps} s{c.num_stages}"
    if c.path == "gemv16":
        tag += f" R{c.rows} prefetch{c.prefetch}" + (" outliers-first" if c.outliers_first else "")
        tag += f" unroll{c.unroll}" if c.unroll > 1 else ""
    if c.path == "mma16":
        tag += f" R{c.rows} prefetch{c.prefetch}" + (" host-cast" if c.host_cast else "")
    return tag + (" host-perm" if c.host_perm else "")


def specs0(args: argparse.Namespace) -> tuple[int, int]:
    """(bits, stat_bits) of the first format: the one --sweep tunes."""
    b, sb, _ = args.formats.split(";")[0].split(":")
    return int(b), int(sb)


def fmt_of(bits: int, sb: int) -> str:
    return f"w{bits} s{sb} g16/16"


def bench_shape(n: int, k: int, bits: int, sb: int, ms: list[int], args: argparse.Namespace,
                rows: list[str], sweep_rows: list[str]) -> None:
    dtype = torch.bfloat16
    t0 = repack(random_spqr_tensors(n, k, bits, 16, sb, 16, args.outliers, True, seed=n + k + bits, device="cuda"))
    ts = [t0] + [repack(random_spqr_tensors(n, k, bits, 16, sb, 16, args.outliers, True, seed=i + 100,
                                            device="cuda"))
                 for i in range(copies_for(t0.storage_bytes(), args.rotate_mb) - 1)]
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(copies_for(n * k * 2, args.rotate_mb))]
    for m in ms:
        xs = [torch.randn(m, k, device="cuda").to(dtype) for _ in range(max(len(ts), len(dense)))]
        d = time_dense(dense, xs, eager_calls=args.eager_calls)
        cfg = pick_config(m, t0, torch.device("cuda"))
        if args.sweep and (m == 1 or not args.sweep_m1_only) and (bits, sb) == specs0(args):
            best = None
            for c in sweep_configs(m, t0, args.sweep_paths, args.sweep_splits):
                ek2, et2 = check_case(t0, m, dtype, c)
                tq = time_kernel(ts, xs, c, quick=True)
                good = ek2 <= 2 * et2
                sweep_rows.append(f"| {n}x{k} | {m} | {fmt_of(bits, sb)} | {describe(c)} | {tq.best:.1f} "
                                  f"| {d.best / tq.best:.2f}x | {'ok' if good else 'FAIL'} |")
                print(sweep_rows[-1], flush=True)
                if good and (best is None or tq.best < best[0]):
                    best = (tq.best, c)
            cfg = best[1] if best else cfg
        ek, et = check_case(t0, m, dtype, cfg)
        ok = "ok" if ek <= 2 * et else "FAIL"
        tk = time_kernel(ts, xs, cfg, eager_calls=args.eager_calls)
        tbs = tk.bytes / tk.best / 1e6
        rows.append(
            f"| {n}x{k} | {m} | {fmt_of(bits, sb)} | {t0.average_bits():.2f} | {tk.median1:.1f} / {tk.median2:.1f} "
            f"| {tbs:.2f} ({100 * tbs / CEILING_TBS:.0f}%) | {d.median1:.1f} / {d.median2:.1f} "
            f"| **{d.best / tk.best:.2f}x** | {tk.do_bench:.1f} vs {d.do_bench:.1f} | {tk.eager:.1f} vs {d.eager:.1f} "
            f"| {ek:.1e} vs {et:.1e} {ok} | {describe(cfg)} |")
        print(rows[-1], flush=True)
    del ts, dense
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336", help="NxK (out x in) list")
    ap.add_argument("--m", default="1,16,64")
    ap.add_argument("--formats", default="3:3:1,16,64;4:3:1,16", help="bits:stat_bits:M-list; ...")
    ap.add_argument("--outliers", type=float, default=0.01, help="outlier density")
    ap.add_argument("--rotate-mb", type=int, default=480)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--workers", type=int, default=12, help="compile processes for --sweep (0: none)")
    ap.add_argument("--precompile-only", action="store_true", help="with --sweep: compile and check, then stop")
    ap.add_argument("--eager-calls", type=int, default=300)
    ap.add_argument("--sweep-m1-only", action="store_true", help="with --sweep: sweep M = 1 cases only")
    ap.add_argument("--sweep-paths", default="all", help="with --sweep: 'all' or paths to try, e.g. 'mma16,mma'; or "
                    "'variants:rows=2;prefetch=2': the heuristic's configuration and these overrides of it")
    ap.add_argument("--sweep-splits", default="auto,double,half", help="with --sweep: K splits per candidate")
    args = ap.parse_args()
    args.dtype, args.group_size = "bf16", 16
    rows: list[str] = []
    sweep_rows: list[str] = []
    print(header(args), flush=True)
    specs = [(int(b), int(sb), [int(v) for v in ms.split(",")])
             for b, sb, ms in (spec.split(":") for spec in args.formats.split(";"))]
    if args.sweep and args.workers > 0:
        t = random_spqr_tensors(4096, 4096, device="cuda")
        sweep_ms = {m for m in specs[0][2] if m == 1 or not args.sweep_m1_only}
        jobs = {(specs[0][0], specs[0][1], m if m == 1 else min(64, max(16, triton.next_power_of_2(m))),
                 replace(c, split_k=min(c.split_k, 2)))
                for m in sweep_ms for c in sweep_configs(m, t, args.sweep_paths, args.sweep_splits)}
        precompile([(4096, 4096, bits, sb, m, c) for bits, sb, m, c in sorted(jobs, key=str)], args.workers)
        if args.precompile_only:
            return
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for bits, sb, ms in specs:
            bench_shape(n, k, bits, sb, ms, args, rows, sweep_rows)
    table = "\n".join([
        "| N x K | M | format | avg bits | spqr us (median 1 / 2) | spqr TB/s (% of 4.2) | bf16 us (median 1 / 2) "
        "| speedup | do_bench us spqr vs bf16 | eager us/call spqr vs bf16 | rel. error kernel vs torch-bf16 | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    text = header(args) + f"\n- SpQR: random layers, outlier density {args.outliers}, act-order permutation\n\n" + table + "\n"
    emit(text, sweep_rows, "format", "bench_spqr_matmul.md")


if __name__ == "__main__":
    main()
