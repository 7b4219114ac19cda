"""Teach transformers to open effllm checkpoints: ``quantization_config.quant_method == "effllm"``.

Registered on ``import effllm_tools``. Before the weights load, every module named in
``quantization_config["modules"]`` is swapped (on the meta device) for the packed module of its
format, so the checkpoint's packed tensors load straight into it.
"""

from __future__ import annotations

from typing import Any

QUANT_METHOD = "effllm"


def _build_classes() -> tuple[type, type]:
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class EffllmConfig(QuantizationConfigMixin):
        """The ``quantization_config`` effllm writes: which module uses which packed format."""

        def __init__(self, modules: dict[str, dict[str, Any]] | None = None, methods: list[str] | None = None,
                     version: int = 1, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.modules = modules or {}
            self.methods = methods or []
            self.version = version

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "version": self.version, "methods": self.methods,
                    "modules": self.modules}

    class EffllmQuantizer(HfQuantizer):
        """Loads pre-quantized effllm checkpoints (effllm itself does the quantizing)."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
            from effllm_tools.methods.common import replace_module
            from effllm_tools.registry import get_format

            for name, spec in self.quantization_config.modules.items():
                module = get_format(spec["format"]).from_spec(spec, device="meta")
                replace_module(model, name, module)

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return EffllmConfig, EffllmQuantizer


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    config_cls, quantizer_cls = _build_classes()
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config_cls
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer_cls
