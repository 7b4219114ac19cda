"""The layer-wise calibration pipeline shared by every method that looks at activations.

See DESIGN.md, "Calibration pipeline". A GPTQ-like method, true-sequential::

    from effllm_tools.pipeline import make_fingerprint, run_layerwise

    def on_layer(ctx):                                   # ctx: LayerContext, layer on the device
        for group in ctx.arch.linear_groups:             # (q, k, v), (o,), (gate, up), (down,)
            acc = {"H": 0.0, "tokens": 0}

            def add(name, x):                            # x: [tokens, in_features], one sample
                acc["H"] = acc["H"] + 2 * x.T.float() @ x.float()
                acc["tokens"] += x.shape[0]

            ctx.collect_inputs(group[:1], add)           # a group shares one input: one Hessian
            for name in group:                           # inputs above saw earlier groups changed
                scales = gptq_quantize_(ctx.layer.get_submodule(name), acc["H"] / acc["tokens"])
                ctx.artifacts[f"{name}.scales"] = scales  # saved with the resume state

    result = run_layerwise(
        model, calib_ids, on_layer, device="cuda", offload_activations=True,
        state_dir=out / "state", resume=True,
        fingerprint=make_fingerprint(model, calib_ids, {"method": "gptq", "bits": 4}),
    )

A Wanda++-like method takes gradients of a loss on the block's own output::

    out = ctx.call(ctx.input(s))                         # [1, L, hidden], with autograd
    out.float().pow(2).sum().backward()                  # grads on ctx.layer's weights
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
