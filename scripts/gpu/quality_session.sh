#!/usr/bin/env bash
# One GPU call for the demo-model quality tables (after scripts/gpu/stage_demo.sh and the `stage`
# call, see scripts/README.md): pruning and quantization suites, the long-context table, the GPU
# tests and the SpQR / GPTQ calibration cost on one Llama-3-8B-shaped layer, side by side (the demo
# model leaves the H200 mostly idle). Results (at most 8 files) go to $OUT.
#   run(carry=[".gguf-b", ".whl"], command="bash scripts/gpu/quality_session.sh 400 prune quant lr pytest cost")
limit=${1:-400}
shift
jobs=" ${*:-prune quant lr pytest cost} "
want() { [[ "$jobs" == *" $1 "* ]]; }
source scripts/gpu/remote_env.sh >/dev/null 2>&1
python3 -c "from effllm_tools.io.demo import ensure_demo_checkpoint as e; print(e())" || exit 1
mins=$(python3 -c "print(($limit - 90) / 60)")
t=/tmp/effllm-session && rm -rf $t && mkdir -p $t
want prune && timeout "$limit" python3 scripts/bench_quality.py --suite prune --device cuda --out $t/prune --max-minutes "$mins" >$t/prune.log 2>&1 &
want quant && timeout "$limit" python3 scripts/bench_quality.py --suite quant --device cuda --out $t/quant --max-minutes "$mins" >$t/quant.log 2>&1 &
want lr && timeout "$limit" python3 scripts/bench_longrope.py --device cuda --out $t/lr --max-minutes "$mins" \
    --methods base,longrope2,yarn,ntk,pi,longrope,longrope2-af1 --ppl-tokens 65536 >$t/lr.log 2>&1 &
want pytest && timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider tests >$t/pytest.log 2>&1 &
want cost && ( for m in spqr gptq; do timeout $((limit / 2)) python3 scripts/bench_calibration_cost.py --method $m --layers 1 --out $t/cost-$m; done ) >$t/cost.log 2>&1 &
wait
cp $t/prune/prune.md $t/prune/prune.json $t/quant/quant.md $t/quant/quant.json "$OUT"/ 2>/dev/null
cp $t/lr/table.md "$OUT"/lr_table.md 2>/dev/null; cp $t/lr/results.json "$OUT"/lr_results.json 2>/dev/null
cat $t/cost-*/*.json > "$OUT"/cost.json 2>/dev/null
for f in pytest cost prune quant lr; do echo "=== $f"; tail -c 12000 $t/$f.log; done > "$OUT"/logs.txt
cat "$OUT"/*.md; tail -3 $t/pytest.log
