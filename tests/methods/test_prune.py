"""magnitude and Wanda (arXiv 2306.11695): exact per-row patterns, Wanda's scores, the sequential walk,
and the CLI end to end on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from effllm_tools.errors import BadInputError
from effllm_tools.methods.prune.algorithm import (
    accumulate_sq_norms,
    apply_mask_,
    magnitude_scores,
    parse_sparsity,
    prune_mask,
    wanda_scores,
)
from tests.conftest import run_cli
from tests.methods.helpers import random_ids, stage_ctx, straight_and_resumed
from tests.tiny_models import ARCH_NAMES, NUM_SAMPLES, SEQ_LEN, VOCAB, build_model


def _pruned(w: torch.Tensor, sparsity: str, sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    scores = magnitude_scores(w) if sq_norms is None else wanda_scores(w, sq_norms)
    out = w.clone()
    apply_mask_(out, prune_mask(scores, parse_sparsity(sparsity)))
    return out


@pytest.mark.parametrize("ratio", ["0.5", "0.37", "0.9", "0.01"])
@pytest.mark.parametrize("wanda", [False, True])
def test_ratio_prunes_exactly_floor_ratio_cols_in_every_row(ratio, wanda):
    torch.manual_seed(0)
    w = torch.randn(24, 100)
    norms = torch.rand(100) * 10 if wanda else None
    out = _pruned(w, ratio, norms)
    per_row = (out == 0).sum(dim=1)
    assert (per_row == math.floor(float(ratio) * 100)).all()
    kept = out != 0
    assert torch.equal(out[kept], w[kept])  # survivors are untouched


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
@pytest.mark.parametrize("wanda", [False, True])
def test_n_of_m_keeps_at_most_n_nonzeros_per_group(pattern, n, m, wanda):
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    w[0, :8] = 0  # already-zero weights count as pruned ones
    norms = torch.rand(64) if wanda else None
    out = _pruned(w, pattern, norms)
    nonzeros = (out != 0).reshape(16, 64 // m, m).sum(-1)
    assert (nonzeros <= n).all()
    assert (nonzeros[1:] == n).all()  # dense rows: exactly n survive per group
    # The pruned ones are the smallest scores of their group.
    groups = (wanda_scores(w, norms) if wanda else w.abs()).reshape(16, -1, m)
    kept = (out != 0).reshape(16, -1, m)
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1)
    largest_pruned = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (largest_pruned[1:] <= smallest_kept[1:]).all()


def test_ratio_zero_changes_nothing():
    w = torch.randn(8, 32)
    out = _pruned(w, "0", torch.rand(32))
    assert torch.equal(out, w)
    assert not prune_mask(w.abs(), parse_sparsity(0.0)).any()


@pytest.mark.parametrize("pattern", ["0.5", "0.3", "2:4", "4:8"])
def test_wanda_with_constant_activation_norms_equals_magnitude(pattern):
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    assert torch.equal(_pruned(w, pattern, torch.full((128,), 7.3)), _pruned(w, pattern))


def test_wanda_keeps_small_weights_on_large_features():
    w = torch.tensor([[4.0, 3.0, 0.2, 0.1]])
    norms = torch.tensor([0.0, 0.01, 1e4, 1e4])  # squared norms: features 2 and 3 dominate
    assert torch.equal(_pruned(w, "0.5", norms) != 0, torch.tensor([[False, False, True, True]]))
    assert torch.equal(_pruned(w, "0.5") != 0, torch.tensor([[True, True, False, False]]))


def _outlier_inputs(gen: torch.Generator, tokens: int, features: int) -> torch.Tensor:
    """Correlated features with a few large-magnitude outlier channels (as LLMs have, Wanda §2)."""
    mix = torch.randn(features, features, generator=gen) / features**0.5
    x = torch.randn(tokens, features, generator=gen) @ (torch.eye(features) + mix)
    scale = torch.exp(torch.randn(features, generator=gen) * 0.5)
    scale[torch.randperm(features, generator=gen)[:4]] *= 20
    return x * scale


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_wanda_reconstructs_outputs_better_than_magnitude(pattern):
    wins, ratios = 0, []
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        x = _outlier_inputs(gen, 256, 64)
        w = torch.randn(48, 64, generator=gen)
        norms = accumulate_sq_norms(accumulate_sq_norms(None, x[:128]), x[128:])  # two "samples"
        ref = x @ w.T
        err_w = (x @ _pruned(w, pattern, norms).T - ref).norm()
        err_m = (x @ _pruned(w, pattern).T - ref).norm()
        wins += int(err_w < err_m)
        ratios.append(float(err_w / err_m))
    assert wins == 8 and sum(ratios) / len(ratios) < 0.8, ratios


def test_norms_accumulate_over_all_tokens():
    x = torch.randn(10, 6)
    total = accumulate_sq_norms(accumulate_sq_norms(None, x[:3]), x[3:])
    torch.testing.assert_close(total, x.pow(2).sum(0))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize(("value", "needle"), [("1.5", "outside [0, 1)"), ("3:2", "1 <= N < M"),
                                               ("x", "neither a ratio"), (124, "must be quoted"),
                                               ("0:4", "1 <= N < M"), ("-0.1", "outside")])
def test_bad_sparsity_names_the_key(method, value, needle):
    from effllm_tools.recipe import parse_recipe

    raw = {"model": "demo", "stages": [{"method": method, "sparsity": value}], "output": {"path": "o"}}
    with pytest.raises(BadInputError) as err:
        parse_recipe(raw)
    msg = str(err.value)
    assert "sparsity" in msg and method in msg and needle in msg and "\n" not in msg


def test_recipe_accepts_float_and_string_sparsity():
    from effllm_tools.recipe import parse_recipe

    for value in (0.5, "0.5", "2:4"):
        raw = {"model": "demo", "stages": [{"method": "wanda", "sparsity": value}], "output": {"path": "o"}}
        assert parse_recipe(raw).stages[0].config.pattern() == parse_sparsity(value)


@torch.no_grad()
def _reference_wanda(model, ids, pattern):
    """Official-code order on the whole model: layer i's linear inputs are measured by a full forward
    with layers < i already pruned and layer i dense; then all of layer i's linears are pruned."""
    from effllm_tools.pipeline.arch import decoder_layers, get_arch

    arch = get_arch(model)
    for layer in decoder_layers(model, arch):
        linears = {n: layer.get_submodule(n) for n in arch.linear_names}
        norms = _input_sq_norms(model, ids, linears)
        for n, mod in linears.items():
            apply_mask_(mod.weight.data, prune_mask(wanda_scores(mod.weight, norms[n]), parse_sparsity(pattern)))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_wanda_pipeline_matches_a_whole_model_reference_on_every_family(arch):
    from effllm_tools.methods.prune.method import WandaConfig, apply_wanda

    torch.set_num_threads(1)
    ids = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    model, reference, dense = build_model(arch), build_model(arch), build_model(arch)
    metrics = apply_wanda(stage_ctx(model, ids), WandaConfig(sparsity="0.5")).metrics
    _reference_wanda(reference, ids, "0.5")
    got, want, orig = model.state_dict(), reference.state_dict(), dense.state_dict()
    linear_keys = [k for k in got if ".layers." in k and k.endswith("proj.weight")]
    assert len(linear_keys) == 3 * 7
    for k in got:
        assert torch.equal(got[k], want[k]), k  # same masks, and everything else untouched
    assert metrics["weight_sparsity"] == 0.5 and metrics["weight_sparsity_per_layer"] == [0.5] * 3
    assert set(metrics["weight_sparsity_by_type"]) == {k.split(".")[-2] for k in linear_keys}
    # Sequential: layer 0 equals pruning on the dense model's activations, later layers do not
    # (their inputs come from the pruned layers before them).
    dense_norms = _input_sq_norms(dense, ids, {f"{k}.weight": m for k, m in dense.named_modules()
                                               if f"{k}.weight" in linear_keys})
    same = {k: torch.equal(got[k] != 0, orig[k].masked_fill(prune_mask(
        wanda_scores(orig[k], dense_norms[k]), parse_sparsity("0.5")), 0) != 0) for k in linear_keys}
    assert all(v for k, v in same.items() if ".layers.0." in k)
    assert not all(v for k, v in same.items() if ".layers.2." in k)


