"""The ``spqr`` stage on tiny models: quality against RTN, resume, CLI round trip, bytes on disk."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import effllm_tools
from effllm_tools.io.headers import read_safetensors_header
from effllm_tools.io.inspect import inspect_checkpoint
from effllm_tools.methods.gptq.method import FINGERPRINT
from effllm_tools.methods.rtn.method import RTNConfig, apply_rtn
from effllm_tools.methods.spqr.format import SpQRLinear
from effllm_tools.methods.spqr.method import SpQRConfig, apply_spqr, make_on_layer
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


def text_windows(length: int = 64) -> torch.Tensor:
    """Byte-level windows [n, length] of an English sentence reshuffled (ASCII < the tiny vocab of 128)."""
    words = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
             "must be in want of a wife. ").split()
    rng = random.Random(0)
    ids = torch.tensor(list("\n".join(" ".join(rng.sample(words, len(words))) for _ in range(300)).encode()))
    n = ids.numel() // length
    return ids[: n * length].reshape(n, length)


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp())


def test_spqr_beats_rtn_with_fewer_bits_on_a_trained_tiny_model():
    # A random model does not predict text, so its PPL moves randomly under quantization: train it first.
    windows = text_windows()
    train, held_out = windows[:-8], windows[-8:]
    base = build_model("llama", seed=0).train()
    torch.manual_seed(0)
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    for _ in range(40):
        batch = train[torch.randint(0, len(train), (16,))]
        loss = base(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.eval()
    base_ppl = perplexity(base, held_out)
    assert base_ppl < 4  # it learned the text (a uniform guess is 128)
    results = {}
    for name, apply, cfg in (("spqr", apply_spqr, SpQRConfig()),
                             ("spqr-no-outliers", apply_spqr, SpQRConfig(outlier_threshold=None)),
                             ("rtn-g16", apply_rtn, RTNConfig(bits=3, group_size=16)),
                             ("rtn-g32", apply_rtn, RTNConfig(bits=3, group_size=32))):
        model = copy.deepcopy(base)
        metrics = apply(stage_ctx(model, train[:16]), cfg).metrics
        results[name] = (metrics["avg_bits"], perplexity(model, held_out) - base_ppl, kl_to(base, model, held_out))
    assert results["spqr-no-outliers"][0] == 3.625
    for spqr, rtn in (("spqr", "rtn-g16"), ("spqr-no-outliers", "rtn-g32")):
        assert results[spqr][0] < results[rtn][0], results
        assert results[spqr][1] < 0.8 * results[rtn][1] and results[spqr][2] < 0.5 * results[rtn][2], results


def test_resume_after_a_crash_gives_the_same_tensors(tmp_path):
    cfg = SpQRConfig(bits=3, group_size=16, outlier_threshold=0.1)
    straight, resumed, ctx, metrics = straight_and_resumed(build_model("qwen3", seed=2), random_ids(3, 4, 16), cfg,
                                                           "spqr", apply_spqr, make_on_layer, tmp_path, fingerprint_extra=FINGERPRINT)
    assert metrics["quantized_modules"] == 21 and len(ctx.modules) == 21 and metrics["outlier_share"] > 0
    assert "spqr: resumed after layer 1" in ctx.logs
    assert assert_same_packed_modules(straight, resumed, SpQRLinear) == 21


def in_memory_quantized(model_dir, text, tmp_path):
    """The model the CLI run below quantizes, quantized in this process through the runner's context."""
    from effllm_tools.io.load import load_model
    from effllm_tools.pipeline import get_arch
    from effllm_tools.recipe import parse_recipe
    from effllm_tools.reporting import Reporter
    from effllm_tools.runner import StageContext, layers_prefix_of

    recipe = parse_recipe({"version": 1, "model": str(model_dir), "seed": 0,
                           "calibration": {"dataset": str(text), "nsamples": 4, "seqlen": 32},
                           "stages": [{"method": "spqr", "outlier_threshold": 0.5}],
                           "output": {"path": str(tmp_path / "unused")}})
    loaded = load_model(str(model_dir))
    arch = get_arch(loaded.model.config)
    ctx = StageContext(loaded, recipe, "cpu", Reporter(), layers_prefix_of(loaded.model, arch), arch)
    recipe.stages[0].spec.apply(ctx, recipe.stages[0].config)
    return loaded.model


