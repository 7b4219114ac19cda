#!/usr/bin/env bash
# Nsight Compute on the spqr kernels the launch heuristic picks (developer tooling, scripts/README.md):
# the fp16x2 GEMV at M = 1 and the fp16 tensor-core kernel at M = 16, on the Llama shapes; one report
# per case in $OUT (speed of light, memory, warp stalls, occupancy, launch, scheduler, source counters).
#   run(command="bash scripts/gpu/spqr_ncu.sh 280", timeout_s=300)
# NCU_SOURCE=1: the full section set with per-SASS-instruction counters (stall samples, excessive
# sectors) instead, as $OUT/ncu_<case>.ncu-rep plus its source page as CSV.
# ncu reads hardware counters only on some runtimes (the device README's KINDS.md): the first case's
# report says at once whether it worked. Clocks are left alone (--clock-control none).
limit=${1:-280}
shift
cases=${*:-"14336x4096:1 14336x4096:16 4096x14336:1 4096x4096:1"}
source scripts/gpu/remote_env.sh >/dev/null 2>&1
export TRITON_CACHE_DIR=/tmp/triton-cache
out=${OUT:-/tmp/out}; mkdir -p "$out"
start=$(date +%s)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: ${ncu:-missing}"
for c in $cases; do
    shape=${c%%:*}; m=${c##*:}; n=${shape%%x*}; k=${shape##*x}
    left=$(( limit - ($(date +%s) - start) - 5 ))
    (( left < 20 )) && break
    if [ -n "${NCU_SOURCE:-}" ]; then
        rep="$out/ncu_${shape}_m${m}"
        timeout "$left" "$ncu" --clock-control none --target-processes all \
            --kernel-name regex:"_spqr_(gemv16|mma16|gemv|mma)_kernel|spqr_gemv_cuda|spqr_mma_cuda|spqr_mma_xprep" --launch-skip 5 --launch-count 1 \
            --set full --import-source yes -o "$rep" \
            python3 scripts/profile_spqr_kernel.py --n "$n" --k "$k" --m "$m" > "$rep.log" 2>&1
        "$ncu" -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.sass.csv" 2>&1
        "$ncu" -i "$rep.ncu-rep" --page details --print-details all > "$rep.details.txt" 2>&1
        echo "== $shape M=$m: $(wc -l < "$rep.sass.csv") SASS lines"; continue
    fi
    timeout "$left" "$ncu" --clock-control none --target-processes all \
        --kernel-name regex:"_spqr_(gemv16|mma16|gemv|mma)_kernel|spqr_gemv_cuda|spqr_mma_cuda|spqr_mma_xprep" --launch-skip 5 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats --section SchedulerStats --section SourceCounters \
        python3 scripts/profile_spqr_kernel.py --n "$n" --k "$k" --m "$m" > "$out/ncu_${shape}_m${m}.txt" 2>&1
    echo "== $shape M=$m"; grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issue Slots Busy|Stall" \
        "$out/ncu_${shape}_m${m}.txt" | head -20
done
echo "elapsed $(( $(date +%s) - start )) s"
