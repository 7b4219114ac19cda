"""The architecture table: lookup, refusal, and that every path in it exists in the real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, Gemma3Config

from effllm_tools.errors import ExitCode, UnsupportedError
from effllm_tools.pipeline import ArchSpec, decoder_layers, get_arch, linear_modules, supported_model_types


def test_supported_types_listed() -> None:
    assert supported_model_types() == ["gemma3_text", "llama", "mistral", "qwen2", "qwen3"]


def test_every_path_in_the_table_exists(model: nn.Module) -> None:
    arch = get_arch(model)
    assert arch is get_arch(model.config)  # config and model look up the same row
    layers = decoder_layers(model, arch)
    assert len(layers) == model.config.num_hidden_layers
    for path in (arch.embed_tokens, arch.final_norm, arch.lm_head, arch.rotary_emb):
        assert isinstance(model.get_submodule(path), nn.Module)
    for layer in layers:
        for norm in arch.layer_norms:
            assert isinstance(layer.get_submodule(norm), nn.Module)
        for feeding in arch.norm_feeds.values():
            assert set(feeding) <= set(arch.linear_names)
    assert isinstance(model.get_submodule(arch.embed_tokens), nn.Embedding)


def test_linear_modules_in_execution_order(build) -> None:
    model = build("qwen3")
    arch = get_arch(model)
    layer = decoder_layers(model, arch)[1]
    linears = linear_modules(layer, arch)
    order: list[str] = []
    names = {module: name for name, module in linears.items()}
    handles = [m.register_forward_pre_hook(lambda m, a: order.append(names[m])) for m in linears.values()]
    with torch.no_grad():
        model(torch.arange(8)[None])
    for handle in handles:
        handle.remove()
    # q, k, v may run in any order among themselves; the groups may not.
    group_of = {n: g for g, group in enumerate(arch.linear_groups) for n in group}
    assert [group_of[n] for n in order] == sorted(group_of[n] for n in order)
    assert list(linears) == list(arch.linear_names)
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert linears["mlp.down_proj"] is layer.mlp.down_proj


def test_gemma3_layout(build) -> None:
    arch = get_arch(build("gemma3"))
    assert arch.pre_ffn_norm == "pre_feedforward_layernorm"
    assert arch.norm_feeds["post_attention_layernorm"] == ()  # Gemma3 normalizes the attention output
    assert arch.norm_feeds["pre_feedforward_layernorm"] == ("mlp.gate_proj", "mlp.up_proj")
    assert arch.qk_norms == ("self_attn.q_norm", "self_attn.k_norm")


def test_tied_embeddings_follow_the_config(build) -> None:
    arch: ArchSpec = get_arch(build("llama"))
    assert arch.tied_embeddings(build("llama").config) is False
    gemma = build("gemma3")
    assert get_arch(gemma).tied_embeddings(gemma.config) is True
    assert gemma.lm_head.weight is gemma.get_submodule("model.embed_tokens").weight


def test_bert_is_refused_with_one_line() -> None:
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedError) as info:
        get_arch(BertForMaskedLM(config))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model type 'bert' (BertForMaskedLM) is not a supported decoder-only")
    assert "supported: gemma3_text, llama, mistral, qwen2, qwen3" in message
    assert info.value.exit_code == ExitCode.UNSUPPORTED
    with pytest.raises(UnsupportedError, match="'bert' \\(BertConfig\\)"):
        get_arch(config)


def test_multimodal_gemma3_is_refused_with_advice() -> None:
    with pytest.raises(UnsupportedError, match="Gemma3ForCausalLM"):
        get_arch(Gemma3Config())
