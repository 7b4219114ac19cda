"""The layer-wise calibration pipeline shared by every method that looks at activations.

See DESIGN.md, "Calibration pipeline". Typical use (a GPTQ-like method)::

    from effllm_tools.pipeline import run_layerwise

    def on_layer(ctx):
        for group in ctx.arch.linear_groups:          # (q, k, v), (o,), (gate, up), (down,)
            hessians = {}
            def add(name, x):                         # x: [tokens, in_features]
                hessians[name] = hessians.get(name, 0) + 2 * x.T.float() @ x.float()
            ctx.collect_inputs(group, add)            # inputs with the earlier groups quantized
            for name in group:
                quantize_(ctx.layer.get_submodule(name), hessians[name])

    run_layerwise(model, calib_ids, on_layer, device="cuda", offload_activations=True)
"""

from effllm_tools.pipeline.arch import (
    ARCH_TABLE,
    ArchSpec,
    decoder_layers,
    get_arch,
    linear_modules,
    supported_model_types,
)
from effllm_tools.pipeline.capture import CapturedInputs, capture_layer_inputs
from effllm_tools.pipeline.context import LayerContext
from effllm_tools.pipeline.sequential import LayerwiseResult, run_layerwise
from effllm_tools.pipeline.state import make_fingerprint

__all__ = [
    "ARCH_TABLE",
    "ArchSpec",
    "CapturedInputs",
    "LayerContext",
    "LayerwiseResult",
    "capture_layer_inputs",
    "decoder_layers",
    "get_arch",
    "linear_modules",
    "make_fingerprint",
    "run_layerwise",
    "supported_model_types",
]
