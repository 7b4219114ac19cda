"""2:4 semi-structured sparse linear vs dense bf16 F.linear on Llama-3-8B shapes (performance.md §6).

For each weight shape (out x in) and token count M: median µs per call of ``F.linear(x, W)`` with
W dense bf16, and with W a 2:4-pruned copy compressed by ``to_sparse_semi_structured`` (cuSPARSELt
and CUTLASS), all in the same run. Primary number: CUDA-graph replay over rotated weight copies
totalling >= 240 MB (4x the H200's L2), timed by ``triton.testing.do_bench`` (median), divided by
the number of calls in the graph. Secondary: plain ``do_bench`` with its L2 flush (one launch per
sample). The sparse output is checked against the dense product of the same pruned weight.

    python scripts/bench_sparse24.py --out OUT_DIR     (writes sparse24.json and sparse24.md)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q/o, k/v, gate/up, down
NAMES = {(4096, 4096): "q/o_proj", (1024, 4096): "k/v_proj", (14336, 4096): "gate/up_proj", (4096, 14336): "down_proj"}
MS = [1, 16, 128, 2048]
ROTATE_BYTES = 240e6


def prune24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive weights of each row (magnitude 2:4)."""
    g = w.reshape(w.shape[0], -1, 4)
    keep = g.abs().topk(2, dim=-1).indices
    return torch.zeros_like(g).scatter_(-1, keep, g.gather(-1, keep)).reshape_as(w)


def compress(w: torch.Tensor, backend: str) -> torch.Tensor:
    from effllm_tools.runtime.sparse24 import to_semi_structured

    return to_semi_structured(w, backend)


def time_graph(fn_list, reps_note: dict) -> float | None:
    """Median µs per call: one CUDA graph replaying every call in ``fn_list`` once."""
    import triton.testing

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fn_list:  # warm-up outside the graph (workspaces, lazy init)
                f()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fn_list:
                f()
        ms = triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
        return ms * 1e3 / len(fn_list)
    except Exception as err:  # noqa: BLE001  (a backend that cannot be captured: report, keep going)
        reps_note["graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return None


def time_plain(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def bench_shape(n: int, k: int, backends: list[str]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    base = prune24(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02)
    copies = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
    dense = [base.clone() for _ in range(copies)]
    sparse = {b: [compress(base, b) for _ in range(copies)] for b in backends}
    rows = []
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = F.linear(x.float(), base.float())
        row: dict = {"shape": f"{n}x{k}", "layer": NAMES.get((n, k), ""), "M": m, "copies": copies}

        def calls(ws, x=x):
            return [lambda w=w: F.linear(x, w) for w in ws]

        row["dense_us"] = time_graph(calls(dense), row)
        row["dense_flush_us"] = time_plain(lambda x=x, w=dense[0]: F.linear(x, w))
        for b in backends:
            note: dict = {}
            row[f"{b}_us"] = time_graph(calls(sparse[b]), note)
            if note:
                row[f"{b}_graph_error"] = note["graph_error"]
            row[f"{b}_flush_us"] = time_plain(lambda x=x, w=sparse[b][0]: F.linear(x, w))
            got = F.linear(x, sparse[b][0]).float()
            row[f"{b}_rel_err"] = float((got - ref).norm() / ref.norm())
            if row["dense_us"] and row[f"{b}_us"]:
                row[f"{b}_speedup"] = row["dense_us"] / row[f"{b}_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    dense.clear()
    sparse.clear()
    torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], backends: list[str]) -> str:
    head = "| layer (out x in) | M | dense bf16 µs | " + " | ".join(f"{b} µs | speedup" for b in backends) + " |"
    sep = "|---|---|---|" + "---|---|" * len(backends)
    lines = [head, sep]
    for r in rows:
        cells = [f"{r['layer']} {r['shape']}", str(r["M"]), f"{r['dense_us']:.1f}" if r["dense_us"] else "-"]
        for b in backends:
            us, sp = r.get(f"{b}_us"), r.get(f"{b}_speedup")
            cells += [f"{us:.1f}" if us else "-", f"{sp:.2f}x" if sp else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench-sparse24"))
    ap.add_argument("--backends", default="cusparselt,cutlass")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b != "cusparselt" or torch.backends.cusparselt.is_available()]
    if torch.cuda.get_device_capability()[0] != 8:  # PyTorch's CUTLASS 2:4 kernels are sm8x-only
        backends = [b for b in backends if b != "cutlass"]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = [r for n, k in SHAPES for r in bench_shape(n, k, backends)]
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_s": round(time.time() - t0, 1),
            "protocol": "CUDA graph over rotated weight copies >= 240 MB, do_bench median; *_flush_us: do_bench "
                        "with L2 flush, one launch per sample"}
    (args.out / "sparse24.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = f"{meta}\n\n" + markdown(rows, backends)
    (args.out / "sparse24.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
