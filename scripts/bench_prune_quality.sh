#!/usr/bin/env bash
# Pruning quality on the real demo model: base, magnitude, Wanda, Wanda++ with the regional-gradient
# score only (RO off) and with regional optimization, at 50% unstructured, 2:4 and 4:8. PPL and KL
# against the base, in-domain (Pride and Prejudice) and out-of-domain (Python docs), fp32, 512-token
# windows, first MAX_TOKENS tokens. Calibration: calib-mix (Austen + Python docs), NSAMPLES x CALIB_SEQLEN.
#
# Usage: bash scripts/bench_prune_quality.sh [--device cuda] [--out DIR] [--model demo] [--nsamples 128]
#            [--calib-seqlen 512] [--max-tokens 20480] [--eval-seqlen 512] [--patterns "0.5 2:4 4:8"] [--methods "..."]
# Prints a markdown table (stdout); logs go to DIR/*.log. EFFLLM="python -m effllm_cli.main" and PY=python
# override the venv's binaries (e.g. on a machine with effllm on PYTHONPATH only).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=auto OUT=out/bench-prune MODEL=demo NSAMPLES=128 CALIB_SEQLEN=512 MAX_TOKENS=20480 EVAL_SEQLEN=512
PATTERNS="0.5 2:4 4:8"
METHODS="magnitude wanda wanda++grad wanda++"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;; --out) OUT=$2; shift 2 ;; --model) MODEL=$2; shift 2 ;;
    --nsamples) NSAMPLES=$2; shift 2 ;; --calib-seqlen) CALIB_SEQLEN=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;; --eval-seqlen) EVAL_SEQLEN=$2; shift 2 ;; --patterns) PATTERNS=$2; shift 2 ;; --methods) METHODS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
E=${EFFLLM:-.venv/bin/effllm}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
EVAL=(--seqlen "$EVAL_SEQLEN" --max-tokens "$MAX_TOKENS" --dtype float32 --device "$DEVICE" --json -q)
CALIB=(--dataset calib-mix --nsamples "$NSAMPLES" --calib-seqlen "$CALIB_SEQLEN" --device "$DEVICE")
DATASETS="austen-prideprejudice pydocs"
field() { $PY -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }

echo "| model | pattern | PPL austen | KL austen | PPL pydocs | KL pydocs | prune stage s |"
echo "|---|---|---|---|---|---|---|"
row="| base (dense) | - "
for ds in $DATASETS; do
  ppl=$($E eval-ppl "$MODEL" --dataset "$ds" "${EVAL[@]}" 2>>"$OUT/eval.log" | field '"%.3f" % d["metrics"]["ppl"]')
  row="$row| $ppl | - "
done
echo "$row| - |"
for pattern in $PATTERNS; do
  for m in $METHODS; do
    case "$m" in
      wanda++grad) method=wanda++; extra=(--set wanda++.ro_enabled=false); label="wanda++ (gradient score, no RO)" ;;
      wanda++) method=wanda++; extra=(); label="wanda++ (RO)" ;;
      *) method=$m; extra=(); label=$m ;;
    esac
    name="$m-${pattern/:/of}"
    [ "$method" = magnitude ] && calib=(--device "$DEVICE") || calib=("${CALIB[@]}")
    secs=$($E prune --method "$method" --sparsity "$pattern" "${extra[@]}" "${calib[@]}" "$MODEL" -o "$OUT/$name" \
           --overwrite --json -q 2>>"$OUT/prune.log" | field '"%.1f" % [v for k, v in d["timings"].items() if k.startswith("stage0")][0]')
    row="| $label | $pattern "
    for ds in $DATASETS; do
      r=$($E eval-ppl "$OUT/$name" --dataset "$ds" --kld-base "$MODEL" "${EVAL[@]}" 2>>"$OUT/eval.log" \
          | field '"%.3f | %.4f" % (d["metrics"]["ppl"], d["metrics"]["kld"])')
      row="$row| $r "
    done
    echo "$row| $secs |"
  done
done
