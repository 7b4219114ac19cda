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


def load(path, *, device: str = "cpu", dtype=None, sparse24: str | None = None):
    """Load a checkpoint effllm can read (HF directory, GGUF file, ``demo``) as a causal LM.

    ``sparse24`` (off | on | dual | auto; default ``EFFLLM_SPARSE24`` or auto) picks the 2:4 sparse
    runtime for 2:4-pruned checkpoints on CUDA (:mod:`effllm_tools.runtime.sparse24`).
    """
    from effllm_tools.io.load import load_model

    return load_model(str(path), device=device, dtype=dtype, sparse24=sparse24).model


def _register_integrations() -> None:
    from effllm_tools.integrations import hf_quantizer

    hf_quantizer.register()


_register_integrations()
