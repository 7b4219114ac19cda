"""Long-context table: base, PI, NTK, YaRN, LongRoPE v1 and LongRoPE2 on the demo model, no fine-tuning.

For each method: extend the model to ``--target`` through effllm's own recipe runner (the searches
with the budget given here), reload the written checkpoint as a user would, and measure
- perplexity on long windows of *Pride and Prejudice* (PG19-style: the book as one token stream, cut
  into non-overlapping windows of each length, the same ``--ppl-tokens`` tokens at every length);
- passkey retrieval accuracy (``effllm_tools.eval.passkey``) over lengths and depths, a length counting
  the prompt and the generated answer;
- whether logits on a short window equal the base model's (up to the original window LongRoPE's
  short factors are plain RoPE; with attention factor 1 the model is exactly unchanged there).
Writes ``results.json`` and ``table.md`` to ``--out``.

    python scripts/bench_longrope.py --device cuda --out out/bench-longrope            # ~5 min on an H200
    python scripts/bench_longrope.py --device cpu --model TINY --target 1024 --lengths 256,512,1024 \\
        --passkey-lengths 512,1024 --search-population 4 --search-iterations 2 --out /tmp/b   # smoke test
    python scripts/bench_longrope.py --time-one-eval --device cpu     # CPU cost of one search candidate

The search budget is far below the official one (population 64, 40 iterations): ``--search-*``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("base", "pi", "ntk", "yarn", "longrope", "longrope2", "longrope2-af1", "longrope2-none")
# Rows that run a method with other stage keys: longrope2-none searches *under* attention factor 1,
# so the model is exactly the base model up to the original window (longrope2-af1 only resets the
# factor of the factors found under the su rule); the -mixed rows score 4 search documents, two at
# half the target length and two at the target (``eval_length`` as a list). ``longrope2`` is the method's
# default search (and the recipe's since 2026-12-07): six documents, four of half the target and two of
# the target, as ``longrope2-mixed16``; ``longrope2-target`` is the earlier default (documents of the target
# length, --search-samples of them).
MIXED = {"eval_length": ["half", "target"], "samples": 4}
VARIANTS = {"longrope2": ("longrope2", {"samples": 6}),
            "longrope2-target": ("longrope2", {"eval_length": ["target"]}),
            "longrope2-none": ("longrope2", {"mscale": "none"}),
            "longrope2-mixed": ("longrope2", MIXED),
            "longrope2-none-mixed": ("longrope2", {"mscale": "none", **MIXED}),
            # extra flat starts above s (init_scales): the released LLaMA3-8B factors sit 1.4-1.6x above s
            "longrope2-mixed-lift": ("longrope2", {"init_scales": [1.2, 1.4, 1.6], **MIXED}),
            # twice as many 16k documents as 32k ones (the 16k bar is the one missed)
            "longrope2-mixed16": ("longrope2", {"eval_length": ["half", "half", "target"], "samples": 6}),
            # the same with YaRN's attention factor (0.1 ln s + 1): YaRN leads the 32k passkey column
            "longrope2-mixed16-yarn": ("longrope2", {"eval_length": ["half", "half", "target"], "samples": 6,
                                                     "mscale": "yarn"})}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--target", type=int, default=32768)
    ap.add_argument("--lengths", default="2048,8192,16384,32768", help="PPL window lengths")
    ap.add_argument("--ppl-dataset", default="austen-prideprejudice")
    ap.add_argument("--ppl-tokens", type=int, default=131072, help="tokens evaluated at every length")
    ap.add_argument("--passkey-lengths", default="8192,16384,32768")
    ap.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--passkey-trials", type=int, default=2)
    ap.add_argument("--search-population", type=int, default=16)
    ap.add_argument("--search-iterations", type=int, default=8)
    ap.add_argument("--search-samples", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-minutes", type=float, default=30.0, help="skip what would start after this")
    ap.add_argument("--time-one-eval", action="store_true", help="time one LongRoPE2 candidate evaluation, exit")
    ap.add_argument("--shape", default=None, help="with --time-one-eval: a random-weight model of this shape "
                    "(scripts/bench_calibration_cost.py SHAPES, e.g. llama3-8b, 32 layers) instead of --model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/bench-longrope")
    return ap.parse_args()


def search_keys(args: argparse.Namespace) -> dict[str, Any]:
    pop = args.search_population
    return {"population": pop, "iterations": args.search_iterations, "mutations": max(1, pop // 4),
            "crossovers": max(1, pop // 4), "parents": max(2, pop // 2), "samples": args.search_samples}


def extend(args: argparse.Namespace, method: str, out: Path) -> dict[str, Any]:
    from effllm_tools.recipe import parse_recipe
    from effllm_tools.runner import run_recipe

    method, extra = VARIANTS.get(method, (method, {}))
    stage: dict[str, Any] = {"method": method, "target_length": args.target}
    if method in ("longrope", "longrope2"):
        stage.update(search_keys(args))
    stage.update(extra)
    if "eval_length" in extra:
        stage["eval_length"] = [args.target // 2 if n == "half" else args.target for n in extra["eval_length"]]
    raw = {"version": 1, "model": args.model, "seed": args.seed, "stages": [stage],
           "output": {"path": str(out), "overwrite": True}}
    res = run_recipe(parse_recipe(raw, source="bench"), device=args.device, dtype=args.dtype)
    return res["metrics"]


@torch.inference_mode()
def ppl_at(model: Any, ids: torch.Tensor, length: int, tokens: int, device: str) -> float:
    from effllm_tools.data.calibration import eval_windows
    from effllm_tools.eval.ppl import evaluate_ppl

    windows = eval_windows(ids, length, max(tokens, length))
    return evaluate_ppl(model, windows, device=device).ppl


def evaluate(args: argparse.Namespace, model: Any, tok: Any, ids: torch.Tensor, base_logits: torch.Tensor,
             device: str) -> dict[str, Any]:
    from effllm_tools.data.needles import load_haystack
    from effllm_tools.eval.passkey import DEFAULT_HAYSTACK, passkey_trials, summarize

    row: dict[str, Any] = {"ppl": {}, "passkey": {}}
    for n in [int(x) for x in args.lengths.split(",")]:
        row["ppl"][str(n)] = ppl_at(model, ids, n, args.ppl_tokens, device)
    hay = load_haystack(tok, DEFAULT_HAYSTACK)
    recs = passkey_trials(model, hay, lengths=[int(x) for x in args.passkey_lengths.split(",")],
                          depths=[float(x) for x in args.passkey_depths.split(",")], trials=args.passkey_trials,
                          seed=args.seed, device=device)
    row["passkey"] = summarize(recs)["accuracy_by_length"]
    with torch.inference_mode():
        short = model(input_ids=ids[None, :base_logits.shape[1]].to(device), use_cache=False).logits.float().cpu()
    row["short_max_abs_logit_diff"] = float((short - base_logits).abs().max())
    return row


def time_one_eval(args: argparse.Namespace) -> None:
    """The CPU (or GPU) cost of one LongRoPE2 candidate: one needle document of ``--target`` tokens."""
    import random

    from effllm_tools.data.needles import load_haystack
    from effllm_tools.io.load import load_model
    from effllm_tools.methods.longrope import rope
    from effllm_tools.methods.longrope.install import installed_rope
    from effllm_tools.methods.longrope.objective import answer_nll, needle_document
    from effllm_tools.runner import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.model, device="cpu" if args.shape else device, dtype=args.dtype)
    model = loaded.model
    if args.shape:  # the demo's tokenizer feeds a random model of a real shape (timing only)
        from bench_calibration_cost import FULL_LAYERS, build_model

        model = build_model(FULL_LAYERS, getattr(torch, args.dtype), args.seed, args.shape, device=device)
    hay = load_haystack(loaded.tokenizer, "austen-emma")
    doc = needle_document(hay, args.target, 3, random.Random(0))
    base, dim = rope.rope_base_and_dim(model.config)
    orig = model.config.max_position_embeddings
    s = args.target / orig
    times, nll = [], float("nan")
    with installed_rope(model, rope.ntk_factors(s, dim), rope.su_mscale(s, orig)):
        for _ in range(2 if device.startswith("cuda") else 1):  # on CUDA the first call also warms up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            nll = answer_nll(model, [doc], device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    dt = times[-1]
    full = 64 + 40 * 32  # official budget: initial population + 40 iterations x (16 mutations + 16 crossovers)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    print(json.dumps({"device": device, "dtype": args.dtype, "threads": torch.get_num_threads(), "tokens": args.target,
                      "model": args.shape or args.model, "original_window": orig, "times_s": times,
                      "peak_gib": peak, "one_document_s": dt, "answer_nll": nll, "full_search_evaluations": full,
                      "full_search_hours_4_documents": dt * 4 * full / 3600}))


def main() -> None:
    args = parse_args()
    if args.time_one_eval:
        return time_one_eval(args)
    from effllm_tools.data.calibration import tokenize_text
    from effllm_tools.data.sources import load_text
    from effllm_tools.io.load import load_model
    from effllm_tools.methods.longrope.install import rotary_slots
    from effllm_tools.runner import resolve_device

    device = resolve_device(args.device)
    args.device = device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = load_model(args.model, device=device, dtype=args.dtype)
    ids = tokenize_text(base.tokenizer, load_text(args.ppl_dataset).text)
    with torch.inference_mode():
        short_len = min(2048, base.model.config.max_position_embeddings)  # inside the original window
        base_logits = base.model(input_ids=ids[None, :short_len].to(device), use_cache=False).logits.float().cpu()
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()}, "rows": {}}
    results["settings"]["search"] = search_keys(args)
    results["settings"]["gpu"] = torch.cuda.get_device_name() if device.startswith("cuda") else None
    for method in args.methods.split(","):
        if (time.perf_counter() - t_start) / 60 > args.max_minutes:
            results["rows"][method] = {"skipped": f"--max-minutes {args.max_minutes} reached"}
            continue
        t0 = time.perf_counter()
        ckpt = out / "ckpt" / (method if method in VARIANTS else method.removesuffix("-af1"))
        metrics: dict[str, Any] = {}
        if method == "base":
            model = base.model
        else:
            if not (method == "longrope2-af1" and ckpt.is_dir()):
                metrics = extend(args, method if method in VARIANTS else method.removesuffix("-af1"), ckpt)
            model = load_model(str(ckpt), device=device, dtype=args.dtype).model
            if method == "longrope2-af1":  # same factors, attention factor 1: exactly the base model <= 8k
                for module, _, attr in rotary_slots(model):
                    setattr(module, attr, 1.0)
        row = evaluate(args, model, base.tokenizer, ids, base_logits, device)
        row["search_s"] = metrics.get("search_s")
        row["search_curve_ppl"] = metrics.get("search_curve_ppl")
        row["attention_factor"] = 1.0 if method in ("longrope2-af1", "base") else metrics.get("attention_factor")
        row["critical_dim"] = metrics.get("critical_dim")
        row["long_factor"] = metrics.get("long_factor")
        row["wall_s"] = time.perf_counter() - t0
        results["rows"][method] = row
        print(method, json.dumps({k: row[k] for k in ("ppl", "passkey", "search_s", "wall_s")}), flush=True)
        if method != "base":
            del model
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(render(results))
    print(render(results))
    shutil.rmtree(out / "ckpt", ignore_errors=True)


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lengths = s["lengths"].split(",")
    pk = s["passkey_lengths"].split(",")
    head = (["method"] + [f"PPL {int(n) / 1024:g}k" for n in lengths] + [f"passkey {int(n) / 1024:g}k" for n in pk]
            + ["short logits = base", "attn factor", "search s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in results["rows"].items():
        if "skipped" in row:
            lines.append(f"| {method} | skipped: {row['skipped']} |")
            continue
        cells = [method] + [f"{row['ppl'][n]:.3f}" if math.isfinite(row["ppl"][n]) else "inf" for n in lengths]
        cells += [f"{row['passkey'].get(n, float('nan')):.2f}" for n in pk]
        cells += ["yes" if row["short_max_abs_logit_diff"] == 0 else f"no ({row['short_max_abs_logit_diff']:.2g})",
                  f"{row['attention_factor']:.4f}" if row["attention_factor"] else "-",
                  f"{row['search_s']:.1f}" if row["search_s"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"search budget: {s['search']}; dtype {s['dtype']}; device {s['device']} {s.get('gpu') or ''}; "
                 f"PPL text {s['ppl_dataset']}, {s['ppl_tokens']} tokens per length")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
