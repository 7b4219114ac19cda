"""Quality tables on the real demo model in one process: each row is a recipe run, then eval-ppl.

Every row goes through the same library calls as ``effllm run`` and ``effllm eval-ppl --kld-base``
(`effllm_tools.runner.run_recipe`, `effllm_tools.eval.run.run_eval_ppl`): the recipe is written,
the checkpoint reloaded from disk as a user would and evaluated on Pride and Prejudice (in domain)
and the Python docs (out of domain), PPL and KL(base || row) per predicted token. One process keeps
the start-up cost off the GPU machine's clock.

    python scripts/bench_quality.py --suite quant --device cuda --out out/bench-quality
    python scripts/bench_quality.py --suite prune --device cuda --out out/bench-quality
    python scripts/bench_quality.py --suite prune --rows wanda-2of4 --device cpu    # one row

Suites (rows are named ``<method>-<setting>``):
- ``quant``: rtn and gptq at 3 bits g16 / g64 and 4 bits g64 (asymmetric, fp16 statistics),
  SpQR from ``recipes/spqr-3bit.yaml`` (about 3.6 bits) and ``recipes/spqr-4bit.yaml`` (about 4.6).
- ``prune``: magnitude, wanda, wanda++ with the gradient score only (RO off) and with regional
  optimization, at 50% unstructured, 2:4 and 4:8.
Calibration (calibrated methods): ``calib-mix`` (Emma + Mansfield Park + Python docs; Pride and
Prejudice is never seen), ``--nsamples`` x ``--calib-seqlen`` tokens, seed 0. Writes
``<out>/<suite>.md`` and ``<out>/<suite>.json`` after every row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVAL_SETS = ("austen-prideprejudice", "pydocs")


def _recipe_stage(name: str) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    return dict(raw["stages"][0])


def quant_rows() -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for method in ("rtn", "gptq"):
        for bits, group in ((3, 16), (3, 64), (4, 64)):
            rows[f"{method}-w{bits}g{group}"] = [{"method": method, "bits": bits, "group_size": group}]
    rows["spqr-3bit"] = [_recipe_stage("spqr-3bit")]
    rows["spqr-4bit"] = [_recipe_stage("spqr-4bit")]
    return rows


def prune_rows() -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for pattern in ("0.5", "2:4", "4:8"):
        tag = pattern.replace(":", "of")
        rows[f"magnitude-{tag}"] = [{"method": "magnitude", "sparsity": pattern}]
        rows[f"wanda-{tag}"] = [{"method": "wanda", "sparsity": pattern}]
        rows[f"wanda++grad-{tag}"] = [{"method": "wanda++", "sparsity": pattern, "ro_enabled": False}]
        rows[f"wanda++-{tag}"] = [{"method": "wanda++", "sparsity": pattern}]
    return rows


SUITES = {"quant": quant_rows, "prune": prune_rows}


def _with_sets(stage: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """The stage with each ``KEY=VALUE`` of ``--set`` whose key its method has."""
    from effllm_tools.registry import get_method

    keys = get_method(stage["method"]).keys()
    out = dict(stage)
    for item in sets:
        key, _, value = item.partition("=")
        if key in keys:
            out[key] = yaml.safe_load(value)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--rows", default="", help="comma-separated row names (default: the whole suite)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=20480)
    ap.add_argument("--eval-dtype", default="float32")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="start no row after this")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="KEY=VALUE (YAML) added to every stage of the chosen rows that has KEY, e.g. ro_lr=1e-4")
    ap.add_argument("--out", default="out/bench-quality")
    args = ap.parse_args()
    args.texts = {}
    return args


def eval_texts(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """The head of each evaluation text as a local file: the first ``--max-tokens`` tokens are the
    same as the full set's (the cut lies far beyond them), and tokenizing it is instant."""
    from effllm_tools.data.sources import load_text

    paths = {}
    for ds in EVAL_SETS:
        path = out / "eval-text" / f"{ds}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(load_text(ds).text[: args.max_tokens * 12])
        paths[ds] = str(path)
    return paths


def evaluate(args: argparse.Namespace, model: str, base: str | None) -> dict[str, Any]:
    from effllm_tools.eval.run import run_eval_ppl

    res: dict[str, Any] = {}
    for ds in EVAL_SETS:
        r = run_eval_ppl(model, dataset=args.texts[ds], seqlen=args.eval_seqlen, max_tokens=args.max_tokens, kld_base=base,
                         device=args.device, dtype=args.eval_dtype)
        res[ds] = {"ppl": r["metrics"]["ppl"], "kld": r["metrics"].get("kld"),
                   "predicted_tokens": r["settings"]["predicted_tokens"]}
    return res


def run_row(args: argparse.Namespace, name: str, stages: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    from effllm_tools.recipe import parse_recipe
    from effllm_tools.runner import run_recipe

    out = work / name
    raw = {"version": 1, "model": args.model, "seed": 0, "stages": stages,
           "calibration": {"dataset": "calib-mix", "nsamples": args.nsamples, "seqlen": args.calib_seqlen},
           "output": {"path": str(out), "overwrite": True}}
    t = time.perf_counter()
    result = run_recipe(parse_recipe(raw, source=name), device=args.device)
    stage_s = time.perf_counter() - t
    row = {"row": name, "stages": stages, "stage_metrics": result.get("metrics"), "wall_s": stage_s,
           "eval": evaluate(args, str(out), args.model)}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _avg_bits(row: dict[str, Any]) -> str:
    metrics = row.get("stage_metrics") or {}
    for key in ("average_bits", "avg_bits"):
        if isinstance(metrics, dict) and key in metrics:
            return f"{metrics[key]:.3f}"
    return "-"


def render(suite: str, rows: list[dict[str, Any]]) -> str:
    lines = ["| row | avg bits | PPL P&P | KL P&P | PPL pydocs | KL pydocs | run s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = r["eval"]
        cells = []
        for ds in EVAL_SETS:
            kld = ev[ds]["kld"]
            cells += [f"{ev[ds]['ppl']:.3f}", "-" if kld is None else f"{kld:.4f}"]
        bits = _avg_bits(r) if suite == "quant" else "-"
        lines.append(f"| {r['row']} | {bits} | " + " | ".join(cells) + f" | {r.get('wall_s', 0):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "checkpoints"
    rows_def = SUITES[args.suite]()
    wanted = [r for r in args.rows.split(",") if r] or list(rows_def)
    unknown = [r for r in wanted if r not in rows_def]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(rows_def)}")
    rows_def = {name: [_with_sets(stage, args.sets) for stage in rows_def[name]] for name in wanted}
    args.texts = eval_texts(args, out)
    t0 = time.perf_counter()
    results = [{"row": "base", "eval": evaluate(args, args.model, None), "wall_s": 0.0}]
    for name in wanted:
        if (time.perf_counter() - t0) / 60 > args.max_minutes:
            print(f"skipped {name}: past --max-minutes", file=sys.stderr)
            continue
        print(f"row {name} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_row(args, name, rows_def[name], work))
        except Exception as exc:  # keep the table going; the failure is recorded in the JSON
            print(f"row {name} failed: {exc!r}", file=sys.stderr, flush=True)
            results.append({"row": name, "error": repr(exc), "eval": None})
        done = [r for r in results if r.get("eval")]
        (out / f"{args.suite}.md").write_text(render(args.suite, done))
        (out / f"{args.suite}.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    print(render(args.suite, [r for r in results if r.get("eval")]))


if __name__ == "__main__":
    main()
