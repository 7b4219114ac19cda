#!/usr/bin/env bash
# SpQR quality table (issue 3 item 4) on the real demo model: base; RTN and GPTQ at 3 bits g16 and
# g64 and 4 bits g64 (asymmetric, fp16 statistics); SpQR ~3.6 bits (recipes/spqr-3bit.yaml) and
# ~4.6 bits (recipes/spqr-4bit.yaml). Calibration (GPTQ, SpQR): 128 x 512 tokens of Emma + Mansfield
# Park (novels other than the evaluation novel), seed 0. Evaluation: eval-ppl PPL and KL(base || q)
# per token, fp32, first 20,480 tokens in 512-token windows of Pride and Prejudice and the Python docs.
#
# Usage:  DEVICE=cuda bash scripts/bench_spqr_quality.sh [OUT_DIR]      (prints a markdown table)
# Env:    DEVICE (auto|cpu|cuda, default auto)  MODEL (default demo)  CALIB (novels|calib-mix|a path)
#         NSAMPLES (128)  CALIB_SEQLEN (512)  EVAL_SEQLEN (512)  EVAL_TOKENS (20480)
#         ROWS (default "base rtn gptq spqr"; any subset)
#         PYTHON (default .venv/bin/python, else python): runs `-m effllm_cli.main`, so it works where
#         effllm is only on PYTHONPATH (the GPU machine).
# Each run writes OUT_DIR/<name>/ and OUT_DIR/<name>.json (the quantize result); eval results are
# kept in OUT_DIR/<name>.<dataset>.json. Takes ~30 min per calibrated row on the 2-core CPU: use a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
E=("$PY" -m effllm_cli.main)
DEVICE=${DEVICE:-auto}
MODEL=${MODEL:-demo}
OUT=${1:-out/bench-spqr}
CALIB=${CALIB:-novels}
ROWS=${ROWS:-base rtn gptq spqr}
mkdir -p "$OUT"
if [ "$CALIB" = novels ]; then
  CALIB="$OUT/calib-novels"
  mkdir -p "$CALIB"
  "$PY" - "$CALIB" <<'EOF'
import sys
from pathlib import Path

from effllm_tools.data.sources import load_text

for novel in ("emma", "mansfieldpark"):
    Path(sys.argv[1], f"{novel}.txt").write_text(load_text(f"austen-{novel}").text)
EOF
fi
CAL=(--dataset "$CALIB" --nsamples "${NSAMPLES:-128}" --calib-seqlen "${CALIB_SEQLEN:-512}" --seed 0)
CAL_SET=(--set "calibration.dataset=$CALIB" --set "calibration.nsamples=${NSAMPLES:-128}"
         --set "calibration.seqlen=${CALIB_SEQLEN:-512}")
EVAL=(--seqlen "${EVAL_SEQLEN:-512}" --max-tokens "${EVAL_TOKENS:-20480}" --dtype float32 --device "$DEVICE" --json -q)
get() { "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

evaluate() {  # name -> " | ppl | kl | ppl | kl"
  local row=""
  for ds in austen-prideprejudice pydocs; do
    "${E[@]}" eval-ppl "$OUT/$1" --dataset "$ds" --kld-base "$MODEL" "${EVAL[@]}" > "$OUT/$1.$ds.json"
    row="$row | $(get "$OUT/$1.$ds.json" '"%.3f | %.4f" % (d["metrics"]["ppl"], d["metrics"]["kld"])')"
  done
  echo "$row"
}

report() {  # name label -> one table row
  local m='d["metrics"]' t='d["timings"]'
  local bits share secs
  bits=$(get "$OUT/$1.json" "'%.3f' % $m['avg_bits']")
  share=$(get "$OUT/$1.json" "'%.2f%%' % (100 * $m.get('outlier_share', 0))")
  secs=$(get "$OUT/$1.json" "'%.0f' % sum(v for k, v in $t.items() if k.startswith('stage'))")
  echo "| $2 | $bits | $share$(evaluate "$1") | $secs |"
}

echo "| weights | avg bits | outliers | PPL Pride and Prejudice | KL | PPL Python docs | KL | quantize s |"
echo "|---|---|---|---|---|---|---|---|"
if [[ " $ROWS " == *" base "* ]]; then
  r=""
  for ds in austen-prideprejudice pydocs; do
    "${E[@]}" eval-ppl "$MODEL" --dataset "$ds" "${EVAL[@]}" > "$OUT/base.$ds.json"
    r="$r | $(get "$OUT/base.$ds.json" '"%.3f" % d["metrics"]["ppl"]') | -"
  done
  echo "| base (fp32) | 32 | -$r | - |"
fi
for method in rtn gptq; do
  [[ " $ROWS " == *" $method "* ]] || continue
  for c in "3 16" "3 64" "4 64"; do
    set -- $c
    name="$method-w$1-g$2"
    extra=()
    [ "$method" = gptq ] && extra=("${CAL[@]}")
    "${E[@]}" quantize --method "$method" --bits "$1" --group-size "$2" --asymmetric "$MODEL" -o "$OUT/$name" \
      --device "$DEVICE" --overwrite --json -q "${extra[@]}" > "$OUT/$name.json"
    report "$name" "$method int$1 asymmetric g$2"
  done
done
if [[ " $ROWS " == *" spqr "* ]]; then
  for bits in 3 4; do
    name="spqr-${bits}bit"
    "${E[@]}" run "recipes/$name.yaml" --model "$MODEL" -o "$OUT/$name" --device "$DEVICE" --overwrite --json -q \
      "${CAL_SET[@]}" > "$OUT/$name.json"
    tau=$(get "$OUT/$name.json" "d['stages'][0]['config']['outlier_threshold']")
    report "$name" "spqr w$bits s3 b16/16 tau $tau (recipes/$name.yaml)"
  done
fi
