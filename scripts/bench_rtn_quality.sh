#!/usr/bin/env bash
# RTN quality on the real demo model: PPL and KL against the base, in-domain (Pride and Prejudice)
# and out-of-domain (Python docs), fp32, first 20,480 tokens in 512-token windows.
# Usage: bash scripts/bench_rtn_quality.sh [OUT_DIR]   (prints a markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/effllm
OUT=${1:-out/bench-rtn}
mkdir -p "$OUT"
EVAL=(--seqlen 512 --max-tokens 20480 --dtype float32 --json -q)
configs=("4 32 --asymmetric" "4 64 --asymmetric" "4 64 --symmetric" "4 0 --asymmetric" "3 64 --asymmetric" "3 16 --asymmetric" "8 128 --asymmetric")
echo "| weights | avg bits | PPL austen-prideprejudice | KL | PPL pydocs | KL |"
echo "|---|---|---|---|---|---|"
b1=$($E eval-ppl demo --dataset austen-prideprejudice "${EVAL[@]}" | .venv/bin/python -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["metrics"]["ppl"])')
b2=$($E eval-ppl demo --dataset pydocs "${EVAL[@]}" | .venv/bin/python -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["metrics"]["ppl"])')
echo "| base (fp32) | 32 | $b1 | - | $b2 | - |"
for c in "${configs[@]}"; do
  set -- $c
  name="rtn-w$1-g$2${3#--}"
  bits=$($E quantize --method rtn --bits "$1" --group-size "$2" "$3" demo -o "$OUT/$name" --overwrite --json -q \
         | .venv/bin/python -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["metrics"]["avg_bits"])')
  row="| rtn int$1 ${3#--} g$([ "$2" = 0 ] && echo per-channel || echo "$2") | $bits"
  for ds in austen-prideprejudice pydocs; do
    r=$($E eval-ppl "$OUT/$name" --dataset "$ds" --kld-base demo "${EVAL[@]}" \
        | .venv/bin/python -c 'import json,sys; m=json.load(sys.stdin)["metrics"]; print("%.3f | %.4f" % (m["ppl"], m["kld"]))')
    row="$row | $r"
  done
  echo "$row |"
done
