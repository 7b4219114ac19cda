#!/usr/bin/env bash
# One GPU call that A/B-times a change to the CUDA spqr kernels against a base tree: the GPU kernel
# tests on the working tree, then scripts/bench_spqr_cuda.py on the working tree and on the base
# (the same machine, one after the other), then optionally Nsight Compute source counters.
# Locally first (the base travels as the git-ignored .bench folder):
#   rm -rf .bench/base && mkdir -p .bench/base && git archive HEAD effllm_kernels | tar -x -C .bench/base
#   run(carry=[".bench"], command="bash scripts/gpu/spqr_ab.sh 560", timeout_s=600)
# Environment: AB_SHAPES, AB_MS (bench_spqr_cuda.py --shapes / --ms), AB_TESTS (pytest -k, "" skips the
# tests), AB_NCU (spqr_ncu.sh cases with NCU_SOURCE=1, "" skips), AB_ARGS (more bench arguments),
# AB_NEW_ARGS (bench arguments for the working tree only, e.g. --configs of new config fields).
limit=${1:-560}
source scripts/gpu/remote_env.sh >/dev/null 2>&1
export TRITON_CACHE_DIR=/tmp/triton-cache PYTHONPATH=$PYTHONPATH:$PWD/scripts
out=${OUT:-/tmp/out}; mkdir -p "$out"
start=$(date +%s)
left() { echo $(( limit - ($(date +%s) - start) )); }
shapes=${AB_SHAPES:-14336x4096,4096x14336,4096x4096}
ms=${AB_MS:-1,3,4,8,16}
tests=${AB_TESTS-mma or cuda}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
if [ -n "$tests" ]; then
    timeout $(( $(left) / 3 )) python3 -m pytest -q -m gpu tests/kernels/test_spqr_kernels.py -k "$tests" \
        -p no:cacheprovider > "$out/pytest_gpu.txt" 2>&1
    echo "tests rc $?: $(tail -1 "$out/pytest_gpu.txt")"
fi
for side in new base; do
    extra=""
    if [ "$side" = base ]; then
        [ -d .bench/base/effllm_kernels ] || { echo "no .bench/base: base not timed"; break; }
        pp=$PWD/.bench/base:$PYTHONPATH
    else
        pp=$PYTHONPATH extra=${AB_NEW_ARGS:-}
    fi
    timeout $(( $(left) - 20 )) env PYTHONPATH="$pp" python3 scripts/bench_spqr_cuda.py --shapes "$shapes" --ms "$ms" \
        ${AB_ARGS:-} $extra > "$out/bench_$side.txt" 2>&1
    echo "== $side (rc $?, $(( $(date +%s) - start )) s)"
    grep -E "^\| " "$out/bench_$side.txt" | grep -v -e "---" -e "| format" | awk '!seen[$0]++' | head -60
done
if [ -n "${AB_NCU:-}" ] && (( $(left) > 60 )); then
    NCU_SOURCE=1 bash scripts/gpu/spqr_ncu.sh $(( $(left) - 10 )) $AB_NCU
fi
echo "elapsed $(( $(date +%s) - start )) s"
