#!/usr/bin/env python
"""End-to-end decode speed of a Llama-3-8B-shaped model (batch 1 unless ``--batch``): bf16 versus SpQR-packed.

The model (hidden 4096, MLP 14336, 32 heads, 8 KV heads, 32 layers, vocab 128256) is built directly
on the GPU in bf16 with random weights (no calibration). The SpQR model is the same model with
every decoder linear swapped for :class:`SpQRLinear` (the module checkpoints load into, repacked
for the kernels on CUDA), a random 3/3/16/16 layer with ~1% outliers and an act-order permutation
(``effllm_kernels.spqr.testing``), calling ``spqr_linear``; the bf16
weights are freed. Both run through transformers ``generate`` (greedy, a fixed number of new
tokens): ``compiled`` = static cache, which makes ``generate`` torch.compile the decode step
(mode reduce-overhead: CUDA graphs), and ``eager`` = the default dynamic cache. Reports tokens/s
(new tokens x batch / wall time of the timed generate call, prefill of the short prompt included; the
first call, with compilation, is a warm-up), the median time of one decode step (from per-step
timestamps: without the prefill and ``generate``'s set-up), the time to the first token (prefill of
``--prompt`` tokens plus set-up: at 128+ tokens the SpQR linears take the dequantize path), the weights'
memory and the peak memory.

    python scripts/bench_spqr_decode.py [--new-tokens 128] [--modes eager,compiled] [--layers 32] [--profile]
    python scripts/bench_spqr_decode.py --prompt 2048 --new-tokens 16 --modes compiled --compare-fused-prefill
    python scripts/bench_spqr_decode.py --batch 4 --new-tokens 32 --modes compiled --compare-triton-mma
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import transformers
import triton
from torch import nn

from effllm_kernels.spqr.testing import random_spqr_tensors
from effllm_tools.methods.spqr.format import SpQRLinear


def build_model(layers: int) -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def to_spqr(model: nn.Module, outliers: float) -> int:
    """Swap every decoder nn.Linear for a random SpQRLinear of its shape; returns the count."""
    swapped = 0
    for li, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    t = random_spqr_tensors(child.out_features, child.in_features, 3, 16, 3, 16, outliers, True,
                                            seed=1000 * li + swapped, device="cuda")
                    # the module effllm loads checkpoints into: repacked for the kernels on CUDA
                    setattr(parent, name, SpQRLinear.from_tensors(t).to("cuda"))
                    swapped += 1
    torch.cuda.empty_cache()
    return swapped


class StepClock(transformers.LogitsProcessor):
    """Records the time of every generation step (after a device synchronisation: ``generate`` syncs
    each step anyway to check its stopping criteria), so decode steps are timed without the prefill."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores

    def step_ms(self) -> float:
        """Median interval between consecutive calls: N new tokens give N timestamps (the first right
        after the prefill) and N - 1 decode steps; NaN for fewer than two tokens."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return 1000 * statistics.median(gaps) if gaps else float("nan")


def generate_kwargs(new: int, mode: str) -> dict:
    """``generate`` arguments for exactly ``new`` greedy tokens; "compiled": a static cache (the decode
    step compiled, CUDA graphs)."""
    kw: dict = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if mode == "compiled":
        kw["cache_implementation"] = "static"
    return kw


def timed_generate(model: nn.Module, ids: torch.Tensor, new: int, mode: str) -> tuple[float, float, float]:
    """(tokens/s of the whole generate call, median ms of one decode step, ms from the call to the first
    token: the prefill of the prompt plus ``generate``'s set-up)."""
    kw = generate_kwargs(new, mode)
    model.generate(ids, **kw)  # warm-up (compilation and graph capture for "compiled")
    if mode == "compiled":
        model.generate(ids, **kw)
    clock = StepClock()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, logits_processor=transformers.LogitsProcessorList([clock]), **kw)
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new
    return new * ids.shape[0] / (time.perf_counter() - t0), clock.step_ms(), 1000 * (clock.times[0] - t0)


