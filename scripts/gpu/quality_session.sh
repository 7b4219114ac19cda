#!/usr/bin/env bash
# One GPU call for the demo-model quality tables (after scripts/gpu/stage_demo.sh and the `stage`
# call, see scripts/README.md): the named jobs run side by side (the demo model leaves the H200
# mostly idle), all before one deadline LIMIT seconds away (give the call a timeout_s a minute longer);
# everything comes back as $OUT/results.tgz + $OUT/logs.txt.
#   run(carry=[".gguf-b", ".whl"], command="bash scripts/gpu/quality_session.sh 540 prune quant longrope")
# Jobs:
#   prune-tuned wanda++ with RO at ro_lr=1e-4 at 2:4, 4:8, 50% (one process)
#   longrope2   LongRoPE2 searches only: mscale su / none x documents at the target / mixed (half and
#               full target length), population 32 x 12 iterations, four processes
#   spqr-pd     SpQR 3-bit recipe at percdamp 0.1, then GPTQ 4-bit g64 (its own defaults)
#   prune       magnitude, wanda, wanda++ (gradient score only / with RO) at 50%, 2:4, 4:8, one process
#               per pattern, then wanda++ with RO at ro_lr=1e-4 (the recipe's tuned rate)
#   ro-lr       wanda++ 2:4 at ro_lr 1e-5, 3e-5, 3e-4, 1e-3 (the learning-rate sweep)
#   quant       the quant suite (rtn, gptq at 3/4 bits, SpQR recipes)
#   spqr-sweep  SpQR 3-bit recipe with other percdamp / act_order / tau (the bits-vs-quality sweep)
#   lr-final    base, pi, ntk, yarn and LongRoPE2 (target / mixed documents, 64 x 14) with 8 passkey trials
#   lr-lift     LongRoPE2 (mixed documents) with init_scales 1.2, 1.4, 1.6, and with 16k-heavy documents
#               (4 x 16k + 2 x 32k), as lr-final (two processes, ~8 min)
#   lr-16       LongRoPE2 with 16k-heavy documents alone (lr-lift's second search, which did not finish there);
#               LR16="longrope2-mixed16-yarn" for other variants, LR16_TRIALS=20 for lr-pk's 100 prompts per length
#   lr-pk       base, pi, ntk, yarn and LongRoPE2 (the default search: 4 x 16k + 2 x 32k documents, 64 x 14)
#               with 20 passkey trials, a length counting prompt + answer (two processes); LRPK="longrope2
#               longrope2-mixed" adds the earlier recipe's search (three do not finish inside one call)
#   longrope    base, pi, ntk, yarn, LongRoPE v1 / v2 (mscale su and none) at 32k, population 64 x 20 iterations
#   lr-cost     one LongRoPE2 candidate on a Llama-3-8B-shaped model (random weights) at 32k and 128k
#   pytest      the GPU tests
#   cost        SpQR / GPTQ calibration cost on one Llama-3-8B-shaped layer
limit=${1:-540}
shift
jobs=" ${*:-prune quant longrope} "
want() { [[ "$jobs" == *" $1 "* ]]; }
source scripts/gpu/remote_env.sh >/dev/null 2>&1
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2  # ten jobs at 16 threads each starve the 16 cores (seen)
python3 -c "from effllm_tools.io.demo import ensure_demo_checkpoint as e; print(e())" || exit 1
mins=$(python3 -c "print(($limit - 60) / 60)")
t=/tmp/effllm-session && rm -rf $t && mkdir -p $t
deadline=$(( $(date +%s) + limit ))  # one deadline for every job: chained jobs share it (a chain of
left() { echo $(( deadline - $(date +%s) )); }   # full-limit timeouts once outran the call)
q() { local out=$1; shift; timeout "$(left)" python3 scripts/bench_quality.py --device cuda --max-minutes "$mins" --out "$t/$out" "$@"; }
bl() { local out=$1; shift; timeout "$(left)" python3 scripts/bench_longrope.py --device cuda --max-minutes "$mins" --out "$t/$out" \
    --ppl-tokens 65536 --passkey-trials 4 --search-population 64 --search-iterations 20 "$@"; }
if want prune; then
    for tag in 0.5 2of4 4of8; do
        ( q "prune-$tag" --suite prune --rows "magnitude-$tag,wanda-$tag,wanda++grad-$tag,wanda++-$tag"
          q "prune-tuned-$tag" --suite prune --rows "wanda++-$tag" --set ro_lr=1e-4 ) >"$t/prune-$tag.log" 2>&1 &
    done
fi
if want prune-tuned; then
    q prune-tuned --suite prune --rows wanda++-2of4,wanda++-4of8,wanda++-0.5 --set ro_lr=1e-4 >"$t/prune-tuned.log" 2>&1 &
