"""Resume: an interrupted run continued from its state equals an uninterrupted one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from effllm_tools.errors import BadInputError
from effllm_tools.pipeline import LayerContext, make_fingerprint, run_layerwise


class Interrupted(Exception):
    pass


def data_dependent_method(fail_at: int | None = None, calls: list[int] | None = None):
    """Shrinks each o_proj column by the mean |input| it sees (so results depend on the hidden
    states a layer gets) and leaves that scale as an artifact."""

    def on_layer(ctx: LayerContext) -> None:
        if calls is not None:
            calls.append(ctx.index)
        if ctx.index == fail_at:
            raise Interrupted
        sums: list[torch.Tensor] = []
        ctx.collect_inputs(["self_attn.o_proj"], lambda name, x: sums.append(x.abs().mean(0)))
        scale = 1.0 / (1.0 + torch.stack(sums).mean(0))  # [in_features]
        with torch.no_grad():
            ctx.layer.self_attn.o_proj.weight.mul_(scale)
        ctx.artifacts["o_scale"] = scale

    return on_layer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def crash_at(model: nn.Module, calib_ids, state_dir, fail_at: int, fingerprint: str) -> None:
    """A calibration interrupted in layer ``fail_at`` (the layers before it stay in ``state_dir``)."""
    with pytest.raises(Interrupted):
        run_layerwise(model, calib_ids, data_dependent_method(fail_at=fail_at), state_dir=state_dir,
                      fingerprint=fingerprint)


def test_interrupted_run_resumes_to_the_same_result(build, calib_ids, tmp_path) -> None:
    pristine = build("gemma3")
    fingerprint = make_fingerprint(pristine, calib_ids, {"method": "test", "damp": 0.01})

    straight_model = copy.deepcopy(pristine)
    straight = run_layerwise(straight_model, calib_ids, data_dependent_method())

    crashed_model = copy.deepcopy(pristine)
    crash_at(crashed_model, calib_ids, tmp_path, 1, fingerprint)
    record = json.loads((tmp_path / "state.json").read_text())
    assert record["finished_layers"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hidden_00001.safetensors",
        "layer_00000.safetensors",
        "state.json",
    ]

    resumed_model = copy.deepcopy(pristine)  # a new process: weights as loaded, not as left
    calls: list[int] = []
    resumed = run_layerwise(
        resumed_model,
        calib_ids,
        data_dependent_method(calls=calls),
        state_dir=tmp_path,
        resume=True,
        fingerprint=fingerprint,
    )
    assert calls == [1, 2] and resumed.resumed_from == 1
    for a, b in zip(straight.hidden_states, resumed.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    expected, got = weights(straight_model), weights(resumed_model)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    for index in range(3):
        torch.testing.assert_close(resumed.artifacts[index]["o_scale"], straight.artifacts[index]["o_scale"])
    assert sorted(p.name for p in tmp_path.glob("hidden_*")) == ["hidden_00003.safetensors"]


def test_finished_state_resumes_without_work(build, calib_ids, tmp_path) -> None:
    model = build("llama")
    fingerprint = make_fingerprint(model, calib_ids, {})
    first = run_layerwise(
        copy.deepcopy(model), calib_ids, data_dependent_method(), state_dir=tmp_path, fingerprint=fingerprint
    )
    calls: list[int] = []
    again = run_layerwise(
        model,
        calib_ids,
        data_dependent_method(calls=calls),
        state_dir=tmp_path,
        resume=True,
        fingerprint=fingerprint,
    )
    assert calls == [] and again.resumed_from == 3
    torch.testing.assert_close(torch.cat(again.hidden_states), torch.cat(first.hidden_states))


def test_mismatched_fingerprint_is_refused(build, calib_ids, tmp_path) -> None:
    model = build("qwen3")
    crash_at(copy.deepcopy(model), calib_ids, tmp_path, 1, make_fingerprint(model, calib_ids, {"bits": 4}))
    other = make_fingerprint(model, calib_ids, {"bits": 3})
    with pytest.raises(BadInputError, match="belongs to another run") as info:
        run_layerwise(
            model, calib_ids, data_dependent_method(), state_dir=tmp_path, resume=True, fingerprint=other
        )
    assert "\n" not in str(info.value)
    before = weights(build("qwen3"))
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())  # nothing loaded


def test_fingerprint_covers_model_data_and_config(build, calib_ids) -> None:
    llama, qwen = build("llama"), build("qwen2")
    base = make_fingerprint(llama, calib_ids, {"bits": 4})
    assert base == make_fingerprint(build("llama"), calib_ids.clone(), {"bits": 4})
    assert base != make_fingerprint(qwen, calib_ids, {"bits": 4})
    assert base != make_fingerprint(llama, calib_ids.flip(0), {"bits": 4})
    assert base != make_fingerprint(llama, calib_ids, {"bits": 3})


def test_fresh_run_clears_old_state_and_needs_a_fingerprint(build, calib_ids, tmp_path) -> None:
    model = build("mistral")
    stale = tmp_path / "hidden_00002.safetensors"
    stale.write_bytes(b"old")
    keep = tmp_path / "notes.txt"
    keep.write_text("not ours")
    run_layerwise(model, calib_ids, lambda ctx: None, state_dir=tmp_path, fingerprint="abc")
    assert not stale.exists() and keep.exists()
    assert json.loads((tmp_path / "state.json").read_text())["finished_layers"] == 3
    with pytest.raises(ValueError, match="fingerprint"):
        run_layerwise(model, calib_ids, lambda ctx: None, state_dir=tmp_path)


def test_corrupt_state_is_bad_input(build, calib_ids, tmp_path) -> None:
    model = build("llama")
    crash_at(copy.deepcopy(model), calib_ids, tmp_path, 2, "f")
    (tmp_path / "layer_00001.safetensors").write_bytes(b"garbage")
    before = weights(model)
    with pytest.raises(BadInputError, match="incomplete or corrupt"):
        run_layerwise(model, calib_ids, lambda ctx: None, state_dir=tmp_path, resume=True, fingerprint="f")
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())  # nothing half-loaded
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(BadInputError, match="unreadable resume state"):
        run_layerwise(model, calib_ids, lambda ctx: None, state_dir=tmp_path, resume=True, fingerprint="f")
