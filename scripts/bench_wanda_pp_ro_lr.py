"""Wanda++ regional optimization (RO) per learning rate, on one decoder block of the demo model.

The block's dense outputs on calibration windows are the target; its linears are 2:4-pruned with
Wanda's score; then 5 rounds of RMSprop steps on the summed squared error over the training windows,
with the mask held (as `effllm_tools.methods.prune.regional.regional_optimize` does). Reported: the
squared error on held-out windows before and after, per learning rate. fp32, CPU is fine:

    python scripts/bench_wanda_pp_ro_lr.py --layer 5 --lrs 0,3e-7,3e-6,1e-5,3e-5,1e-4
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def capture_block_inputs(model: Any, layer: torch.nn.Module, windows: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) of ``layer`` for every window, from a dense forward stopped there."""
    caps: list[tuple[torch.Tensor, dict]] = []

    class _Stop(Exception):
        pass

    def pre(_mod: Any, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs["hidden_states"]
        caps.append((hs.detach(), {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}))
        raise _Stop

    hook = layer.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        for row in windows:
            try:
                model(row[None], use_cache=False)
            except _Stop:
                pass
    hook.remove()
    return caps


def call(block: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def main() -> None:
    from effllm_tools.data.calibration import tokenize_text
    from effllm_tools.data.sources import load_text
    from effllm_tools.io.load import load_model
    from effllm_tools.methods.prune.algorithm import parse_sparsity, prune_mask, wanda_scores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--windows", type=int, default=40, help="calib-mix windows: all but 8 train, 8 held out")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lrs", default="0,3e-7,3e-6,1e-5,3e-5,1e-4")
    args = ap.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model = loaded.model.eval()
    ids = tokenize_text(loaded.tokenizer, load_text("calib-mix").text)[: args.windows * args.seqlen]
    layer = model.model.layers[args.layer]
    caps = capture_block_inputs(model, layer, ids.reshape(args.windows, args.seqlen))
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    norms = {n: torch.zeros(m.in_features) for n, m in linears.items()}

    def add_norm(name: str) -> Any:
        def hook(_mod: Any, a: tuple) -> None:
            norms[name].add_(a[0].reshape(-1, a[0].shape[-1]).pow(2).sum(0))
        return hook

    hooks = [m.register_forward_pre_hook(add_norm(n)) for n, m in linears.items()]
    with torch.no_grad():
        dense = [call(layer, x, kw) for x, kw in caps]
    for h in hooks:
        h.remove()
    pattern = parse_sparsity(args.sparsity)
    masks = {n: prune_mask(wanda_scores(m.weight.data, norms[n]), pattern) for n, m in linears.items()}
    train, held = range(args.windows - 8), range(args.windows - 8, args.windows)

    def held_error(block: torch.nn.Module) -> float:
        with torch.no_grad():
            return sum(float((call(block, *caps[i]) - dense[i]).pow(2).sum()) for i in held)

    for lr in (float(x) for x in args.lrs.split(",")):
        block = copy.deepcopy(layer)
        lin = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        with torch.no_grad():
            for n, m in lin.items():
                m.weight[masks[n]] = 0
        before = held_error(block)
        if lr:
            for p in block.parameters():
                p.requires_grad_(False)
            params = [m.weight.requires_grad_(True) for m in lin.values()]
            opt = torch.optim.RMSprop(params, lr=lr)
            for _ in range(args.rounds):
                for i in train:
                    opt.zero_grad()
                    (call(block, *caps[i]) - dense[i]).pow(2).sum().backward()
                    for n, m in lin.items():
                        m.weight.grad[masks[n]] = 0
                    opt.step()
                    with torch.no_grad():
                        for n, m in lin.items():
                            m.weight[masks[n]] = 0
        after = held_error(block)
        print(f"| {args.layer} | {lr:g} | {before:.4g} | {after:.4g} | {100 * (after / before - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
