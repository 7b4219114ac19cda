"""Wanda++ (arXiv 2503.04992): the score, regional gradients, regional optimization, the pipeline on a
tiny random Llama, and the CLI end to end (plain-transformers load, exact 2:4, prune then rtn)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from effllm_tools.errors import BadInputError
from effllm_tools.methods.prune.algorithm import parse_sparsity, prune_mask, wanda_pp_scores, wanda_scores
from effllm_tools.methods.prune.regional import (
    block_sq_error,
    regional_gradients,
    regional_optimize,
    trainable_only,
)
from tests.conftest import run_cli
from tests.methods.helpers import stage_ctx
from tests.tiny_models import NUM_SAMPLES, SEQ_LEN, VOCAB, build_model


def test_alpha_zero_score_is_wanda_bit_for_bit():
    torch.manual_seed(0)
    w, sq, g = torch.randn(16, 32), torch.rand(32) * 5, torch.rand(16, 32)
    assert torch.equal(wanda_pp_scores(w, sq, g, 0.0), wanda_scores(w, sq))
    assert torch.equal(wanda_pp_scores(w, sq, None, 100.0), wanda_scores(w, sq))
    torch.testing.assert_close(wanda_pp_scores(w, sq, g, 3.0), (3.0 * g + sq.sqrt()) * w.abs())


def test_regional_gradient_of_a_linear_block_matches_the_closed_form():
    """For f(x) = x W^T: d||f(x)||_2 / dW = (y / ||y||)^T x with y = f(x); G is the RMS over samples."""
    torch.manual_seed(1)
    lin = nn.Linear(12, 8, bias=False)
    xs = [torch.randn(1, 5, 12) for _ in range(4)]
    kept = []
    got = regional_gradients(lambda x: lin(x), xs, {"w": lin.weight}, on_output=lambda s, y: kept.append((s, y)))
    grads = []
    for x in xs:
        y = x[0] @ lin.weight.detach().T
        grads.append((y / y.norm()).T @ x[0])
    want = torch.stack(grads).pow(2).mean(0).sqrt()
    torch.testing.assert_close(got["w"], want, rtol=1e-5, atol=1e-7)
    assert [s for s, _ in kept] == [0, 1, 2, 3] and lin.weight.grad is None


class _Block(nn.Module):
    """A residual MLP block, the shape of a decoder layer's second half."""

    def __init__(self, d: int = 16, h: int = 32) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.silu(self.up(self.norm(x))))


@pytest.mark.parametrize(("lr", "steps"), [(3e-7, 1), (1e-3, 4)])
def test_regional_optimization_holds_the_mask_and_does_not_increase_block_error(lr, steps):
    torch.manual_seed(2)
    block = _Block()
    xs = [torch.randn(1, 8, 16) for _ in range(6)]
    with torch.no_grad():
        targets = [block(x) for x in xs]
    weights = {"up": block.up.weight, "down": block.down.weight}
    masks = {n: prune_mask(p.detach().abs(), parse_sparsity("2:4")) for n, p in weights.items()}
    with torch.no_grad():
        for n, p in weights.items():
            p.masked_fill_(masks[n], 0)
    norm_before = block.norm.weight.clone()
    before = block_sq_error(block, zip(xs, targets, strict=True))
    opt = torch.optim.RMSprop(list(weights.values()), lr=lr)
    with trainable_only(block, weights):
        assert not block.norm.weight.requires_grad
        for _ in range(steps):
            losses = regional_optimize(block, weights, masks, zip(xs, targets, strict=True), opt)
    after = block_sq_error(block, zip(xs, targets, strict=True))
    for n, p in weights.items():
        assert torch.equal(p.detach() == 0, masks[n]), n  # pruned exactly zero, kept ones non-zero
    assert torch.equal(block.norm.weight, norm_before) and block.norm.weight.requires_grad
    assert len(losses) == 6
    assert after <= before * (1 + 1e-6)
    if lr > 1e-4:
        assert after < 0.9 * before  # a visible improvement at a large step size


