"""Timing harness shared by the kernel benchmarks (``bench_rtn_matmul.py``, ``bench_spqr_matmul.py``).

Protocol (scripts/README.md; research/performance.md section 6): CUDA-graph replay over rotated
copies of all inputs totalling >= ``--rotate-mb`` (8x the H200's 60 MB L2), median of 20 replays,
done twice (:func:`graph_medians`); ``triton.testing.do_bench`` as the secondary number; eager
per-call latency (:func:`eager_us`, host launch cost included) as the third.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

CEILING_TBS = 4.2  # measured achievable HBM read bandwidth on the H200 (performance.md section 1)


@dataclass
class Timing:
    """Graph-replay medians (us per call), the do_bench median, eager us per call, bytes moved per call."""

    median1: float
    median2: float
    do_bench: float
    bytes: int
    eager: float = float("nan")

    @property
    def best(self) -> float:
        return min(self.median1, self.median2)


def graph_medians(calls: list[Callable[[], object]], reps: int = 20, rounds: int = 2,
                  work_ms: float = 3.0) -> list[float]:
    """Median us per call of a CUDA graph holding ~``work_ms`` of back-to-back calls cycling ``calls``."""
    for c in calls:  # warm-up: compile, autotune, allocator
        c()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for c in calls * 3:
        c()
    e1.record()
    torch.cuda.synchronize()
    per_call_ms = e0.elapsed_time(e1) / (3 * len(calls))
    n = max(len(calls), min(1000, int(work_ms / max(per_call_ms, 1e-4))))
    n = -(-n // len(calls)) * len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    graph.replay()
    graph.replay()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(reps):
            e0.record()
            graph.replay()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) * 1000 / n)
        medians.append(statistics.median(times))
    return medians


def eager_us(call: Callable[[], object], calls: int) -> float:
    """Wall-clock us per call of ``calls`` back-to-back eager calls (one input set), synchronized."""
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def copies_for(bytes_per_set: int, rotate_mb: int) -> int:
    """Input sets needed to exceed ``rotate_mb`` together (at most 64)."""
    return max(2, min(64, -(-rotate_mb * 2**20 // bytes_per_set)))


def time_dense(dense: list[torch.Tensor], xs: list[torch.Tensor], eager_calls: int = 1000) -> Timing:
    """bf16/fp16 ``F.linear`` over rotated (weight, x) pairs, timed like the kernels."""
    calls = [lambda w=w, x=x: torch.nn.functional.linear(x, w) for w, x in zip(dense, xs, strict=False)]
    m1, m2 = graph_medians(calls)
    db = triton.testing.do_bench(calls[0], return_mode="median") * 1000
    x0, w0 = xs[0], dense[0]
    return Timing(m1, m2, db, w0.nbytes + x0.nbytes + x0.shape[0] * w0.shape[0] * x0.element_size(),
                  eager_us(calls[0], eager_calls))


def header(args: argparse.Namespace) -> str:
    props = torch.cuda.get_device_properties(0)
    return "\n".join([
        f"- GPU: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB "
        f"(clocks as found); host {platform.node()}",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"activations {args.dtype}, group size {args.group_size}, asymmetric (float zero points)",
        f"- rotation: input copies totalling >= {args.rotate_mb} MB per case; graph replay, 20 reps x 2 rounds",
    ])


def emit(text: str, sweep_rows: list[str], first_column: str, name: str) -> None:
    """Print the report (the table ``text``, then the sweep table if any) and write it to ``$OUT/name``."""
    if sweep_rows:
        text += (f"\n| N x K | M | {first_column} | config | us | vs bf16 | check |\n|---|---|---|---|---|---|---|\n"
                 + "\n".join(sweep_rows) + "\n")
    print("\n" + text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            f.write(text)
