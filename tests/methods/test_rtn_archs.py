"""rtn through the whole path on every supported family: quantize, save, load back, same logits."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import ARCH_NAMES, build_model


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_quantize_save_load_every_family(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from effllm_tools.methods.rtn.algorithm import dequantize_codes, quantize_rtn
    from effllm_tools.methods.rtn.method import RTNConfig, apply_rtn
    from effllm_tools.pipeline.arch import decoder_layers, get_arch
    from effllm_tools.runner import layers_prefix_of

    torch.set_num_threads(1)
    model = build_model(arch)
    reference = build_model(arch)
    with torch.no_grad():  # the expected model: every decoder linear replaced by its dequantized weight
        for name, mod in reference.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
                codes, s, z = quantize_rtn(mod.weight, 4, 32)
                mod.weight.copy_(dequantize_codes(codes, s, z, 32))

    class Ctx:  # the slice of StageContext that rtn uses
        def __init__(self):
            self.model, self.modules = model, {}
            self.layers_prefix = layers_prefix_of(model, get_arch(model))

        def progress_iter(self, items, label):
            return items

        def record_module(self, name, spec):
            self.modules[name] = spec

    ctx = Ctx()
    res = apply_rtn(ctx, RTNConfig(bits=4, group_size=32))
    n_linear = len(get_arch(model).linear_names) * len(decoder_layers(model, get_arch(model)))
    assert res.metrics["quantized_modules"] == n_linear
    model.config.quantization_config = {"quant_method": "effllm", "version": 1, "methods": ["rtn"],
                                        "modules": ctx.modules}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
