"""Capture of the decoder layers' calls: per-layer arguments, no logits, model left intact."""

from __future__ import annotations

import pytest
import torch

from effllm_tools.errors import BadInputError
from effllm_tools.pipeline import capture_layer_inputs, decoder_layers, get_arch
from effllm_tools.pipeline.context import first_output


def test_first_layer_inputs_are_the_embeddings(model, calib_ids) -> None:
    captured = capture_layer_inputs(model, calib_ids)
    arch = get_arch(model)
    with torch.no_grad():
        embeds = model.get_submodule(arch.embed_tokens)(calib_ids)  # Gemma3 scales inside
    assert len(captured.hidden_states) == calib_ids.shape[0]
    for s, hidden in enumerate(captured.hidden_states):
        assert hidden.shape == (1, calib_ids.shape[1], model.config.hidden_size)
        torch.testing.assert_close(hidden[0], embeds[s], rtol=0, atol=0)
    assert len(captured.layer_kwargs) == model.config.num_hidden_layers
    assert "position_embeddings" in captured.layer_kwargs[0]


def test_gemma3_layers_get_their_own_mask_and_rope(build, calib_ids) -> None:
    """Sliding layers (0, 2) and the full layer (1) are called differently; reusing layer 0's call
    for every layer would compute something else."""
    model = build("gemma3", attn="eager")
    captured = capture_layer_inputs(model, calib_ids)
    sliding, full, sliding2 = captured.layer_kwargs
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])
    torch.testing.assert_close(sliding["attention_mask"], sliding2["attention_mask"])
    cos_local, cos_global = sliding["position_embeddings"][0], full["position_embeddings"][0]
    assert not torch.allclose(cos_local, cos_global)

    layer = decoder_layers(model, get_arch(model))[1]
    hidden = captured.hidden_states[0]
    with torch.no_grad():
        right = first_output(layer(hidden, **full))
        wrong = first_output(layer(hidden, **sliding))
    assert (right - wrong).abs().max() > 1e-3


def test_no_logits_and_layers_restored(model, calib_ids) -> None:
    arch = get_arch(model)
    layers_before = list(decoder_layers(model, arch))
    calls = []
    handle = model.get_submodule(arch.lm_head).register_forward_hook(lambda *a: calls.append(1))
    layer_calls = []
    layer_handle = layers_before[0].register_forward_hook(lambda *a: layer_calls.append(1))
    capture_layer_inputs(model, calib_ids)
    handle.remove()
    layer_handle.remove()
    assert calls == [] and layer_calls == []  # neither the lm_head nor a real layer ran
    assert list(decoder_layers(model, arch)) == layers_before


def test_kwargs_only_and_offload(model, calib_ids) -> None:
    only = capture_layer_inputs(model, calib_ids, kwargs_only=True)
    assert only.hidden_states == [] and len(only.layer_kwargs) == model.config.num_hidden_layers
    offloaded = capture_layer_inputs(model, calib_ids, offload_activations=True)
    assert all(h.device.type == "cpu" for h in offloaded.hidden_states)


@pytest.mark.parametrize(
    "bad", [torch.zeros(4, dtype=torch.long), torch.zeros(2, 3), torch.zeros(0, 5, dtype=torch.long)]
)
def test_bad_ids(model, bad) -> None:
    with pytest.raises(BadInputError):
        capture_layer_inputs(model, bad)