def test_alpha_zero_without_ro_equals_wanda_on_the_pipeline():
    from effllm_tools.methods.prune.method import WandaConfig, apply_wanda
    from effllm_tools.methods.prune.wanda_pp import WandaPPConfig, apply_wanda_pp

    torch.set_num_threads(1)
    ids = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    for pattern in ("0.5", "2:4"):
        a, b = build_model("llama"), build_model("llama")
        apply_wanda_pp(stage_ctx(a, ids), WandaPPConfig(sparsity=pattern, alpha=0.0, ro_enabled=False))
        apply_wanda(stage_ctx(b, ids), WandaConfig(sparsity=pattern))
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), (pattern, k)


def _layer0_error(model, dense, ids) -> float:
    """Squared error of decoder layer 0's output against the dense model's, on the calibration ids."""
    outs = []
    for m in (model, dense):
        with torch.no_grad():
            outs.append(torch.cat([m(ids[s:s + 1], output_hidden_states=True).hidden_states[1] for s in range(len(ids))]))
    return float((outs[0] - outs[1]).pow(2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wanda_pp_exact_patterns_and_ro_lowers_the_block_error(dtype):
    from effllm_tools.methods.prune.wanda_pp import WandaPPConfig, apply_wanda_pp

    torch.set_num_threads(1)
    ids = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    dense = build_model("llama").to(dtype)
    runs = {}
    for name, cfg in {"grad": WandaPPConfig(sparsity="2:4", ro_enabled=False),
                      "ro": WandaPPConfig(sparsity="2:4", ro_lr=1e-4, ro_rounds=3)}.items():
        model = build_model("llama").to(dtype)
        metrics = apply_wanda_pp(stage_ctx(model, ids), cfg).metrics
        assert metrics["weight_sparsity"] == 0.5 and metrics["pruned_modules"] == 21
        for n, p in model.named_parameters():
            assert p.dtype == dtype, n
            if n.endswith("proj.weight"):
                assert ((p != 0).reshape(p.shape[0], -1, 4).sum(-1) == 2).all(), n
        runs[name] = (model, metrics)
    assert "ro_loss_first_last_per_layer" not in runs["grad"][1]
    assert len(runs["ro"][1]["ro_loss_first_last_per_layer"]) == 3
    # The gradient term changes the masks (alpha = 100 is not Wanda); RO then lowers layer 0's error.
    assert _layer0_error(runs["ro"][0], dense, ids) < _layer0_error(runs["grad"][0], dense, ids)


def test_wanda_pp_unstructured_ratio_is_exact_per_row():
    from effllm_tools.methods.prune.wanda_pp import WandaPPConfig, apply_wanda_pp

    torch.set_num_threads(1)
    ids = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    model = build_model("qwen3")
    apply_wanda_pp(stage_ctx(model, ids), WandaPPConfig(sparsity="0.3", ro_rounds=2))
    for n, p in model.named_parameters():
        if n.endswith("proj.weight"):
            assert ((p == 0).sum(1) == int(0.3 * p.shape[1])).all(), n


@pytest.mark.parametrize(("key", "value", "needle"), [("alpha", -1.0, "alpha must be"), ("ro_samples", 0, "ro_samples"),
                                                      ("ro_lr", 0.0, "ro_lr"), ("ro_rounds", -2, "ro_rounds")])
def test_bad_wanda_pp_keys_name_the_key(key, value, needle):
    from effllm_tools.recipe import parse_recipe

    raw = {"model": "demo", "stages": [{"method": "wanda++", key: value}], "output": {"path": "o"}}
    with pytest.raises(BadInputError, match=needle):
        parse_recipe(raw)


def test_cli_wanda_pp_2of4_then_quantize_keeps_or_reports_exact_zeros(tiny_llama, tmp_path, sample_text):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "wpp"
    calib = ["--nsamples", "4", "--calib-seqlen", "32", "--dataset", str(sample_text)]
    proc = run_cli("prune", "--method", "wanda++", "--sparsity", "2:4", *calib, str(tiny_llama), "-o", str(out),
                   "--json", "--set", "wanda++.ro_rounds=2")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)["metrics"]
    assert metrics["weight_sparsity"] == 0.5 and len(metrics["ro_loss_first_last_per_layer"]) == 2
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    linears = [k for k in weights if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 14
    for k in linears:
        assert ((weights[k] != 0).reshape(weights[k].shape[0], -1, 4).sum(-1) <= 2).all(), k
    model = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, dense zeros as they are
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, weights["model.layers.0.mlp.up_proj.weight"])
    from effllm_tools.io.inspect import inspect_checkpoint, render_inspection

    assert "(2:4, wanda++)" in render_inspection(inspect_checkpoint(out))
    # Then 4-bit asymmetric RTN: every pruned weight stays an exact zero.
    q = tmp_path / "wpp-rtn"
    proc = run_cli("quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", str(out), "-o", str(q), "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["metrics"]
    assert m["input_exact_zeros"] >= sum(weights[k].numel() // 2 for k in linears)
    assert m["exact_zeros_kept"] == m["input_exact_zeros"]
    import effllm_tools  # noqa: F401  (registers the rtn format)

    qm = AutoModelForCausalLM.from_pretrained(str(q))
    for k in linears:
        w = qm.get_submodule(k.removesuffix(".weight")).dequantized()
        assert torch.equal(w[weights[k] == 0], torch.zeros_like(w[weights[k] == 0])), k
    # GPTQ keeps the mask too (its error propagation would fill the pruned weights in otherwise) ...
    g = tmp_path / "wpp-gptq"
    proc = run_cli("quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", *calib, str(out), "-o", str(g),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["metrics"]
    assert m["exact_zeros_kept"] == m["input_exact_zeros"] >= sum(weights[k].numel() // 2 for k in linears)
    gm = AutoModelForCausalLM.from_pretrained(str(g))
    for k in linears:
        w = gm.get_submodule(k.removesuffix(".weight")).dequantized()
        assert torch.equal(w[weights[k] == 0], torch.zeros_like(w[weights[k] == 0])), k
    info = inspect_checkpoint(g)
    assert info["sparsity"]["lost_by"] == [] and "NOT KEPT" not in render_inspection(info)
    # ... SpQR cannot (quantized zero points): it says so, and inspect no longer reports the sparsity as there
    sq = tmp_path / "wpp-spqr"
    proc = run_cli("quantize", "--method", "spqr", *calib, str(out), "-o", str(sq), "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["metrics"]
    assert m["exact_zeros_kept"] < m["input_exact_zeros"] and "keeps only" in proc.stderr
    info = inspect_checkpoint(sq)
    assert info["sparsity"]["lost_by"] == ["spqr"] and "NOT KEPT: spqr" in render_inspection(info)
    assert [st["method"] for st in info["chain"]] == ["wanda++", "spqr"]  # the whole chain, configs included
    assert info["chain"][0]["config"]["sparsity"] == "2:4" and "avg_bits" in info["chain"][1]["metrics"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_wanda_pp_on_cuda_bf16_with_autocast_ro():
    from effllm_tools.methods.prune.wanda_pp import WandaPPConfig, apply_wanda_pp

    ids = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(8))
    model = build_model("llama").to(torch.bfloat16)
    ctx = stage_ctx(model, ids)
    ctx.device = "cuda"
    metrics = apply_wanda_pp(ctx, WandaPPConfig(sparsity="2:4")).metrics
    assert metrics["weight_sparsity"] == 0.5 and len(metrics["ro_loss_first_last_per_layer"]) == 3
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu", n
        if n.endswith("proj.weight"):
            assert ((p != 0).reshape(p.shape[0], -1, 4).sum(-1) == 2).all(), n


def test_shipped_wanda_pp_recipe_runs(tiny_llama, tmp_path, sample_text):
    from pathlib import Path

    from effllm_tools.recipe import load_recipe_file
    from effllm_tools.runner import run_recipe

    path = Path(__file__).parents[2] / "recipes" / "wanda-pp-2of4.yaml"
    recipe = load_recipe_file(path, [f"model={tiny_llama}", f"calibration.dataset={sample_text}",
                                     "calibration.nsamples=4", "calibration.seqlen=32",
                                     f"output.path={tmp_path / 'r'}", "wanda++.ro_rounds=1"])
    cfg = recipe.stages[0].config
    assert (cfg.alpha, cfg.ro_enabled, cfg.ro_samples, cfg.ro_lr, cfg.pattern().describe()) == (100.0, True, 32, 1e-4, "2:4")
    from effllm_tools.methods.prune.wanda_pp import WandaPPConfig

    assert WandaPPConfig().ro_lr == 3e-7  # the key's default stays the paper's; the recipe ships the tuned rate
    torch.set_num_threads(1)
    res = run_recipe(recipe, device="cpu")
    assert res["metrics"]["weight_sparsity"] == 0.5 and res["metrics"]["sparsity_pattern"] == "2:4"
