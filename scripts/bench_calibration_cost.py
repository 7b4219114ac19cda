"""Calibration cost of one registered method on a Llama-3-8B-shaped model with random weights.

Builds a LlamaForCausalLM with Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads,
vocab 128256; ``--layers N`` builds only N decoder layers and extrapolates the per-layer time to
32, saying so), random calibration token ids (default 128 x 2048), and runs the method through the
same code path as the CLI: a one-stage recipe parsed and validated, a runner ``StageContext``, the
method's ``apply``. Reports wall time and ``torch.cuda.max_memory_allocated`` as JSON and a markdown
row. The method is a parameter (wanda, wanda++, gptq, spqr, ... any registered name).

    python scripts/bench_calibration_cost.py --method wanda++ --layers 4 --out OUT_DIR [--set key=value]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

FULL_LAYERS = 32


SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024),  # CPU smoke tests of this script only
}


def build_model(layers: int, dtype: torch.dtype, seed: int, shape: str = "llama3-8b", device: str = "cpu"):
    """Llama-3-8B shapes, ``layers`` decoder layers, weights ~ N(0, 0.02) (built on meta, filled in place
    on ``device``: a full-size model is filled on the GPU in seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its inv_freq buffer was on meta
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device=device).mul_(0.02).to(dtype))
    return model.eval()


class _Calibration:
    def __init__(self, ids: torch.Tensor) -> None:
        self.input_ids = ids
        self.meta = {"n_samples": ids.shape[0], "seqlen": ids.shape[1], "starts": []}
        self.sha256 = "random"


def run(method: str, layers: int, nsamples: int, seqlen: int, device: str, sets: list[str], seed: int,
        shape: str = "llama3-8b") -> dict:
    from effllm_tools.io.load import LoadedModel, ModelSource
    from effllm_tools.pipeline.arch import get_arch
    from effllm_tools.recipe import apply_override, parse_recipe
    from effllm_tools.reporting import Reporter
    from effllm_tools.runner import StageContext, layers_prefix_of, seed_everything

    raw = {"version": 1, "model": "random-llama3-8b-shape", "seed": seed, "stages": [{"method": method}],
           "calibration": {"nsamples": nsamples, "seqlen": seqlen}, "output": {"path": "unused"}}
    for item in sets:
        apply_override(raw, item)
    recipe = parse_recipe(raw, source="bench")  # validates the method and its keys like the CLI
    seed_everything(seed)
    t = time.perf_counter()
    model = build_model(layers, torch.bfloat16, seed, shape)
    build_s = time.perf_counter() - t
    ids = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))
    arch = get_arch(model.config)
    loaded = LoadedModel(model, None, ModelSource("random", "demo", None))
    ctx = StageContext(loaded, recipe, device, Reporter(), layers_prefix_of(model, arch), arch)
    ctx._calibration = _Calibration(ids)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stage = recipe.stages[0]
    t = time.perf_counter()
    result = stage.spec.apply(ctx, stage.config)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    per_layer = wall / layers
    return {
        "method": method, "shape": shape, "config": stage.to_dict(), "layers_built": layers, "nsamples": nsamples, "seqlen": seqlen,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "build_s": round(build_s, 1),
        "wall_s": round(wall, 2), "per_layer_s": round(per_layer, 3),
        "extrapolated_32_layers_s": round(per_layer * FULL_LAYERS, 1),
        "extrapolated": layers != FULL_LAYERS, "peak_gpu_gib": round(peak, 2) if peak is not None else None,
        "metrics": {k: v for k, v in result.metrics.items() if not isinstance(v, list)},
    }


def markdown_row(r: dict) -> str:
    note = f"{r['layers_built']} layers, x{FULL_LAYERS}/{r['layers_built']}" if r["extrapolated"] else "full 32 layers"
    keys = {k: v for k, v in r["config"].items() if k not in ("method", "ignore")}
    return (f"| {r['method']} {keys} | {r['nsamples']}x{r['seqlen']} | {r['wall_s']:.1f} s ({note}) | "
            f"{r['per_layer_s']:.2f} s | **{r['extrapolated_32_layers_s'] / 60:.1f} min** | {r['peak_gpu_gib']} GiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--layers", type=int, default=FULL_LAYERS)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="stage key override, e.g. wanda++.ro_rounds=0")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    args = ap.parse_args()
    r = run(args.method, args.layers, args.nsamples, args.seqlen, args.device, args.sets, args.seed, args.shape)
    row = markdown_row(r)
    print(json.dumps(r))
    print("| method | calibration | wall | per layer | 32 layers | peak GPU |\n|---|---|---|---|---|---|\n" + row)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = args.method + "".join("_" + s.split(".")[-1].replace("=", "") for s in args.sets)
        (args.out / f"cost_{tag}.json").write_text(json.dumps(r, indent=1))
        (args.out / f"cost_{tag}.md").write_text(row + "\n")


if __name__ == "__main__":
    main()