fi
if want ro-lr; then
    ( for lr in 1e-5 3e-5 3e-4 1e-3; do q "ro-lr-$lr" --suite prune --rows wanda++-2of4 --set ro_lr=$lr; done ) >"$t/ro-lr.log" 2>&1 &
fi
# SpQR quality needs no fast kernel: the reference path keeps these rows independent of kernel work.
want quant && EFFLLM_KERNELS=reference q quant --suite quant >"$t/quant.log" 2>&1 &
if want spqr-sweep; then
    ( EFFLLM_KERNELS=reference q spqr-pd0.1 --suite quant --rows spqr-3bit --set percdamp=0.1
      EFFLLM_KERNELS=reference q spqr-pd0.01 --suite quant --rows spqr-3bit --set percdamp=0.01 ) >"$t/spqr-a.log" 2>&1 &
    ( EFFLLM_KERNELS=reference q spqr-noact --suite quant --rows spqr-3bit --set act_order=false
      EFFLLM_KERNELS=reference q spqr-tau0.45 --suite quant --rows spqr-3bit --set outlier_threshold=0.45 ) >"$t/spqr-b.log" 2>&1 &
fi
if want longrope2; then
    for m in longrope2 longrope2-none longrope2-mixed longrope2-none-mixed; do
        bl "$m" --methods "$m" --search-population 32 --search-iterations 12 >"$t/$m.log" 2>&1 &
    done
fi
if want lr-final; then  # the final table: 8 passkey trials (40 prompts per length), searches at 64 x 14
    bl lr-final-base --methods base,pi,ntk,yarn --passkey-trials 8 >"$t/lr-final-base.log" 2>&1 &
    for m in longrope2 longrope2-mixed; do
        bl "lr-final-$m" --methods "$m" --passkey-trials 8 --search-iterations 14 >"$t/lr-final-$m.log" 2>&1 &
    done
fi
if want lr-lift; then  # LongRoPE2 (mixed documents) with extra starts above s, as lr-final's searches
    for m in longrope2-mixed-lift longrope2-mixed16; do
        bl "lr-$m" --methods "$m" --passkey-trials 8 --search-iterations 14 >"$t/lr-$m.log" 2>&1 &
    done
fi
if want lr-16; then  # LongRoPE2 with 16k-heavy documents (4 x 16k + 2 x 32k) alone, as lr-final's searches
    for m in ${LR16:-longrope2-mixed16}; do
        bl "lr-$m" --methods "$m" --passkey-trials "${LR16_TRIALS:-8}" --search-iterations 14 >"$t/lr-$m.log" 2>&1 &
    done
fi
if want lr-pk; then  # passkey with the answer inside the length (100 prompts per length), searches as lr-final
    bl lr-pk-base --methods base,pi,ntk,yarn --passkey-trials 20 --search-iterations 14 >"$t/lr-pk-base.log" 2>&1 &
    for m in ${LRPK:-longrope2}; do
        bl "lr-pk-$m" --methods "$m" --passkey-trials 20 --search-iterations 14 >"$t/lr-pk-$m.log" 2>&1 &
    done
fi
if want spqr-pd; then
    ( EFFLLM_KERNELS=reference q spqr-pd0.1 --suite quant --rows spqr-3bit --set percdamp=0.1
      EFFLLM_KERNELS=reference q gptq-w4 --suite quant --rows gptq-w4g64 ) >"$t/spqr-pd.log" 2>&1 &
fi
if want longrope; then
    bl lr-base --methods base,pi,ntk,yarn,longrope2-none >"$t/lr-base.log" 2>&1 &
    bl lr-v2 --methods longrope2 >"$t/lr-v2.log" 2>&1 &
    bl lr-v1 --methods longrope --search-population 32 --search-iterations 10 >"$t/lr-v1.log" 2>&1 &
fi
if want lr-cost; then
    ( for n in 32768 131072; do
        timeout "$(left)" python3 scripts/bench_longrope.py --time-one-eval --shape llama3-8b --device cuda --target $n
      done ) >"$t/lr-cost.log" 2>&1 &
fi
want pytest && timeout "$(left)" python3 -m pytest -q -m gpu -p no:cacheprovider tests >$t/pytest.log 2>&1 &
want cost && ( for m in spqr gptq; do timeout "$(left)" python3 scripts/bench_calibration_cost.py --method $m --layers 1 --out $t/cost-$m; done ) >$t/cost.log 2>&1 &
wait
(cd $t && find . -name ckpt -prune -o \( -name '*.md' -o -name '*.json' -o -name '*.log' \) -print | grep -v eval-text \
    | tar -czf "$OUT"/results.tgz -T -)
for f in $t/*.log; do echo "=== $f"; tail -c 3000 "$f"; done > "$OUT"/logs.txt
find $t -name '*.md' -not -path '*eval-text*' | sort | xargs tail -n 30