@torch.no_grad()
def _input_sq_norms(model, ids, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Per-feature squared input norms of ``modules`` over every token, by full-model forwards."""
    norms: dict[str, torch.Tensor] = {}

    def hook(key: str):
        def fn(_module, args):
            norms[key] = accumulate_sq_norms(norms.get(key), args[0].reshape(-1, args[0].shape[-1]))
        return fn

    hooks = [mod.register_forward_pre_hook(hook(key)) for key, mod in modules.items()]
    for s in range(ids.shape[0]):
        model(ids[s:s + 1])
    for h in hooks:
        h.remove()
    return norms


def test_wanda_resumes_after_a_crash_from_its_own_state_dir(tmp_path):
    from effllm_tools.methods.prune.method import WandaConfig, apply_wanda, prune_targets, wanda_layer_fn

    cfg, base = WandaConfig(sparsity="2:4"), build_model("llama", seed=1)
    straight, resumed, ctx, metrics = straight_and_resumed(
        base, random_ids(3, 4, 16), cfg, "wanda", apply_wanda,
        lambda c: wanda_layer_fn(prune_targets(base, "model.layers", c), c.pattern()), tmp_path, own_state_dir=True)
    assert ctx.logs == ["wanda: resumed after layer 1"] and metrics["resumed_layers"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["wanda"]
    assert ctx.progress == ["open wanda layers"] + ["advance"] * 3 + ["close"]
    assert metrics["weight_sparsity"] == 0.5
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_magnitude_ignore_leaves_modules_dense():
    from effllm_tools.methods.prune.method import MagnitudeConfig, apply_magnitude

    model, dense = build_model("llama"), build_model("llama")
    metrics = apply_magnitude(stage_ctx(model, None), MagnitudeConfig(sparsity="4:8", ignore=[r"down_proj$"])).metrics
    assert metrics["pruned_modules"] == 3 * 6 and metrics["weight_sparsity"] == 0.5
    for name, mod in model.named_modules():
        if name.endswith("down_proj"):
            assert torch.equal(mod.weight, dense.get_submodule(name).weight)
        elif name.endswith("_proj"):
            assert ((mod.weight != 0).reshape(mod.weight.shape[0], -1, 8).sum(-1) == 4).all()


def test_cli_wanda_2of4_loads_in_plain_transformers_and_inspect_shows_sparsity(tiny_llama, tmp_path, sample_text):
    from safetensors.torch import load_file

    out = tmp_path / "w24"
    proc = run_cli("prune", "--method", "wanda", "--sparsity", "2:4", "--nsamples", "4", "--calib-seqlen", "32",
                   "--dataset", str(sample_text), str(tiny_llama), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: no bar, but a log line per calibrated layer says where the run stands.
    assert "1/2, " in proc.stderr and "2/2, " in proc.stderr and "left" in proc.stderr, proc.stderr
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    weights, base = load_file(str(out / "model.safetensors")), load_file(str(tiny_llama / "model.safetensors"))
    linears = [k for k in weights if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 2 * 7
    for k in linears:
        assert ((weights[k] != 0).reshape(weights[k].shape[0], -1, 4).sum(-1) <= 2).all(), k
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(weights[k], base[k])
    # No quantization_config: plain transformers loads the dense zeros as they are.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, weights["model.layers.1.mlp.down_proj.weight"],
                               rtol=0, atol=0)
    text = run_cli("inspect", str(out)).stdout
    assert "sparsity:    50.00% zeros in 14 pruned modules (2:4, wanda)" in text, text


def test_recipe_wanda_then_rtn8_runs(tiny_llama, tmp_path, sample_text):
    from effllm_tools.io.inspect import inspect_checkpoint
    from effllm_tools.recipe import parse_recipe
    from effllm_tools.runner import run_recipe

    out = tmp_path / "pq"
    recipe = parse_recipe({"model": str(tiny_llama), "output": {"path": str(out)},
                           "calibration": {"dataset": str(sample_text), "nsamples": 4, "seqlen": 32},
                           "stages": [{"method": "wanda", "sparsity": "0.5"},
                                      {"method": "rtn", "bits": 8, "group_size": 32}]})
    torch.set_num_threads(1)
    res = run_recipe(recipe, device="cpu")
    assert [st["method"] for st in res["stages"]] == ["wanda", "rtn"]
    info = inspect_checkpoint(out)
    assert info["methods"] == ["wanda", "rtn"] and info["quantization"]["bits"] == [8]
    assert info["sparsity"]["method"] == "wanda" and info["sparsity"]["weight_sparsity"] == 0.5
    from transformers import AutoModelForCausalLM

    import effllm_tools  # noqa: F401  (registers the rtn format with transformers)

    w = AutoModelForCausalLM.from_pretrained(str(out)).model.layers[0].self_attn.q_proj.dequantized()
    # 8-bit RTN keeps the pruned half near zero: the smaller half of every row is tiny.
    small = w.abs().sort(dim=1).values[:, : w.shape[1] // 2]
    assert small.max() < 2e-2 * w.abs().max()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("bits", "group_size", "pattern"), [(4, 32, "2:4"), (3, 16, "0.5"), (2, 64, "4:8"),
                                                              (4, 40, "0.3")])
def test_prune_then_rtn_keeps_every_pruned_weight_an_exact_zero(symmetric, bits, group_size, pattern):
    from effllm_tools.methods.rtn.algorithm import dequantize_codes, quantize_rtn

    torch.manual_seed(6)
    w = _pruned(torch.randn(24, 120) + 0.3, pattern, torch.rand(120))  # a shifted grid: 0 off the float one
    codes, scales, zeros = quantize_rtn(w, bits, group_size, symmetric)
    w_hat = dequantize_codes(codes, scales, zeros, group_size)
    assert torch.equal(w_hat[w == 0], torch.zeros_like(w_hat[w == 0]))
    # Without the integer zero point the pruned weights would not dequantize to 0 (the test bites).
    if not symmetric:
        loose = dequantize_codes(*quantize_rtn(w, bits, group_size, symmetric, keep_zeros=False), group_size)
        assert (loose[w == 0] != 0).any()
    # The grid still fits: every weight within one step of its group (half a step plus the zero shift).
    step = scales.float().repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    assert ((w_hat - w).abs() <= step * 1.0001).all()


def test_rtn_dense_path_is_unchanged_by_keep_zeros():
    from effllm_tools.methods.rtn.algorithm import quantize_rtn

    torch.manual_seed(7)
    w = torch.randn(16, 96)  # no exact zeros: every group keeps its float zero point
    for symmetric in (False, True):
        got, want = quantize_rtn(w, 4, 32, symmetric), quantize_rtn(w, 4, 32, symmetric, keep_zeros=False)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_rtn_leaves_incidental_zeros_of_a_dense_weight_alone():
    """A dense weight with a few exact zeros (the demo's Q4_1 grid has 0.03%) keeps float zero points:
    keep_zeros switches on only from SPARSE_SHARE exact zeros, so dense RTN results never move."""
    from effllm_tools.methods.rtn.algorithm import SPARSE_SHARE, quantize_rtn

    torch.manual_seed(8)
    w = torch.randn(16, 96) + 0.3
    w.view(-1)[:: 400] = 0.0  # 4 zeros of 1536: below the sparse share
    assert float((w == 0).float().mean()) < SPARSE_SHARE
    for a, b in zip(quantize_rtn(w, 3, 32), quantize_rtn(w, 3, 32, keep_zeros=False), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(quantize_rtn(w, 3, 32, keep_zeros=True)[2], quantize_rtn(w, 3, 32)[2])
