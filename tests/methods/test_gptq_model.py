"""The ``gptq`` stage on tiny random models: true-sequential walk, resume, metrics, CLI round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from effllm_tools.methods.gptq.method import FINGERPRINT, GPTQConfig, apply_gptq, make_on_layer
from effllm_tools.methods.rtn.format import RTNLinear
from effllm_tools.methods.rtn.method import RTNConfig, apply_rtn
from tests.conftest import parse_json_stdout, run_cli
from tests.methods.helpers import (
    assert_same_packed_modules,
    kl_to,
    random_ids,
    stage_ctx,
    straight_and_resumed,
)
from tests.tiny_models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gptq_beats_rtn_at_three_bits_on_held_out_tokens():
    base = build_model("llama", seed=1)
    calib, held_out = random_ids(0, 16), random_ids(1, 8)
    quantized = {}
    for name, apply, cfg in (("gptq", apply_gptq, GPTQConfig(bits=3, group_size=32)),
                             ("rtn", apply_rtn, RTNConfig(bits=3, group_size=32))):
        model = copy.deepcopy(base)
        ctx = stage_ctx(model, calib)
        metrics = apply(ctx, cfg).metrics
        assert metrics["quantized_modules"] == 3 * 7 and len(ctx.modules) == 21
        quantized[name] = (model, metrics)
    gptq_metrics = quantized["gptq"][1]
    assert gptq_metrics["hessian_error_vs_rtn"] < 0.9
    assert gptq_metrics["damping_retries"] == 0 and gptq_metrics["avg_bits"] == pytest.approx(3 + 32 / 32)
    assert kl_to(base, quantized["gptq"][0], held_out) < kl_to(base, quantized["rtn"][0], held_out)


def test_resume_after_a_crash_gives_the_same_codes(tmp_path):
    cfg = GPTQConfig(bits=4, group_size=16, act_order=True)
    straight, resumed, ctx, metrics = straight_and_resumed(build_model("qwen3", seed=2), random_ids(3, 4, 16), cfg,
                                                           "gptq", apply_gptq, make_on_layer, tmp_path, fingerprint_extra=FINGERPRINT)
    assert metrics["quantized_modules"] == 21 and len(ctx.modules) == 21
    assert ctx.logs == ["gptq: resumed after layer 1"]
    assert ctx.progress == ["open gptq layers"] + ["advance"] * 3 + ["close"]  # 2 resumed layers count as done
    assert assert_same_packed_modules(straight, resumed, RTNLinear) == 21


def test_ignore_keeps_modules_dense():
    model = build_model("llama", seed=4)
    ctx = stage_ctx(model, random_ids(5, 4, 16))
    apply_gptq(ctx, GPTQConfig(bits=4, group_size=32, ignore=[r"down_proj$", r"layers\.0\.self_attn"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, RTNLinear)
    assert all(isinstance(layer.mlp.down_proj, torch.nn.Linear) for layer in model.model.layers)
    assert len(ctx.modules) == 3 * 7 - 4 - 3


def test_cli_gptq_round_trip(tmp_path, tiny_llama, sample_text):
    out = tmp_path / "q"
    proc = run_cli("quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--nsamples", "4",
                   "--calib-seqlen", "32", "--dataset", str(sample_text), str(tiny_llama), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = parse_json_stdout(proc)["metrics"]
    assert metrics["quantized_modules"] == 14 and metrics["hessian_error_vs_rtn"] < 1.0
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {spec["format"] for spec in qcfg["modules"].values()} == {"rtn"}
    from transformers import AutoModelForCausalLM

    import effllm_tools  # noqa: F401  (registers the formats with transformers)

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    lin = model.model.layers[1].mlp.down_proj
    assert isinstance(lin, RTNLinear) and lin.bits == 4
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(lin(x), x @ lin.dequantized().T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(16)[None]).logits).all()


def test_all_groups_from_one_pass_without_true_sequential():
    model = build_model("gemma3", seed=6)
    metrics = apply_gptq(stage_ctx(model, random_ids(7, 4, 16)), GPTQConfig(bits=4, group_size=32,
                                                                               true_sequential=False)).metrics
    assert metrics["quantized_modules"] == 21 and metrics["hessian_error_vs_rtn"] < 1.0


@pytest.mark.parametrize("key,value", [("bits", 9), ("percdamp", 0.0), ("block_size", 0),
                                       ("stats_dtype", "int8"), ("ignore", ["("])])
def test_bad_keys_are_refused(key, value):
    from effllm_tools.errors import BadInputError

    with pytest.raises(BadInputError, match=key if key != "ignore" else "regex"):
        GPTQConfig(**{key: value}).validate()


def test_interrupted_calibration_says_where_its_resume_state_is(tmp_path, tiny_llama, sample_text, monkeypatch, caplog):
    """Ctrl-C after some layers: no output, and one warning naming the kept per-layer state and --resume
    (the CLI's own line says only that no output was written)."""
    import logging

    import effllm_tools.methods.common as common
    from effllm_tools.recipe import load_recipe_file
    from effllm_tools.runner import run_recipe

    real = common.run_layerwise

    def interrupted(model, ids, on_layer, **kw):
        def stop(lctx):
            if lctx.index == 1:
                raise KeyboardInterrupt
            on_layer(lctx)

        return real(model, ids, stop, **kw)

    monkeypatch.setattr(common, "run_layerwise", interrupted)
    path = Path(__file__).parents[2] / "recipes" / "gptq-4bit-g128.yaml"
    out = tmp_path / "q"
    recipe = load_recipe_file(path, [f"model={tiny_llama}", f"calibration.dataset={sample_text}",
                                     "calibration.nsamples=4", "calibration.seqlen=32", f"output.path={out}"])
    with caplog.at_level(logging.WARNING, logger="effllm"), pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, device="cpu")
    state = tmp_path / ".q.state"
    assert not out.exists() and state.is_dir() and any(state.iterdir())
    assert any(str(state) in r.getMessage() and "--resume" in r.getMessage() for r in caplog.records)
    # The same command without --resume starts over, and says so before it replaces the state.
    caplog.clear()
    monkeypatch.setattr(common, "run_layerwise", real)
    with caplog.at_level(logging.WARNING, logger="effllm"):
        run_recipe(recipe, device="cpu")
    assert out.is_dir()
    assert any(str(state) in r.getMessage() and "starts over" in r.getMessage() and "--resume" in r.getMessage()
               for r in caplog.records)