def run(model: nn.Module, label: str, args: argparse.Namespace, rows: list[str]) -> None:
    weights = torch.cuda.memory_allocated() / 2**30
    ids = torch.randint(0, 128256, (args.batch, args.prompt), device="cuda")
    for mode in args.modes.split(","):
        torch.cuda.reset_peak_memory_stats()
        tps, step, first = timed_generate(model, ids, args.new_tokens if mode == "compiled" else args.eager_tokens,
                                          mode)
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append(f"| {label} | {mode} | {tps:.1f} | {step:.2f} | {1000 / step:.1f} | {first:.1f} | {weights:.2f} "
                    f"| {peak:.2f} |")
        print(rows[-1], flush=True)
        if args.profile and mode == "compiled":
            profile(model, ids, label)


def profile(model: nn.Module, ids: torch.Tensor, label: str) -> None:
    """GPU time per kernel over 8 compiled decode steps (graph replays included), top 12: where a
    decode step goes beyond the linears."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **generate_kwargs(9, "compiled"))
        torch.cuda.synchronize()
    print(f"\n{label}: GPU time over one generate of 9 tokens (prefill + 8 decode steps)", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)


def reset_compiled(model) -> None:
    """Drop the last run's static cache and compiled step, so the next run compiles afresh."""
    for attr in ("_cache", "_compiled_call"):
        if hasattr(model, attr):
            delattr(model, attr)
    torch._dynamo.reset()


def run_without(kernel_module, model: nn.Module, label: str, args: argparse.Namespace, rows: list[str]) -> None:
    """:func:`run` with one CUDA kernel's launch heuristic (``kernel_module.heuristic``) declining every
    layer, so the kernels it replaced serve; restored afterwards."""
    from effllm_kernels.spqr import launch

    heuristic = kernel_module.heuristic
    kernel_module.heuristic = lambda t, m, sms: None
    launch._cached_config.cache_clear()
    try:
        reset_compiled(model)
        run(model, label, args, rows)
    finally:
        kernel_module.heuristic = heuristic
        launch._cached_config.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (rows per decode-step linear)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--eager-tokens", type=int, default=32)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--outliers", type=float, default=0.01)
    ap.add_argument("--profile", action="store_true", help="print GPU time per kernel of a compiled generate")
    ap.add_argument("--compare-triton-gemv", action="store_true",
                    help="also run the SpQR model with the Triton GEMV at M <= 3 (the CUDA GEMV switched off)")
    ap.add_argument("--compare-triton-mma", action="store_true",
                    help="also run the SpQR model with the CUDA tensor-core kernel switched off (the Triton kernels)")
    ap.add_argument("--compare-fused-prefill", action="store_true",
                    help="also run the SpQR model with the prefill on the fused kernels (no dequantize path)")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    head = (f"- GPU: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton "
            f"{triton.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}\n"
            f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; Llama-3-8B shape, "
            f"{args.layers} layers, random bf16 weights; batch {args.batch}, prompt {args.prompt}, "
            f"{args.new_tokens} new tokens compiled / {args.eager_tokens} eager, greedy\n")
    print(head, flush=True)
    rows: list[str] = []
    model = build_model(args.layers)
    run(model, "bf16", args, rows)
    reset_compiled(model)  # the bf16 run's static cache and compiled step
    n = to_spqr(model, args.outliers)
    label = f"SpQR 3/3/16/16, {args.outliers:.0%} outliers ({n} linears)"
    run(model, label, args, rows)
    from effllm_kernels.spqr import cuda_gemv, cuda_mma

    if args.compare_triton_gemv:  # the same model, decode on the Triton GEMV (the CUDA GEMV's fallback)
        run_without(cuda_gemv, model, label + ", Triton GEMV", args, rows)
    if args.compare_triton_mma:  # the same model with the CUDA tensor-core kernel switched off (what served before)
        run_without(cuda_mma, model, label + ", CUDA tensor-core kernel off", args, rows)
    if args.compare_fused_prefill:  # every M on the fused kernels: what prefill cost before the dequantize path
        from effllm_kernels.spqr import launch

        launch.DEQUANT_MIN_M = 1 << 30
        launch._cached_config.cache_clear()
        reset_compiled(model)
        run(model, label + ", prefill on the fused kernels", args, rows)
    text = head + "\n| model | generate | tokens/s (whole call) | decode step ms (median) | decode steps/s | " \
        f"first token ms (prompt {args.prompt}) | memory after load GiB | peak GiB |\n|---|---|---|---|---|---|---|---|\n" \
        + "\n".join(rows) + "\n"
    print("\n" + text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_spqr_decode.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