def test_cli_spqr_round_trip(tmp_path, tiny_llama, sample_text):
    out = tmp_path / "q"
    proc = run_cli("quantize", "--method", "spqr", "--set", "spqr.outlier_threshold=0.5", "--nsamples", "4",
                   "--calib-seqlen", "32", "--dataset", str(sample_text), str(tiny_llama), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = parse_json_stdout(proc)["metrics"]
    assert metrics["quantized_modules"] == 14 and metrics["hessian_error_vs_rtn"] < 1.0
    assert 3.625 < metrics["avg_bits"] == pytest.approx(3.625 + 32 * metrics["outlier_share"], abs=1e-9)
    specs = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert {s["format"] for s in specs.values()} == {"spqr"} and all(s["perm"] for s in specs.values())
    info = inspect_checkpoint(out)
    assert info["quantization"]["avg_bits"] == pytest.approx(metrics["avg_bits"], rel=1e-12)

    # Bytes on disk: each module's tensors are its counted bits plus row pointers, permutation and
    # word padding; the file is those tensors, the other (dense) tensors and the safetensors header.
    header = read_safetensors_header(out / "model.safetensors")
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    header_len = int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    assert (out / "model.safetensors").stat().st_size == 8 + header_len + sum(sizes.values())
    counted = stored = 0.0
    for name, s in specs.items():
        n, k, g = s["out_features"], s["in_features"], -(-s["in_features"] // s["group_size"])
        module_bytes = sum(v for key, v in sizes.items() if key.startswith(name + ".") and not key.endswith(".bias"))
        pad = n * ((k * s["bits"] + 31) // 32 * 32 - k * s["bits"]) + 2 * n * ((g * 3 + 31) // 32 * 32 - g * 3)
        assert module_bytes * 8 == s["avg_bits"] * n * k + (n + 1) * 32 + k * 32 + pad, name
        counted += s["avg_bits"] * n * k / 8
        stored += module_bytes
    # Metadata costs (32/K + 32/N + padding) bits per parameter: 1.1 bits at these 64-wide layers, 0.13 at 576.
    assert counted < stored < 1.5 * counted

    from transformers import AutoModelForCausalLM

    ids = torch.arange(40)[None] % 200
    reference = in_memory_quantized(tiny_llama, sample_text, tmp_path)
    with torch.no_grad():
        expect = reference(ids).logits
        for model in (AutoModelForCausalLM.from_pretrained(str(out)).eval(), effllm_tools.load(out)):
            assert isinstance(model.model.layers[1].mlp.down_proj, SpQRLinear)
            torch.testing.assert_close(model(ids).logits, expect, rtol=0, atol=0)


@pytest.mark.parametrize("override,needle", [("spqr.stat_bits=12", "stat_bits"), ("spqr.beta1=16", "beta1")])
def test_cli_bad_recipe_values_exit_2(tiny_llama, tmp_path, override, needle):
    proc = run_cli("quantize", "--method", "spqr", "--set", override, str(tiny_llama), "-o", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("name", "bits"), [("spqr-3bit", 3), ("spqr-4bit", 4)])
def test_shipped_spqr_recipes_run(tiny_llama, tmp_path, sample_text, name, bits):
    """The shipped recipes as a user runs them (tiny model and calibration swapped in): the keys are
    the documented ones, the output loads and its exact average bits follow the bit formula."""
    from pathlib import Path

    from effllm_tools.recipe import load_recipe_file
    from effllm_tools.runner import run_recipe

    path = Path(__file__).parents[2] / "recipes" / f"{name}.yaml"
    recipe = load_recipe_file(path, [f"model={tiny_llama}", f"calibration.dataset={sample_text}",
                                     "calibration.nsamples=4", "calibration.seqlen=32", f"output.path={tmp_path / 'r'}"])
    cfg = recipe.stages[0].config
    assert (cfg.bits, cfg.group_size, cfg.stat_bits, cfg.stat_group, cfg.act_order, cfg.percdamp) == (bits, 16, 3, 16, True, 0.01)
    assert SpQRConfig().percdamp == cfg.percdamp  # the recipe spells out the method's defaults
    res = run_recipe(recipe, device="cpu")
    floor = bits + 6 / 16 + 64 / 256  # no outliers, full groups and blocks
    assert floor <= res["metrics"]["avg_bits"] < floor + 0.6
    model = effllm_tools.load(str(tmp_path / "r")).model
    assert any(isinstance(m, SpQRLinear) for m in model.modules())
