"""On a CUDA device: same result as on the CPU, and device memory of about one layer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from effllm_tools.pipeline import LayerContext, decoder_layers, get_arch, run_layerwise

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def halve_o_proj(ctx: LayerContext) -> None:
    assert next(ctx.layer.parameters()).device.type == ctx.device.type
    with torch.no_grad():
        ctx.layer.self_attn.o_proj.weight.mul_(0.5)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_cuda_matches_cpu(build, name, offload, calib_ids) -> None:
    model = build(name)
    on_cpu = run_layerwise(copy.deepcopy(model), calib_ids, halve_o_proj)
    on_gpu = run_layerwise(model, calib_ids, halve_o_proj, device="cuda", offload_activations=offload)
    assert all(p.device.type == "cpu" for p in model.parameters())  # everything went back
    for a, b in zip(on_cpu.hidden_states, on_gpu.hidden_states, strict=True):
        assert b.device.type == ("cpu" if offload else "cuda")
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-4)


def test_device_memory_is_about_one_layer() -> None:
    """8 layers of ~50 MB each: the device never holds much more than one of them."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = AutoModelForCausalLM.from_config(config).float().eval()
    layer_bytes = sum(p.numel() * 4 for p in decoder_layers(model, get_arch(model))[0].parameters())
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    ids = torch.randint(0, 1024, (8, 256))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_layerwise(model, ids, halve_o_proj, device="cuda", offload_activations=True)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 1.5 * layer_bytes + 64 * 2**20, (peak, layer_bytes, model_bytes)
    assert peak < model_bytes / 3
