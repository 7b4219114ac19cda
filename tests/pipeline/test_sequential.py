"""The layer walk reproduces the model's own forward, with and without modifications."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from effllm_tools.pipeline import LayerContext, decoder_layers, get_arch, linear_modules, run_layerwise

ATOL = 1e-5


def layer_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each decoder layer's input ``[n, L, hidden]`` in a batched full forward, and the logits."""
    arch = get_arch(model)
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(args[0]), with_kwargs=True)
        for layer in decoder_layers(model, arch)
    ]
    with torch.no_grad():
        logits = model(ids).logits
    for hook in hooks:
        hook.remove()
    return inputs, logits


def final_logits(model: nn.Module, hidden_states: list[torch.Tensor]) -> torch.Tensor:
    """norm + lm_head applied to the last layer's outputs, ``[n, L, vocab]``."""
    arch = get_arch(model)
    with torch.no_grad():
        normed = model.get_submodule(arch.final_norm)(torch.cat(hidden_states))
        return model.get_submodule(arch.lm_head)(normed)


def recording_inputs(seen: dict[int, torch.Tensor]):
    def on_layer(ctx: LayerContext) -> None:
        seen[ctx.index] = torch.cat([ctx.input(s) for s in range(ctx.num_samples)])

    return on_layer


def test_noop_walk_reproduces_the_model(model, calib_ids) -> None:
    """THE property: layer by layer with captured arguments == the model's own forward."""
    ref_inputs, ref_logits = layer_inputs(model, calib_ids)
    seen: dict[int, torch.Tensor] = {}
    result = run_layerwise(model, calib_ids, recording_inputs(seen))
    for index, ref in enumerate(ref_inputs):
        torch.testing.assert_close(seen[index], ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(final_logits(model, result.hidden_states), ref_logits, rtol=0, atol=ATOL)
    with torch.no_grad():
        last = model.model(calib_ids).last_hidden_state  # after the final norm
    normed = model.get_submodule(get_arch(model).final_norm)(torch.cat(result.hidden_states))
    torch.testing.assert_close(normed, last, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_noop_walk_with_eager_masks(build, name, calib_ids) -> None:
    model = build(name, attn="eager")
    _, ref_logits = layer_inputs(model, calib_ids)
    result = run_layerwise(model, calib_ids, lambda ctx: None)
    torch.testing.assert_close(final_logits(model, result.hidden_states), ref_logits, rtol=0, atol=ATOL)


def test_modification_feeds_the_next_layers(model, calib_ids) -> None:
    """Zeroing layer 1's o_proj inside on_layer == a full forward of the model so modified."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        decoder_layers(reference, get_arch(reference))[1].self_attn.o_proj.weight.zero_()
    ref_inputs, ref_logits = layer_inputs(reference, calib_ids)
    plain_inputs, _ = layer_inputs(model, calib_ids)

    seen: dict[int, torch.Tensor] = {}
    record = recording_inputs(seen)

    def on_layer(ctx: LayerContext) -> None:
        record(ctx)
        if ctx.index == 1:
            with torch.no_grad():
                ctx.layer.self_attn.o_proj.weight.zero_()

    result = run_layerwise(model, calib_ids, on_layer)
    assert (seen[2] - plain_inputs[2]).abs().max() > 1e-3  # the change reached layer 2
    for index, ref in enumerate(ref_inputs):
        torch.testing.assert_close(seen[index], ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(final_logits(model, result.hidden_states), ref_logits, rtol=0, atol=ATOL)


def linear_inputs(model: nn.Module, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Input of every linear in a full batched forward: (layer, name) -> ``[n * L, in_features]``."""
    arch = get_arch(model)
    found: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        for name, linear in linear_modules(layer, arch).items():

            def hook(_m, args, key=(index, name)) -> None:
                found[key] = args[0].reshape(-1, args[0].shape[-1])

            hooks.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return found


def test_collect_inputs_gptq_style(model, calib_ids) -> None:
    """Group by group: collect a group's inputs, then change its weights; the next group's inputs
    (and the next layers') must come from the changed weights, as in a full forward of the model
    with every linear changed."""
    reference = copy.deepcopy(model)
    arch = get_arch(model)
    with torch.no_grad():
        for layer in decoder_layers(reference, arch):
            for linear in linear_modules(layer, arch).values():
                linear.weight.mul_(0.5)
    expected = linear_inputs(reference, calib_ids)

    collected: dict[tuple[int, str], list[torch.Tensor]] = {}

    def on_layer(ctx: LayerContext) -> None:
        for group in ctx.arch.linear_groups:
            ctx.collect_inputs(group, lambda name, x: collected.setdefault((ctx.index, name), []).append(x))
            with torch.no_grad():
                for name in group:
                    ctx.layer.get_submodule(name).weight.mul_(0.5)

    run_layerwise(model, calib_ids, on_layer)
    assert collected.keys() == expected.keys()
    for key, xs in collected.items():
        assert len(xs) == calib_ids.shape[0] and xs[0].shape[0] == calib_ids.shape[1]
        torch.testing.assert_close(torch.cat(xs), expected[key], rtol=0, atol=ATOL)


def test_collect_stops_early_and_collects_outputs(model, calib_ids) -> None:
    mlp_calls: list[int] = []
    counts: dict[str, int] = {}

    def on_layer(ctx: LayerContext) -> None:
        handle = ctx.layer.mlp.register_forward_hook(lambda *a: mlp_calls.append(ctx.index))
        ctx.collect_inputs(ctx.arch.attn_proj[:3], lambda n, x: counts.__setitem__(n, counts.get(n, 0) + 1))
        assert mlp_calls == []  # the MLP never ran
        outs: list[torch.Tensor] = []
        ctx.collect_outputs(["mlp.down_proj"], lambda n, y: outs.append(y))
        handle.remove()
        assert len(outs) == ctx.num_samples
        assert outs[0].shape == (ctx.input(0).shape[1], ctx.layer.mlp.down_proj.out_features)

    run_layerwise(model, calib_ids, on_layer)
    n = calib_ids.shape[0] * model.config.num_hidden_layers
    assert counts == {name: n for name in get_arch(model).attn_proj[:3]}


def test_autograd_through_the_layer(model, calib_ids) -> None:
    """Gradient of a loss on layer 1's own output wrt its weights == the same through the model."""
    reference = copy.deepcopy(model)
    outputs: list[torch.Tensor] = []
    ref_layer = decoder_layers(reference, get_arch(reference))[1]
    handle = ref_layer.register_forward_hook(lambda m, a, out: outputs.append(out))
    reference(calib_ids[:1])
    handle.remove()
    outputs[0].pow(2).mean().backward()
    expected = {name: p.grad for name, p in ref_layer.named_parameters()}

    grads: dict[str, torch.Tensor] = {}

    def on_layer(ctx: LayerContext) -> None:
        if ctx.index == 1:
            ctx.call(ctx.input(0)).pow(2).mean().backward()
            grads.update({name: p.grad.clone() for name, p in ctx.layer.named_parameters()})

    run_layerwise(model, calib_ids, on_layer)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)


def test_offload_gives_the_same_result(model, calib_ids) -> None:
    def halve_down(ctx: LayerContext) -> None:
        assert all(h.device.type == "cpu" for h in ctx.hidden_states)
        with torch.no_grad():
            ctx.layer.mlp.down_proj.weight.mul_(0.5)

    plain = run_layerwise(copy.deepcopy(model), calib_ids, halve_down)
    offloaded = run_layerwise(model, calib_ids, halve_down, offload_activations=True)
    for a, b in zip(plain.hidden_states, offloaded.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_and_progress(model, calib_ids) -> None:
    calls: list[tuple[int, int]] = []
    outputs: dict[int, list[torch.Tensor]] = {}

    def on_layer(ctx: LayerContext) -> None:
        outputs[ctx.index] = ctx.forward()
        assert ctx.name == f"model.layers.{ctx.index}" and ctx.num_layers == 3

    result = run_layerwise(model, calib_ids, on_layer, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    for a, b in zip(outputs[2], result.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class FakeRichProgress:
    def __init__(self) -> None:
        self.updates: list[int] = []

    def add_task(self, description: str, total: int) -> int:
        self.total = total
        return 7

    def update(self, task_id: int, completed: int) -> None:
        assert task_id == 7
        self.updates.append(completed)


def test_rich_progress_and_errors_leave_the_model_intact(model, calib_ids) -> None:
    progress = FakeRichProgress()
    run_layerwise(model, calib_ids, lambda ctx: None, progress=progress)
    assert progress.total == 3 and progress.updates == [0, 1, 2, 3]

    def fail(ctx: LayerContext) -> None:
        raise KeyError("boom")

    layers_before = list(decoder_layers(model, get_arch(model)))
    with pytest.raises(KeyError):
        run_layerwise(model, calib_ids, fail)
    assert list(decoder_layers(model, get_arch(model))) == layers_before
