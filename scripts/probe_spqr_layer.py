"""SpQR / GPTQ settings compared on one decoder block of the demo model, in minutes on the CPU.

A model-wide quality row of SpQR takes ~40 min on this CPU; this probe ranks settings first. The
block's seven linears get Hessians ``X^T X`` from dense calib-mix windows (not true-sequential), each
setting quantizes every linear (`spqr_quantize` / `gptq_quantize`, the methods' own cores), and the
probe reports the average bits (exact, from the stored tensors for SpQR; ``bits + 32/group`` for GPTQ
with fp16 scale and zero) and the block's squared output error on held-out windows relative to the
dense output (all linears quantized at once):

    python scripts/probe_spqr_layer.py --layer 5 \\
        --setting gptq4g64:method=gptq,bits=4,group_size=64 --setting spqr:method=spqr \\
        --setting spqr-pd0.01:method=spqr,percdamp=0.01
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_wanda_pp_ro_lr import call, capture_block_inputs  # noqa: E402 (scripts/ helper)


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    name, _, body = text.partition(":")
    keys = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in body.split(",") if item)}
    return name, keys


def quantize(w: torch.Tensor, h: torch.Tensor, keys: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(dequantized weight, average bits) of one linear under one setting."""
    from effllm_tools.methods.gptq.algorithm import gptq_quantize
    from effllm_tools.methods.spqr.algorithm import spqr_quantize

    keys = dict(keys)
    method = keys.pop("method")
    if method == "spqr":
        res = spqr_quantize(w, h, **keys)
        return res.weight, res.tensors.average_bits()
    bits, group = keys.pop("bits", 4), keys.pop("group_size", 128)
    res = gptq_quantize(w, h, bits, group, **keys)
    return res.dequantized(group if 0 < group <= w.shape[1] else w.shape[1]), bits + 32 / min(group, w.shape[1])


def main() -> None:
    from effllm_tools.data.calibration import tokenize_text
    from effllm_tools.data.sources import load_text
    from effllm_tools.io.load import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--windows", type=int, default=40, help="calib-mix windows: all but 8 for the Hessians, 8 held out")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--setting", action="append", required=True, help="NAME:method=spqr|gptq,KEY=VALUE,...")
    args = ap.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model = loaded.model.float().eval()
    ids = tokenize_text(loaded.tokenizer, load_text("calib-mix").text)[: args.windows * args.seqlen]
    layer = model.model.layers[args.layer]
    caps = capture_block_inputs(model, layer, ids.reshape(args.windows, args.seqlen))
    train, held = caps[:-8], caps[-8:]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    hess = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}

    def add(name: str) -> Any:
        def hook(_mod: Any, a: tuple) -> None:
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            hess[name].add_(x.T @ x)
        return hook

    hooks = [m.register_forward_pre_hook(add(n)) for n, m in linears.items()]
    with torch.no_grad():
        for x, kw in train:
            call(layer, x, kw)
    for hk in hooks:
        hk.remove()
    with torch.no_grad():
        dense = [call(layer, x, kw) for x, kw in held]
    ref = sum(float(y.pow(2).sum()) for y in dense)
    original = {n: m.weight.data.clone() for n, m in linears.items()}
    print(f"layer {args.layer}: {len(train)} x {args.seqlen} tokens for the Hessians, {len(held)} held out")
    print("| setting | avg bits | held-out block error / ||y||^2 | s |")
    print("|---|---|---|---|")
    for text in args.setting:
        name, keys = parse_setting(text)
        t0 = time.perf_counter()
        bits_num = 0.0
        for n, m in linears.items():
            w_hat, bits = quantize(original[n], (2 * hess[n]).float(), keys)
            m.weight.data.copy_(w_hat.to(m.weight.dtype))
            bits_num += bits * original[n].numel()
        with torch.no_grad():
            err = sum(float((call(layer, x, kw) - y).pow(2).sum()) for (x, kw), y in zip(held, dense, strict=True))
        total = sum(w.numel() for w in original.values())
        print(f"| {name} | {bits_num / total:.3f} | {err / ref:.4e} | {time.perf_counter() - t0:.0f} |", flush=True)
        for n, m in linears.items():
            m.weight.data.copy_(original[n])


if __name__ == "__main__":
    main()
