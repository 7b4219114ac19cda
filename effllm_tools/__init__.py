"""effllm: compress and extend pretrained LLM checkpoints.

``import effllm_tools`` registers effllm's quantization formats with transformers, so
``AutoModelForCausalLM.from_pretrained(out_dir)`` opens effllm checkpoints afterwards.
"""

from __future__ import annotations

__version__ = "0.1.0"

from effllm_tools.errors import (  # noqa: E402
    BadInputError,
    EffllmError,
    ExitCode,
    QualityGateError,
    UnsupportedError,
)

__all__ = [
    "__version__",
    "load",
    "BadInputError",
    "EffllmError",
    "ExitCode",
    "QualityGateError",
    "UnsupportedError",
]


def load(path, *, device: str = "cpu", dtype=None):
    """Load a checkpoint effllm can read (HF directory, GGUF file, ``demo``) as a causal LM."""
    from effllm_tools.io.load import load_model

    return load_model(str(path), device=device, dtype=dtype).model


def _register_integrations() -> None:
    from effllm_tools.integrations import hf_quantizer

    hf_quantizer.register()


_register_integrations()
