"""eval-ppl against an independent plain-transformers loop: agreement and speed on the CPU.

    .venv/bin/python scripts/bench_eval_ppl.py --dtype bfloat16 --seqlen 512 --max-tokens 20480

Both sides use the same text (Pride and Prejudice from the offline set) and the same model
directory (the cached demo checkpoint). The plain loop is written here from scratch with
transformers and torch only: tokenizer(text), non-overlapping windows, model(window).logits,
cross-entropy. Order alternates (plain, effllm, plain, effllm) and the faster of two runs counts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time

import torch
import torch.nn.functional as F


def plain_loop(model_dir: str, text: str, seqlen: int, max_tokens: int, dtype: torch.dtype) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ids = torch.tensor(tok(text)["input_ids"][:max_tokens])
    n = ids.numel() // seqlen
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            w = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            logits = model(w).logits
            nll += float(F.cross_entropy(logits[0, :-1].float(), w[0, 1:], reduction="sum"))
            count += seqlen - 1
    dt = time.perf_counter() - t0
    return math.exp(nll / count), n * seqlen / dt


def effllm_eval(seqlen: int, max_tokens: int, dtype: str) -> tuple[float, float]:
    from effllm_tools.eval.run import run_eval_ppl

    res = run_eval_ppl("demo", dataset="austen-prideprejudice", seqlen=seqlen, max_tokens=max_tokens,
                       device="cpu", dtype=dtype)
    return res["metrics"]["ppl"], res["timings"]["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=20480)
    args = ap.parse_args()
    from effllm_tools.data.sources import load_text
    from effllm_tools.io.demo import ensure_demo_checkpoint

    model_dir = str(ensure_demo_checkpoint())
    text = load_text("austen-prideprejudice").text
    dtype = getattr(torch, args.dtype)
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "effllm": []}
    for _ in range(2):
        runs["plain"].append(plain_loop(model_dir, text, args.seqlen, args.max_tokens, dtype))
        runs["effllm"].append(effllm_eval(args.seqlen, args.max_tokens, args.dtype))
    best = {k: (v[0][0], max(t for _, t in v)) for k, v in runs.items()}
    agree = f"{best['plain'][0]:.4g}" == f"{best['effllm'][0]:.4g}"
    print(f"date {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| loop | PPL | tokens/s (best of 2) |\n|---|---|---|")
    for k, (ppl, tps) in best.items():
        print(f"| {k} | {ppl:.6f} | {tps:.0f} |")
    print(json.dumps({"agree_4_significant_digits": agree, "speed_ratio_effllm_over_plain":
                      best["effllm"][1] / best["plain"][1]}))


if __name__ == "__main__":
    main()
