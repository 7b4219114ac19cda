#!/usr/bin/env bash
# One GPU call for the spqr kernels: the GPU kernel tests and the matmul benchmark side by side (the
# tests mostly compile), then optionally the decode benchmark; logs and tables land in $OUT.
#   run(command="bash scripts/gpu/spqr_kernel_session.sh 280 tests sweep")
# Jobs: tests (GPU kernel tests of tests/kernels), tiny (the fp16x2 GEMV's small-shape tests on CUDA),
#       sweep (bench_spqr_matmul --sweep at M=1, 2/3/4-bit), final (--sweep at M=1 for 3 bits, the
#       3-bit M=16/64 and 4-bit M=1 rows by the heuristic), table (the full table, heuristic configs),
#       decode (bench_spqr_decode, compiled, DECODE_ARGS),
#       mma16 (the fp16 tensor-core kernel, effllm_kernels/spqr/triton_mma16.py: every candidate checked against the
#       fp64 reference and timed at M=16/64 on the three Llama shapes against bf16, beside the heuristic's
#       old tensor-core kernel; the table row of each case is its fastest candidate),
#       variants (the heuristic's configuration against VARIANTS, e.g. "rows=2;prefetch=2", at VARIANT_MS),
#       large (M = 64..2048: the fp16 tensor-core kernel against dequantize-then-cuBLAS, every candidate of
#       both, after the tests). One call, < 5 min:
#   run(command="bash scripts/gpu/spqr_kernel_session.sh 290 tests mma16", timeout_s=300)
limit=${1:-280}
shift
jobs=" ${*:-tests sweep} "
want() { [[ "$jobs" == *" $1 "* ]]; }
source scripts/gpu/remote_env.sh >/dev/null 2>&1
export TRITON_CACHE_DIR=/tmp/triton-cache
out=${OUT:-/tmp/out}; mkdir -p "$out"
start=$(date +%s)
left() { echo $(( limit - ($(date +%s) - start) )); }
pids=()
if want tests; then
    timeout $(( $(left) - 20 )) python3 -m pytest -q -m gpu tests/kernels/test_spqr_kernels.py tests/kernels/test_rtn_matmul.py \
        -p no:cacheprovider > "$out/pytest_gpu.txt" 2>&1 &
    pids+=($!)
    timeout $(( $(left) - 20 )) python3 -m pytest -q tests/kernels/test_spqr_kernels.py \
        -k "fp16x2 or pair_asm or fp16_mma or decode_asm or dequant" -p no:cacheprovider > "$out/pytest_tiny.txt" 2>&1 &
    pids+=($!)
fi
if want tiny; then
    timeout $(( $(left) - 20 )) python3 -m pytest -q tests/kernels/test_spqr_kernels.py -k "fp16x2 or pair_asm" \
        -p no:cacheprovider > "$out/pytest_tiny.txt" 2>&1 &
    pids+=($!)
fi
if want final; then
    (cd scripts && timeout $(( $(left) - ${DECODE_S:-0} - 10 )) python3 bench_spqr_matmul.py --sweep --sweep-m1-only \
        --formats "3:3:1,16,64;4:3:1" --workers 12 --eager-calls 30 --rotate-mb 300) > "$out/final.txt" 2>&1
fi
if want mma16; then
    (cd scripts && timeout $(( $(left) - 15 )) python3 bench_spqr_matmul.py --sweep --sweep-paths mma16 \
        --sweep-splits auto,half --formats "3:3:16,64" --workers 12 --eager-calls 30 --rotate-mb 300) \
        > "$out/mma16.txt" 2>&1
fi
if want sweep; then
    (cd scripts && timeout $(( $(left) - 15 )) python3 bench_spqr_matmul.py --sweep --sweep-m1-only --m 1 \
        --formats "3:3:1;4:3:1;2:3:1" --workers 12 --eager-calls 50 --rotate-mb 300) > "$out/sweep.txt" 2>&1
fi
if want variants; then  # the heuristic's configuration against field overrides of it (VARIANTS), M = 1 and 16
    (cd scripts && timeout $(( $(left) - ${DECODE_S:-0} - 10 )) python3 bench_spqr_matmul.py --sweep \
        --sweep-paths "variants:${VARIANTS:-rows=2}" --formats "3:3:${VARIANT_MS:-1,16}" --workers 12 --eager-calls 20 \
        --rotate-mb 300) > "$out/variants.txt" 2>&1
fi
if want table; then
    (cd scripts && timeout $(( $(left) - 15 )) python3 bench_spqr_matmul.py --eager-calls 50 --rotate-mb 300 \
        ${TABLE_ARGS:-}) > "$out/table.txt" 2>&1
fi
for p in "${pids[@]}"; do wait "$p"; done
if want large; then  # after the tests: timings beside them are skewed
    (cd scripts && timeout $(( $(left) - ${DECODE_S:-0} - 10 )) python3 bench_spqr_matmul.py --sweep --sweep-paths mma16,dequant \
        --sweep-splits auto --formats "3:3:64,128,256,2048" --workers 12 --eager-calls 20 --rotate-mb 300) \
        > "$out/large.txt" 2>&1
fi
if want decode; then
    timeout $(( $(left) - 5 )) python3 scripts/bench_spqr_decode.py --new-tokens 32 --modes compiled ${DECODE_ARGS:-} \
        > "$out/decode.txt" 2>&1
fi
tail -3 "$out"/pytest_*.txt 2>/dev/null
grep -h "^| " "$out/sweep.txt" "$out/variants.txt" "$out/table.txt" "$out/final.txt" "$out/mma16.txt" "$out/large.txt" 2>/dev/null | grep -v "^| N x K" | sort -u | head -90
tail -8 "$out/decode.txt" 2>/dev/null
echo "elapsed $(( $(date +%s) - start )) s"
